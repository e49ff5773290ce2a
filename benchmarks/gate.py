"""Do no harm: what a bank of made-up facts does to questions the bare model already answers.

    python benchmarks/gate.py --bundle bundles/default/fp32 [--tasks capitals,inventors,planets,foods,colours]
        [--budget 64MiB] [--questions examples/known_facts.jsonl] [--dev capitals,colours,known] [--seed 0]
        [--read-off 0.5,0.75,0.9] [--json]

Learns the tasks' train files (``examples/tasks``) into one bank with ``ikv-learn``'s
defaults (the relevance gate fitted per task), then asks each question file: without
memory, with memory ungated (a copy of the bank without its gate) at k=1 and k=4, and
gated (an entry is injected only when the query's retrieval margin, top-1 minus the best
entry that is not its twin, reaches the gate of the top-1 entry's task, ``learn/gate.py``,
and, for a task with a subject gate, the query names the top-1 entry's subject,
``runtime/subjects.py``). The ungated copy drops both gates. Question files:
``--questions`` (real-world facts, not from any task file) and the dev splits
``examples/tasks/dev/NAME.dev.jsonl`` (paraphrases of training facts). Reports accuracy,
and for the real-world file also on the questions the bare model answers. ``--json`` also
holds each question's margin, top-1 task and answers (``rows``) and each learn's gate fit
with its leave-one-out asks (``learn.T.fit``); ``--read-off`` scores other quantiles' gates
from them (``read_off``: the gates refitted from the same asks, applied to the same margins).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from facts import TASKS  # noqa: E402
from inducekv.core.cli import parse_bytes  # noqa: E402
from inducekv.learn import learn_task  # noqa: E402
from inducekv.learn.gate import gate_from  # noqa: E402
from inducekv.memory.bank import Bank  # noqa: E402
from inducekv.runtime.api import Runtime  # noqa: E402
from inducekv.memory.format import SUBJECTS_KEY  # noqa: E402
from inducekv.runtime import subjects  # noqa: E402
from inducekv.runtime.memory import RELEVANCE_KEY, TWIN_LOOK, gate_margin, relevance_from, twins_from  # noqa: E402
from inducekv.runtime.scoring import score  # noqa: E402
from inducekv.runtime.tasks import load_task  # noqa: E402


def ask(rt, mem, gates: dict, examples, said=(set(), {}), served=None) -> dict:
    """``gates``: task -> margin; ``said``: the subject gate (``subjects.unpack``), both of the gated bank;
    ``served``: the gated bank's memory, asked at k=4 through the runtime (``served_k4``: its gates as served,
    the entries after the first held to the subject gate too)."""
    rows = []
    twins = twins_from(mem.bank.catalog)
    for e in examples:
        ids, scores = mem.index.search(mem.bank.calibrate(mem.query_key(e.prompt)), 2 + TWIN_LOOK)
        margin = gate_margin(ids, scores, twins)                 # as the runtime measures it
        task = mem.bank.entry(mem.bank.slot_of()[int(ids[0])]).task
        named = task not in said[0] or subjects.names(subjects.words(e.prompt), said[1].get(int(ids[0])))
        opened = margin >= gates.get(task, 0.0) and named
        right = lambda **kw: float(score(rt.generate(e.prompt, max_new_tokens=16, stop=["\n"], **kw).text,
                                         e.answers)[0])
        zero, k1, k4 = right(k=0, use_memory=False), right(k=1, memory=mem), right(k=4, memory=mem)
        rows.append({"zero": zero, "k1": k1, "k4": k4, "gated_k1": k1 if opened else zero,
                     "gated_k4": k4 if opened else zero, "open": float(opened), "margin": margin,
                     "task": task, "named": named,
                     **({"served_k4": right(k=4, memory=served)} if served is not None else {})})
    mean = lambda rs, k: float(np.mean([r[k] for r in rs])) if rs else None
    keys = ("zero", "k1", "k4", "gated_k1", "gated_k4", "open") + (("served_k4",) if served is not None else ())
    out = {"n": len(rows), **{k: mean(rows, k) for k in keys}}
    known = [r for r in rows if r["zero"] == 1.0]
    out["known"] = {"n": len(known), **{k: mean(known, k) for k in keys}}
    out["rows"] = rows                     # per question: another gate rule can be read off them
    return out


def read_off(res: dict, quantiles: list[float]) -> dict:
    """What each quantile's gates would have done, from one run: the gates refitted from each
    learn's leave-one-out asks (``gate_from``), applied to the stored per-question margins.
    quantile -> {"gates": {task: margin}, question file -> {k1, open, known_k1}}."""
    out = {}
    for qt in quantiles:
        gates = {}
        for t, learned in res["learn"].items():
            asks = np.array(learned["fit"].get("asks") or np.zeros((0, 2)))
            gates[t] = gate_from(asks[:, 0], asks[:, 1], qt) if len(asks) else None
        row = {"gates": gates}
        for name, q in res["questions"].items():
            opened = [r["margin"] >= (gates.get(r["task"]) or 0.0) and r.get("named", True) for r in q["rows"]]
            got = [r["k1"] if o else r["zero"] for r, o in zip(q["rows"], opened)]
            known = [g for g, r in zip(got, q["rows"]) if r["zero"] == 1.0]
            row[name] = {"k1": float(np.mean(got)), "open": float(np.mean(opened)),
                         "known_k1": float(np.mean(known)) if known else None, "known_n": len(known)}
        out[str(qt)] = row
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--tasks", default="capitals,inventors,planets,foods,colours")
    ap.add_argument("--budget", default="64MiB")
    ap.add_argument("--questions", default=str(HERE.parent / "examples" / "known_facts.jsonl"))
    ap.add_argument("--dev", default="capitals,colours,known")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read-off", default="0.5,0.75,0.9",
                    help="quantiles whose gates are also scored, read off this run's margins (read_off)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rt = Runtime.open(args.bundle)
    res = {"learn": {}, "questions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        bank, ungated = Path(tmp) / "bank.ikv", Path(tmp) / "ungated.ikv"
        for t in args.tasks.split(","):
            r = learn_task(rt, bank, TASKS / f"{t}.train.jsonl", budget=parse_bytes(args.budget), seed=args.seed)
            res["learn"][t] = {"added": r.added, "evicted": r.evicted, "gate": r.gate.get("margin"), "fit": r.gate}
            print(f"learned {t}: {r.added} added, {r.evicted} evicted, gate {r.gate.get('margin')}", file=sys.stderr)
        shutil.copy(bank, ungated)
        with Bank.open(ungated, writable=True) as b:
            gates = relevance_from(b.catalog)
            said = subjects.unpack((b.catalog.get("extra") or {}).get(SUBJECTS_KEY))
            with b.transaction() as tx:
                tx.drop_extra(RELEVANCE_KEY)
                tx.drop_extra(SUBJECTS_KEY)
        files = {"real-world": Path(args.questions)}
        files.update({f"dev {d}": TASKS / "dev" / f"{d}.dev.jsonl" for d in args.dev.split(",") if d})
        with rt.open_memory(ungated) as mem, rt.open_memory(bank) as served:
            for name, path in files.items():
                res["questions"][name] = ask(rt, mem, gates, load_task(path), said, served)
                q = res["questions"][name]
                print(f"{name}: n={q['n']} zero {q['zero']:.3f} | ungated k1 {q['k1']:.3f} k4 {q['k4']:.3f} | gated k1 "
                      f"{q['gated_k1']:.3f} k4 {q['gated_k4']:.3f} (open {q['open']:.2f}), served k4 {q['served_k4']:.3f}; on the {q['known']['n']} the "
                      f"bare model answers: ungated k1 {q['known']['k1'] or 0:.3f}, gated {q['known']['gated_k1'] or 0:.3f}",
                      file=sys.stderr)
    res["gates"] = gates
    res["subject_gates"] = sorted(said[0])
    res["read_off"] = read_off(res, [float(x) for x in args.read_off.split(",") if x])
    for qt, row in res["read_off"].items():
        print(f"quantile {qt}: " + "; ".join(f"{name} k1 {v['k1']:.3f} (open {v['open']:.2f}"
                                            + (f", known {v['known_k1']:.3f} of {v['known_n']})" if v["known_n"] else ")")
                                            for name, v in row.items() if name != "gates"), file=sys.stderr)
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
