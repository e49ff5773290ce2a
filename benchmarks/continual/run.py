"""Continual-learning benchmark: inducekv vs baselines at matched byte caps.

    python benchmarks/continual/run.py --text-bundle bundles/default/fp32 --vlm-bundle bundles/vlm \\
        [--quick] [--sequences text,vqa,domain] [--caps 4MiB,16MiB,64MiB] [--seed 0] [--out results/continual] [--json]

Sequences (task data generated with ``--seed``; train and test disjoint):
- ``text``: task-incremental made-up facts (examples/tasks: capitals, inventors, planets, foods).
- ``vqa``: continual VQA on the default VLM: vexcolour, vexshape, parity, side (never trained).
- ``domain``: domain-incremental, the same colour question on clean, noisy, inverted images.

Protocol: tasks are learned in order into one memory; after each, every seen task's test
set is answered (k=1, greedy): accuracy matrix; final average accuracy, average
incremental accuracy, forgetting, backward transfer; median time to first token.

Methods at each cap: inducekv (``ikv-learn``'s full selection), random, fifo (bank
strategies), prompt-retrieval (raw examples, same cap, re-encoded per query), sequential
LoRA (peft, all linear layers, fp16 adapter bytes <= the cap; ``lora.py``), and, once per
sequence, zero-shot and an unbounded fp16 bank (upper bound). Results: ``--out``/
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
from inducekv.runtime.cliutil import parse_bytes  # noqa: E402
from inducekv.runtime.scoring import score  # noqa: E402
from inducekv.runtime.tasks import load_task  # noqa: E402

SEQUENCES = {
    "text": {"bundle": "text", "tasks": ["capitals", "inventors", "planets", "foods"]},
    "vqa": {"bundle": "vlm", "tasks": ["vexcolour", "vexshape", "parity", "side"]},
    "domain": {"bundle": "vlm", "tasks": ["colour", "colour@noisy", "colour@inverted"]},
}
BANK_METHODS = {"inducekv": "full", "random": "random", "fifo": "fifo"}


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


def evaluate(method, test) -> tuple[float, list[float]]:
    if hasattr(method, "answer_all"):    # LoRA: batched in torch; TTFT = the zero-shot model's
        texts, ttfts = method.answer_all(test), [method.ttft(ex) for ex in test]
    else:
        texts, ttfts = zip(*(method.answer(ex) for ex in test))
    return float(np.mean([score(t, ex.answers)[0] for t, ex in zip(texts, test)])), list(ttfts)


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
    matrix, ttfts, learn_s = [], [], []
    for i, n in enumerate(names):
        t = time.perf_counter()
        method.learn(n, tasks[n][0], cands[n])
        learn_s.append(time.perf_counter() - t)
        row = []
        for j in range(len(names)):
            if j > i:
                row.append(None)
                continue
            acc, tt = evaluate(method, tasks[names[j]][1])
            row.append(acc)
            ttfts += tt
        matrix.append(row)
        held = method.entries() if hasattr(method, "entries") else {}
        log(f"  {method.name:>16} after {n:<16} " + " ".join("  -  " if a is None else f"{a:.2f} " for a in row)
            + (f"  kept {held}" if held else ""))
    return {"matrix": matrix, **metrics(matrix), "median_ttft_ms": statistics.median(ttfts),
            "learn_s": learn_s}


def run_sequence(seq: str, bundle: str, caps: list[int], n_train: int, n_test: int, seed: int, work: Path, log,
                 with_lora: bool = True, lora_epochs: int | None = None) -> dict:
    spec = SEQUENCES[seq]
    if spec["bundle"] == "text":
        tasks = {n: text_task(n, n_train, n_test, seed) for n in spec["tasks"]}
    else:
        tasks = {n: image_task(n, n_train, n_test, seed, work) for n in spec["tasks"]}
    log(f"[{seq}] {len(tasks)} tasks: " + ", ".join(f"{n} ({len(a)} train / {len(b)} test)" for n, (a, b) in tasks.items()))
    t = time.perf_counter()
    cands = M.encode(bundle, work, {n: tr for n, (tr, _) in tasks.items()})
    encode_s = time.perf_counter() - t
    log(f"[{seq}] encoded candidates once in {encode_s:.0f} s")
    res = {"tasks": list(tasks), "encode_s": encode_s, "caps": {}, "n_train": n_train, "n_test": n_test}
    zero = M.ZeroShot(bundle)
    res["zero-shot"] = run_method(zero, tasks, cands, log)
    res["unbounded-fp16"] = run_method(
        M.BankMethod("unbounded-fp16", bundle, work / f"{seq}-unbounded.ikv", 1 << 30, "full", scheme="fp16",
                     reserve=0.0, seed=seed), tasks, cands, log)
    for cap in caps:
        log(f"[{seq}] cap {cap / 2 ** 20:g} MiB")
        per = {}
        for name, strategy in BANK_METHODS.items():
            per[name] = run_method(M.BankMethod(name, bundle, work / f"{seq}-{name}-{cap}.ikv", cap, strategy, seed=seed),
                                   tasks, cands, log)
        per["prompt-retrieval"] = run_method(M.PromptRetrieval(bundle, cap, seed), tasks, cands, log)
        if with_lora:
            from lora import SequentialLoRA

            method = SequentialLoRA(M.runtime(bundle), cap, zero.ttft, seed, epochs=lora_epochs)
            per["lora"] = run_method(method, tasks, cands, log)
            per["lora"].update(rank=method.rank, adapter_bytes=method.adapter_bytes, train_s=method.train_s)
            del method
        res["caps"][str(cap)] = per
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-bundle", default="bundles/default/fp32")
    ap.add_argument("--vlm-bundle", default="bundles/vlm")
    ap.add_argument("--sequences", default="text,vqa,domain")
    ap.add_argument("--caps", default=None, help="comma-separated byte caps (default 4MiB,16MiB,64MiB; --quick 2MiB,4MiB,8MiB)")
    ap.add_argument("--quick", action="store_true", help="small tasks: 6 train / 3 test per task, a smoke run")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/continual"))
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--no-lora", action="store_true", help="skip the sequential LoRA baseline (needs torch + peft)")
    ap.add_argument("--lora-epochs", type=int, default=None, help="LoRA epochs per task (default 12; --quick 4)")
    args = ap.parse_args(argv)
    caps = [parse_bytes(c) for c in (args.caps or ("2MiB,4MiB,8MiB" if args.quick else "4MiB,16MiB,64MiB")).split(",")]
    n_train = args.n_train or (6 if args.quick else 24)
    n_test = args.n_test or (3 if args.quick else 12)
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
    if not args.no_lora:
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            ap.error("the LoRA baseline needs torch and peft: pip install -e '.[export,bench]' "
                     "(or pass --no-lora)")
    lora_epochs = args.lora_epochs or (4 if args.quick else None)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    t0 = time.time()
    results = {"seed": args.seed, "quick": args.quick, "caps": caps, "sequences": {},
               "lora_epochs": None if args.no_lora else (lora_epochs or 12)}
    with tempfile.TemporaryDirectory() as d:
        for s in seqs:
            results["sequences"][s] = run_sequence(s, bundles[SEQUENCES[s]["bundle"]], caps, n_train, n_test,
                                                   args.seed, Path(d), log, not args.no_lora, lora_epochs)
    results["wall_s"] = time.time() - t0
    from report import write_report

    summary = write_report(results, args.out)
    if args.json:
        print(json.dumps(summary))
    else:
        print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
