"""Learn tasks in order into one capped bank; accuracy matrix per selection strategy.

    python benchmarks/learn_sequence.py --bundle bundles/default/fp32 [--tasks capitals,inventors,planets]
        [--budget 16MiB] [--strategies full,random,fifo,likelihood,coverage,no-anchors] [--n-test 30] [--json]

Train examples are the facts the test files ask about (examples/tasks; made-up facts,
zero-shot accuracy ~0), so a kept entry can answer a test question and a lost one
cannot. The cap holds about a third of all candidates. Every strategy starts from
the same candidate encodings (phase 1 runs once per task) and the same seed.
Rows: after learning task t; columns: accuracy on task j (README scoring, k=1).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from facts import TASKS, template_words, words
from inducekv import learn as L
from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
from inducekv.core.cli import parse_bytes
from inducekv.runtime.memory import Layout, template_from
from inducekv.runtime.scoring import score
from inducekv.runtime.session import KeyEncoder
from inducekv.runtime.tasks import load_task



def load(name: str, n_test: int):
    """(train, test): the train examples about the subjects the first ``n_test`` test prompts ask."""
    train_all, test = load_task(TASKS / f"{name}.train.jsonl"), load_task(TASKS / f"{name}.test.jsonl")[:n_test]
    common = template_words(e.prompt for e in [*train_all, *load_task(TASKS / f"{name}.test.jsonl")])
    asked = {w for e in test for w in words(e.prompt) - common}
    train = [e for e in train_all if words(e.prompt) - common & asked]
    return train, test


def accuracy(rt: Runtime, test) -> float:
    return float(np.mean([score(rt.generate(e.prompt, max_new_tokens=16, k=1, stop=["\n"]).text, e.answers)[0]
                          for e in test]))


def run(bundle: str, tasks: dict, budget: int, strategies: list[str], seed: int, work: Path) -> dict:
    plain = Runtime.open(bundle)
    m = plain.manifest
    probe = work / "probe.ikv"
    with Bank.create_for(probe, budget, m, max_tokens=96) as b:
        layout = Layout(plain, *template_from(None))
        keys = KeyEncoder(plain.bundle_dir, m, plain.profile)
        t = time.perf_counter()
        cands = {n: L.encode_candidates(plain, b.geo, layout, keys, train, progress=False) for n, (train, _) in tasks.items()}
        encode_s = {n: (time.perf_counter() - t) / len(tasks) for n in tasks}
    zero = {n: float(np.mean([score(plain.generate(e.prompt, max_new_tokens=16, stop=["\n"]).text, e.answers)[0]
                              for e in test])) for n, (_, test) in tasks.items()}
    out = {"zero_shot": zero, "encode_s_per_task": encode_s, "strategies": {}}
    names = list(tasks)
    for strategy in strategies:
        path = work / f"{strategy}.ikv"
        matrix, phase = [], []
        with Bank.create_for(path, budget, m, force=True, max_tokens=96) as bank:
            for i, n in enumerate(names):
                plan = L.absorb(plain, bank, tasks[n][0], n, strategy=strategy, seed=seed, candidates=cands[n])
                phase.append(plan.timings)
                rt = Runtime.open(bundle, memory=path)
                matrix.append([accuracy(rt, tasks[names[j]][1]) if j <= i else None for j in range(len(names))])
                print(f"{strategy:>10} after {n:<10} " + " ".join("  -  " if a is None else f"{a:.2f} " for a in matrix[-1])
                      + f"  entries {bank.tasks()}", flush=True)
        final = matrix[-1]
        avg = float(np.mean(final))
        forgetting = float(np.mean([max(matrix[t][j] for t in range(j, len(names) - 1)) - final[j]
                                    for j in range(len(names) - 1)])) if len(names) > 1 else 0.0
        out["strategies"][strategy] = {"matrix": matrix, "final_avg": avg, "forgetting": forgetting,
                                       "avg_incremental": float(np.mean([np.mean([a for a in row if a is not None])
                                                                          for row in matrix])),
                                       "timings": phase}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--tasks", default="capitals,inventors,planets")
    ap.add_argument("--budget", default="16MiB")
    ap.add_argument("--strategies", default="full,random,fifo,likelihood,coverage,no-anchors")
    ap.add_argument("--n-test", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tasks = {n: load(n, args.n_test) for n in args.tasks.split(",")}
    with tempfile.TemporaryDirectory() as d:
        res = run(args.bundle, tasks, parse_bytes(args.budget), args.strategies.split(","), args.seed, Path(d))
    if args.json:
        print(json.dumps(res))
        return
    print("\nzero-shot: " + ", ".join(f"{n} {a:.2f}" for n, a in res["zero_shot"].items()))
    print(f"{'strategy':>10} {'final avg':>9} {'forgetting':>10} {'avg incr':>9}")
    for s, r in res["strategies"].items():
        print(f"{s:>10} {r['final_avg']:>9.3f} {r['forgetting']:>10.3f} {r['avg_incremental']:>9.3f}")


if __name__ == "__main__":
    main()
