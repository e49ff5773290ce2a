"""Continual-learning benchmark: inducekv vs baselines at matched byte caps.

    python benchmarks/continual/run.py --text-bundle bundles/default/fp32 --vlm-bundle bundles/vlm \\
        [--quick] [--sequences text,vqa,domain] [--caps 4MiB,16MiB,64MiB] [--seed 0] [--out results/continual] [--json]
        [--methods unbounded-fp16,inducekv,random,fifo,prompt-retrieval,lora,replay,experts] [--merge]

Sequences (task data generated with ``--seed``; train and test disjoint):
- ``text``: task-incremental made-up facts (examples/tasks: capitals, inventors, planets, foods).
- ``vqa``: continual VQA on the default VLM: vexcolour, vexshape, parity, side (never trained).
- ``domain``: domain-incremental, the same colour question on clean, noisy, inverted images.
- ``long``: ten made-up fact tasks (each kind of ``text`` plus colours, twice, about fresh
  names each time; ``examples/make_tasks.py write_long``), ``--n-test`` facts per task, each
  stated once for training and asked once in test: "learns forever in a fixed footprint".
- ``value``: made-up facts whose examples differ in value (``examples/make_value_tasks.py``):
  duplicates, facts the model knows, terse vs verbose statements, label noise; ``--n-test``
  facts per task, every statement of them trained.

Protocol: tasks are learned in order into one memory; after each, every seen task's test
set is answered (k=1, greedy): accuracy matrix; final average accuracy, average
incremental accuracy, forgetting, backward transfer; median time to first token.

Methods at each cap: inducekv (``ikv-learn``'s default selection), random, fifo (bank
strategies), prompt-retrieval (raw examples, same cap, re-encoded per query), sequential
LoRA (peft, all linear layers, fp16 adapter bytes <= the cap; ``lora.py``), LoRA with a
replay buffer and per-task LoRA experts chosen by a key router (adapter + buffer or router
bytes <= the cap; ``lora_plus.py``), and, once per sequence, zero-shot and an unbounded fp16
bank (upper bound). Results: ``--out``/
``results.md``, ``results.json`` and PNG plots.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent / "examples"))

import methods as M  # noqa: E402
from facts import TASKS, template_words, words  # noqa: E402
from inducekv.core.cli import parse_bytes  # noqa: E402
from inducekv.learn.select import DEFAULT_STRATEGY  # noqa: E402
from inducekv.runtime.scoring import score  # noqa: E402
from inducekv.runtime.tasks import load_task  # noqa: E402

SEQUENCES = {
    "text": {"bundle": "text", "tasks": ["capitals", "inventors", "planets", "foods"]},
    "vqa": {"bundle": "vlm", "tasks": ["vexcolour", "vexshape", "parity", "side"]},
    "domain": {"bundle": "vlm", "tasks": ["colour", "colour@noisy", "colour@inverted"]},
    "value": {"bundle": "text", "tasks": ["dup-inventors", "known-capitals", "verbose-planets", "noisy-colours"]},
    "long": {"bundle": "text", "tasks": [f"{k}-{r}" for r in (1, 2) for k in
                                         ("capitals", "inventors", "colours", "planets", "foods")]},
}
BANK_METHODS = {"inducekv": DEFAULT_STRATEGY, "random": "random", "fifo": "fifo"}   # inducekv: ikv-learn's default
ABLATIONS = {   # inducekv with one part of the selection or the gate removed, or added (not run unless named)
    "inducekv-full": ("full", True),   # + anchor retention + coverage: the paper's objective, the default before 2026-12-03
    "inducekv-no-likelihood": ("no-likelihood", True), "inducekv-no-coverage": ("no-coverage", True),   # of "full"
    "inducekv-no-anchors": ("no-anchors", True), "inducekv-no-gate": (DEFAULT_STRATEGY, False),
    "inducekv-likelihood-only": ("likelihood", True),   # the held-out value alone: = inducekv on 2026-12-03 only
    "inducekv-likelihood-fill": ("likelihood-fill", True),   # ... then the room left free filled: = inducekv since 2026-12-03 (later)
    "inducekv-no-per-byte": ("no-per-byte", True),   # greedy on value per entry, not per byte
    "inducekv-balanced": ("balanced", True),         # every task's attainable value scaled to the same
    "inducekv-global-scale": ("global-scale", True),  # every task's gains in one unit (the default before 2026-12)
    "inducekv-no-value-gates": (DEFAULT_STRATEGY, True),   # the per-layer value gates not fitted (learn/calibrate.py)
    "inducekv-no-subjects": (DEFAULT_STRATEGY, True),      # the relevance gate without its subject gate (runtime/subjects.py)
    "inducekv-keep-known": (DEFAULT_STRATEGY, True),       # examples the bare model already answers written too (learn/value.py)
}


def text_task(name: str, n_train: int, n_test: int, seed: int):
    """(train, test): test = a seeded sample of the test file; train = the train facts about
    the subjects those test questions ask (up to n_train), so a kept entry can answer."""
    rng = np.random.default_rng([seed, len(name)])
    train_all, test_all = load_task(TASKS / f"{name}.train.jsonl"), load_task(TASKS / f"{name}.test.jsonl")
    test = [test_all[i] for i in sorted(rng.permutation(len(test_all))[:n_test])]
    common = template_words(e.prompt for e in [*train_all, *test_all])
    asked = {w for e in test for w in words(e.prompt) - common}
    train = [e for e in train_all if words(e.prompt) - common & asked][:n_train]
    return train, test


def image_task(name: str, n_train: int, n_test: int, seed: int, work: Path):
    from make_image_tasks import write_task

    family, _, domain = name.partition("@")
    out = work / "image_tasks"
    return (load_task(write_task(out, name, family, n_train, "train", seed, domain or "clean")),
            load_task(write_task(out, name, family, n_test, "test", seed, domain or "clean")))


def value_task(name: str, n_train: int, n_test: int, seed: int, work: Path):
    """(train, test) of a value-differing task (``examples/make_value_tasks.py``, this seed):
    about ``n_test`` facts (test: one question per fact; train: every statement of those facts)."""
    from make_value_tasks import write_all

    n_facts = max(n_test, 2)
    out = work / f"value_tasks-{seed}-{n_facts}"
    if not (out / f"{name}.train.jsonl").is_file():
        write_all(out, seed, n_facts)
    return load_task(out / f"{name}.train.jsonl"), load_task(out / f"{name}.test.jsonl")


def long_task(name: str, n_test: int, seed: int, work: Path):
    """(train, test) of one task of the long sequence (``examples/make_tasks.py write_long``,
    this seed): ``n_test`` made-up facts, each stated once in train and asked once in test."""
    from make_tasks import write_long

    out = work / f"long_tasks-{seed}-{n_test}"
    if not (out / f"{name}.train.jsonl").is_file():
        write_long(out, seed, n_test)
    return load_task(out / f"{name}.train.jsonl"), load_task(out / f"{name}.test.jsonl")


def evaluate(method, test) -> tuple[float, list[float], list[bool], list[str]]:
    """(accuracy, TTFTs, each question right or not, each answer's text)."""
    if hasattr(method, "answer_all"):    # LoRA: batched in torch; TTFT = the zero-shot model's
        texts, ttfts = method.answer_all(test), [method.ttft(ex) for ex in test]
    else:
        texts, ttfts = zip(*(method.answer(ex) for ex in test))
    hits = [bool(score(t, ex.answers)[0]) for t, ex in zip(texts, test)]
    return float(np.mean(hits)), list(ttfts), hits, list(texts)


def metrics(matrix: list[list[float | None]]) -> dict:
    T = len(matrix)
    final = matrix[-1]
    out = {"final_avg": float(np.mean(final)),
           "avg_incremental": float(np.mean([np.mean([a for a in row if a is not None]) for row in matrix]))}
    if T > 1:
        out["forgetting"] = float(np.mean([max(matrix[t][j] for t in range(j, T - 1)) - final[j] for j in range(T - 1)]))
        out["bwt"] = float(np.mean([final[j] - matrix[j][j] for j in range(T - 1)]))
    else:
        out["forgetting"] = out["bwt"] = 0.0
    return out


def run_method(method, tasks: dict, cands: dict, log) -> dict:
    names = list(tasks)
    matrix, ttfts, learn_s, eval_s, final_hits, final_texts = [], [], [], 0.0, {}, {}
    for i, n in enumerate(names):
        t = time.perf_counter()
        method.learn(n, tasks[n][0], cands[n])
        learn_s.append(time.perf_counter() - t)
        row = []
        for j in range(len(names)):
            if j > i:
                row.append(None)
                continue
            t = time.perf_counter()
            acc, tt, hits, texts = evaluate(method, tasks[names[j]][1])
            eval_s += time.perf_counter() - t
            row.append(acc)
            if i == len(names) - 1:
                final_hits[names[j]] = hits
                final_texts[names[j]] = texts   # what each question got: a loss can be traced without a rerun
            ttfts += tt
        matrix.append(row)
        held = method.entries() if hasattr(method, "entries") else {}
        log(f"  {method.name:>16} after {n:<16} " + " ".join("  -  " if a is None else f"{a:.2f} " for a in row)
            + (f"  kept {held}" if held else "") + (f"; {method.gate_note}" if getattr(method, "gate_note", None) else ""))
    return {"matrix": matrix, **metrics(matrix), "median_ttft_ms": statistics.median(ttfts),
            "mean_ttft_ms": statistics.fmean(ttfts),
            "learn_s": learn_s, "eval_s": eval_s, "final_hits": final_hits,
            "final_texts": final_texts}


ALL_METHODS = ("unbounded-fp16", "inducekv", "random", "fifo", "prompt-retrieval", "lora", "replay", "experts")
# run unless --methods says otherwise: replay and experts roughly double a run's time (--quick 7.7 -> ~17 min)
DEFAULT_METHODS = ALL_METHODS[:6]
TORCH_METHODS = ("lora", "replay", "experts")   # trained with torch + peft (lora.py, lora_plus.py)
TIERED = {"source": ("source", None), "source-ungated": ("source", None),
          **{f"tiered-{b}": ("tiered", b) for b in ("1.6x", "1.8x", "2.0x")}}
# issue 19's kinds (not run unless named): a source bank, and tiered banks at mean-TTFT budgets (x the
# no-memory TTFT, whose chat prefix is cached: runtime/prefix.py); any ``tiered-<budget>`` (``1.7x``, ``90ms``)
# runs. Which budgets tell anything depends on what each kind costs: on text (2-core Xeon), one kv entry
# ~1.5x, one source entry ~2.1x (the retrieval-key pass alone ~0.35x).


def tiered_spec(name: str) -> tuple[str, str | None] | None:
    """(kinds, budget) of a tiered method name (``source``, ``tiered-1.7x``), else None."""
    if name in TIERED:
        return TIERED[name]
    if name.startswith("tiered-"):
        from inducekv.learn.tiers import Budget

        try:
            Budget.parse(name[len("tiered-"):])
        except Exception:
            return None
        return "tiered", name[len("tiered-"):]
    return None


KNOWN_METHODS = ALL_METHODS + tuple(ABLATIONS) + tuple(TIERED)


def build_tasks(seq: str, bundle: str, n_train: int, n_test: int, seed: int, work: Path) -> dict:
    """{task: (train, test)} of a sequence, in order (task data generated with ``seed``)."""
    spec = SEQUENCES[seq]
    if seq == "value":
        return {n: value_task(n, n_train, n_test, seed, work) for n in spec["tasks"]}
    if seq == "long":
        return {n: long_task(n, n_test, seed, work) for n in spec["tasks"]}
    if spec["bundle"] == "text":
        return {n: text_task(n, n_train, n_test, seed) for n in spec["tasks"]}
    return {n: image_task(n, n_train, n_test, seed, work) for n in spec["tasks"]}


def run_sequence(seq: str, bundle: str, caps: list[int], n_train: int, n_test: int, seed: int, work: Path, log,
                 methods=DEFAULT_METHODS, lora_epochs: int | None = None) -> dict:
    """Zero-shot, then each of ``methods`` (unbounded once; the rest at every cap)."""
    t0 = time.perf_counter()
    tasks = build_tasks(seq, bundle, n_train, n_test, seed, work)
    log(f"[{seq}] {len(tasks)} tasks: " + ", ".join(f"{n} ({len(a)} train / {len(b)} test)" for n, (a, b) in tasks.items()))
    res = {"tasks": list(tasks), "encode_s": 0.0, "caps": {}, "n_train": n_train, "n_test": n_test,
           "sizes": {n: [len(a), len(b)] for n, (a, b) in tasks.items()}}   # as built (a task file may hold fewer)
    cands = {n: None for n in tasks}
    if set(methods) - set(TORCH_METHODS):   # the bank methods and prompt retrieval use the candidates
        t = time.perf_counter()
        cands = M.encode(bundle, work, {n: tr for n, (tr, _) in tasks.items()})
        res["encode_s"] = time.perf_counter() - t
        log(f"[{seq}] encoded candidates once in {res['encode_s']:.0f} s")
    zero = M.ZeroShot(bundle)
    res["zero-shot"] = run_method(zero, tasks, cands, log)
    if "unbounded-fp16" in methods:
        res["unbounded-fp16"] = run_method(
            M.BankMethod("unbounded-fp16", bundle, work / f"{seq}-unbounded.ikv", 1 << 30, "full", scheme="fp16",
                         reserve=0.0, seed=seed), tasks, cands, log)
    for cap in caps:
        log(f"[{seq}] cap {cap / 2 ** 20:g} MiB")
        per = {}
        bank_methods = {**{n: (s, True) for n, s in BANK_METHODS.items()}, **ABLATIONS}
        for name, (strategy, gated) in bank_methods.items():
            if name in methods:
                per[name] = run_method(M.BankMethod(name, bundle, work / f"{seq}-{name}-{cap}.ikv", cap, strategy,
                                                    seed=seed, gated=gated,
                                                    value_gates=not name.endswith("-no-value-gates"),
                                                    subjects=not name.endswith("-no-subjects"),
                                                    known_out=not name.endswith("-keep-known")), tasks, cands, log)
        for name in (m for m in methods if tiered_spec(m) is not None):
            kinds, budget = tiered_spec(name)
            method = M.TieredMethod(name, bundle, work / f"{seq}-{name}-{cap}.ikv", cap, kinds, budget, seed=seed,
                                    gated=not name.endswith("-ungated"))   # ungated: no relevance gate (an ablation)
            per[name] = run_method(method, tasks, cands, log)
            if method.served:   # the serve check after each learn (learn/tiers.served)
                per[name]["served"] = method.served
        if "prompt-retrieval" in methods:
            per["prompt-retrieval"] = run_method(M.PromptRetrieval(bundle, cap, seed), tasks, cands, log)
        for name in (m for m in TORCH_METHODS if m in methods):
            from lora import SequentialLoRA
            from lora_plus import ExpertLoRA, ReplayLoRA

            kind = {"lora": SequentialLoRA, "replay": ReplayLoRA, "experts": ExpertLoRA}[name]
            method = kind(M.runtime(bundle), cap, zero.ttft, seed, epochs=lora_epochs)
            per[name] = run_method(method, tasks, cands, log)
            per[name].update(**method.entries(), train_s=method.train_s)
            del method
        res["caps"][str(cap)] = per
    res["wall_s"] = time.perf_counter() - t0
    return res


def merge(old: dict, new: dict) -> dict:
    """``new``'s methods laid over an earlier results.json of the same settings."""
    for k in ("seed", "quick"):
        if old.get(k) != new.get(k):
            raise SystemExit(f"--merge: the earlier results have {k}={old.get(k)!r}, this run {new.get(k)!r}")
    if not set(new.get("caps", [])) <= set(old.get("caps", [])):   # a rerun of some of the caps is fine
        raise SystemExit(f"--merge: the earlier results have caps {old.get('caps')!r}, this run {new.get('caps')!r}")
    for seq, r in new["sequences"].items():
        o = old["sequences"].setdefault(seq, r)
        if o is r:
            continue
        if (o["n_train"], o["n_test"], o["tasks"]) != (r["n_train"], r["n_test"], r["tasks"]):
            raise SystemExit(f"--merge: sequence {seq} has different tasks or sizes in the earlier results")
        if "unbounded-fp16" in r:
            o["unbounded-fp16"] = r["unbounded-fp16"]
        for cap, per in r["caps"].items():
            o["caps"].setdefault(cap, {}).update(per)
        o.setdefault("runs", []).append({"methods": sorted({m for per in r["caps"].values() for m in per}),
                                         "wall_s": r["wall_s"]})
    old["merged_wall_s"] = old.get("merged_wall_s", []) + [new["wall_s"]]
    old.update({k: v for k, v in new.items() if k == "lora_epochs" and v})
    return old


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-bundle", default="bundles/default/fp32")
    ap.add_argument("--vlm-bundle", default="bundles/vlm")
    ap.add_argument("--sequences", default="text,vqa,domain")
    ap.add_argument("--caps", default=None, help="comma-separated byte caps (default 4MiB,16MiB,64MiB; --quick 2MiB,8MiB)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 4 train / 2 test per task, caps 2MiB,8MiB, LoRA 3 epochs (numbers not meaningful)")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/continual"))
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated methods to run (zero-shot always runs), of {', '.join(KNOWN_METHODS)}; "
                         "lora, replay and experts need torch + peft")
    ap.add_argument("--merge", action="store_true",
                    help="lay this run's methods over --out/results.json from an earlier run of the same seed and sizes "
                         "(this run's --caps may be some of the earlier ones)")
    ap.add_argument("--lora-epochs", type=int, default=None, help="LoRA epochs per task (default 12; --quick 3)")
    args = ap.parse_args(argv)
    caps = [parse_bytes(c) for c in (args.caps or ("2MiB,8MiB" if args.quick else "4MiB,16MiB,64MiB")).split(",")]
    n_train = args.n_train or (4 if args.quick else 24)
    n_test = args.n_test or (2 if args.quick else 12)
    if args.quick:
        M.N_ANCHORS = 4
    seqs = [s for s in args.sequences.split(",") if s]
    for s in seqs:
        if s not in SEQUENCES:
            ap.error(f"unknown sequence {s!r}; choose from {', '.join(SEQUENCES)}")
    bundles = {"text": args.text_bundle, "vlm": args.vlm_bundle}
    for s in seqs:
        if not (Path(bundles[SEQUENCES[s]["bundle"]]) / "manifest.json").is_file():
            ap.error(f"sequence {s} needs the {SEQUENCES[s]['bundle']} bundle at {bundles[SEQUENCES[s]['bundle']]} "
                     f"(ikv-export {'default' if SEQUENCES[s]['bundle'] == 'text' else 'default-vlm'} -o ...)")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in KNOWN_METHODS and tiered_spec(m) is None:
            ap.error(f"unknown method {m!r}; choose from {', '.join(KNOWN_METHODS)}")
    if set(methods) & set(TORCH_METHODS):
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            ap.error("the LoRA baselines (lora, replay, experts) need torch and peft: pip install -e '.[export,bench]' "
                     "(or leave them out of --methods)")
    if args.merge and not (args.out / "results.json").is_file():
        ap.error(f"--merge: no earlier results at {args.out / 'results.json'}")
    lora_epochs = args.lora_epochs or (3 if args.quick else None)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    t0 = time.time()
    results = {"seed": args.seed, "quick": args.quick, "caps": caps, "sequences": {},
               "lora_epochs": (lora_epochs or 12) if set(methods) & set(TORCH_METHODS) else None}
    with tempfile.TemporaryDirectory() as d:
        for s in seqs:
            results["sequences"][s] = run_sequence(s, bundles[SEQUENCES[s]["bundle"]], caps, n_train, n_test,
                                                   args.seed, Path(d), log, methods, lora_epochs)
    results["wall_s"] = time.time() - t0
    if args.merge:
        results = merge(json.loads((args.out / "results.json").read_text()), results)
    from report import write_report

    summary = write_report(results, args.out)
    if args.json:
        print(json.dumps(summary))
    else:
        print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
