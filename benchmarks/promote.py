"""Promotion on use (issue 19): a bank that keeps every example as source, with kv copies of the
most-used, against all-kv, all-source and the tiered planner, at one cap, on a skewed stream.

    python benchmarks/promote.py --bundle bundles/default/fp32 --cap 1MiB --budgets 1.6x,1.8x \
        --seed 0 --out results/promote/1mib-s0

The four text tasks of the continual benchmark (made-up capitals, inventors, planets, foods;
``continual/run.py text_task``: 12 train facts and 12 test questions, phrased unlike training,
each) are learned in order into one bank per method, all with the same byte cap:

    kv            ikv-learn's default (compact kv entries)
    source        --kinds source (every example as its bytes, re-encoded when retrieved)
    tiered-B      --kinds tiered --ttft-budget B (the planner's kv/source mix, priced as if every
                  stored example were asked equally often)
    promoted-B    a tiered bank created with --slot-share S and learned without a budget (every
                  example kept as source, pages left for kv), then served an *observed* stream
                  of queries, its counts saved (``Memory.save_uses``) and ``ikv-learn --promote``
                  run with budget B (``learn.promote``)

Query streams: the 48 test questions, asked with Zipf(``--zipf``) frequencies over a seeded
order of the questions (rank r asked in proportion to r^-s). The observed stream is
``--observed`` draws from it (seed + 1); the scores weight each test question by its Zipf
probability (the stream the app will see), and also uniformly (every question equally often,
the continual benchmark's protocol). Every question is answered once per bank (greedy, k=1,
the first line scored as ``ikv-eval`` does) and its TTFT timed ``--rounds`` times, banks and the
plain prompt interleaved question by question; a bank's TTFT is reported as its weighted mean
over the plain prompt's weighted mean. Prints a table; writes results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "continual"))
sys.path.insert(0, str(HERE.parent / "examples"))

from run import SEQUENCES, text_task  # noqa: E402
from inducekv.core.cli import parse_bytes  # noqa: E402
from inducekv.learn import learn_task  # noqa: E402
from inducekv.learn.promote import promote  # noqa: E402
from inducekv.memory.bank import Bank  # noqa: E402
from inducekv.runtime.api import Runtime  # noqa: E402
from inducekv.runtime.scoring import score  # noqa: E402


def zipf(n: int, s: float, rng) -> np.ndarray:
    """Probabilities of n questions: rank r (a seeded order) in proportion to r^-s."""
    w = np.arange(1, n + 1, dtype=float) ** -s
    p = np.empty(n)
    p[rng.permutation(n)] = w / w.sum()
    return p


def kinds_of(path: Path) -> dict:
    with Bank.open(path) as b:
        es = b.entries()
        src = {e.example_hash for e in es if e.kind == "source"}
        u = b.usage()
        return {"kv": sum(e.kind == "kv" for e in es), "source": len(src),
                "copies": sum(e.kind == "kv" and e.example_hash in src for e in es),
                "examples": len({e.example_hash for e in es}), "bytes_used": u["bytes_used"],
                "slot_bytes_used": u.get("slot_bytes_used", 0), "cap": u["cap"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/default/fp32")
    ap.add_argument("--cap", default="1MiB")
    ap.add_argument("--budgets", default="1.6x,1.8x", help="latency budgets of the tiered and promoted banks")
    ap.add_argument("--slot-share", type=float, default=0.25, help="share of the promoted banks' cap in slots")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--observed", type=int, default=240, help="queries in the observed stream")
    ap.add_argument("--rounds", type=int, default=2, help="TTFT timings per question and bank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", type=int, default=4, help="first N tasks of the text sequence (a smoke run: 1)")
    ap.add_argument("--methods", default="kv,source,tiered,promoted")
    ap.add_argument("--max-drop", type=float, default=None, help="promote's fidelity check (nats per token)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cap, budgets = parse_bytes(args.cap), [b for b in args.budgets.split(",") if b]
    methods = args.methods.split(",")
    t_start = time.perf_counter()
    out_dir = Path(args.out) if args.out else Path(f"promote-{args.seed}")
    work = out_dir / "banks"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    names = SEQUENCES["text"]["tasks"][:args.tasks]
    tasks = {n: text_task(n, 24, 12, args.seed) for n in names}
    test = [ex for _, te in tasks.values() for ex in te]
    p = zipf(len(test), args.zipf, np.random.default_rng([args.seed, 7]))
    observed = np.random.default_rng([args.seed, 8]).multinomial(args.observed, p)

    rt = Runtime.open(args.bundle, learn=True)
    banks, notes = {}, {}

    def learn_all(path: Path, **kw) -> float:
        t = time.perf_counter()
        for n, (train, _) in tasks.items():
            learn_task(rt, path, train, name=n, budget=cap, seed=args.seed, **kw)
        return time.perf_counter() - t

    if "kv" in methods:
        banks["kv"] = work / "kv.ikv"
        notes["kv"] = {"learn_s": learn_all(banks["kv"])}
    if "source" in methods:
        banks["source"] = work / "source.ikv"
        notes["source"] = {"learn_s": learn_all(banks["source"], kinds="source")}
    for b in budgets if "tiered" in methods else []:
        banks[f"tiered-{b}"] = work / f"tiered-{b}.ikv"
        notes[f"tiered-{b}"] = {"learn_s": learn_all(banks[f"tiered-{b}"], kinds="tiered", ttft_budget=b)}
    serve = Runtime.open(args.bundle)
    if "promoted" in methods:
        base = work / "all-source.ikv"
        learn_s = learn_all(base, kinds="tiered", slot_share=args.slot_share)
        mem = serve.open_memory(base)     # the observed stream, served as an app would, counted by the runtime
        t = time.perf_counter()
        for q, c in zip(test, observed):
            for _ in range(int(c)):
                serve.generate(q.prompt, max_new_tokens=1, memory=mem, k=1)
        uses_path = work / "all-source.uses.json"
        mem.save_uses(uses_path)
        mem.close()
        observe_s = time.perf_counter() - t
        for b in budgets:
            name = f"promoted-{b}"
            banks[name] = work / f"{name}.ikv"
            shutil.copyfile(base, banks[name])
            t = time.perf_counter()
            res = promote(rt, banks[name], uses_path, ttft_budget=b, max_drop=args.max_drop)
            notes[name] = {"learn_s": learn_s, "observe_s": observe_s, "promote_s": time.perf_counter() - t,
                           "promotion": res.as_dict()}
            print(f"[{name}] {res.copies} kv copies of {res.sources} sources; recorded queries served as kv "
                  f"{res.kv_share_before:.0%} -> {res.kv_share:.0%}; priced mean {res.mean_ms_before} -> "
                  f"{res.mean_ms_after} ms (limit {res.limit_ms})", flush=True)

    mems = {name: serve.open_memory(path) for name, path in banks.items()}
    hits = {name: [] for name in mems}
    ttft = {name: [] for name in ["plain", *mems]}
    kinds_served = {name: [] for name in mems}
    served_from = {name: [] for name in mems}   # the example hash of each question's top entry
    for q in test:
        per = {name: [] for name in ttft}
        for r in range(max(1, args.rounds)):
            per["plain"].append(serve.generate(q.prompt, max_new_tokens=1, use_memory=False).timings.ttft_ms)
            for name, mem in mems.items():
                res = serve.generate(q.prompt, max_new_tokens=24 if r == 0 else 1, memory=mem, k=1)
                per[name].append(res.timings.ttft_ms)
                if r == 0:
                    hits[name].append(bool(score(res.text, q.answers)[0]))
                    kinds_served[name].append(res.entries[0]["kind"] if res.entries else "none")
                    served_from[name].append(res.entries[0]["example"] if res.entries else None)
        for name, v in per.items():
            ttft[name].append(float(np.mean(v)))
    for m in mems.values():
        m.close()

    uniform = np.full(len(test), 1.0 / len(test))
    rows = {}
    for name in mems:
        row = {"banks": kinds_of(banks[name]), **notes.get(name, {})}
        for label, w in (("zipf", p), ("uniform", uniform)):
            t0 = float(np.dot(w, ttft["plain"]))
            row[label] = {"accuracy": round(float(np.dot(w, hits[name])), 4),
                          "ttft_ms": round(float(np.dot(w, ttft[name])), 2), "plain_ms": round(t0, 2),
                          "ttft_ratio": round(float(np.dot(w, ttft[name])) / t0, 3),
                          "served_kv": round(float(sum(wi for wi, k in zip(w, kinds_served[name]) if k == "kv")), 3),
                          "served_source": round(float(sum(wi for wi, k in zip(w, kinds_served[name])
                                                           if k == "source")), 3)}
        rows[name] = row
    result = {"seed": args.seed, "cap": args.cap, "budgets": budgets, "zipf": args.zipf, "observed": args.observed,
              "slot_share": args.slot_share, "tasks": names, "questions": len(test), "rounds": args.rounds,
              "wall_s": round(time.perf_counter() - t_start, 1), "methods": rows,
              "per_question": {"zipf_p": [round(float(x), 5) for x in p], "observed": observed.tolist(),
                               "plain_ms": ttft["plain"], **{f"{n}_hit": hits[n] for n in mems},
                               **{f"{n}_ms": ttft[n] for n in mems}, **{f"{n}_kind": kinds_served[n] for n in mems},
                               **{f"{n}_example": served_from[n] for n in mems}}}
    lines = [f"# Promotion on use: {args.cap}, seed {args.seed}, Zipf s={args.zipf} ({len(test)} test questions, "
             f"{args.observed} observed queries)", "",
             "| bank | examples kept (kv / source / kv copies) | Zipf: accuracy | Zipf: mean TTFT / plain | "
             "uniform: accuracy | uniform: mean TTFT / plain |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        k = row["banks"]
        lines.append(f"| {name} | {k['examples']} ({k['kv'] - k['copies']} / {k['source']} / {k['copies']}) | "
                     f"{row['zipf']['accuracy']:.3f} | {row['zipf']['ttft_ratio']:.2f}x | "
                     f"{row['uniform']['accuracy']:.3f} | {row['uniform']['ttft_ratio']:.2f}x |")
    lines += ["", f"Plain prompt: mean TTFT {rows[next(iter(rows))]['zipf']['plain_ms']:.0f} ms (Zipf weights), "
              f"{rows[next(iter(rows))]['uniform']['plain_ms']:.0f} ms (uniform). Wall {result['wall_s'] / 60:.1f} min."]
    print("\n".join(lines))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
