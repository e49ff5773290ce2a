"""Does the VLM read its image memories? New-vocabulary image tasks, zero-shot vs with memory.

    python examples/make_image_tasks.py -o image_tasks
    python benchmarks/vlm_memory.py --bundle bundles/vlm --tasks image_tasks [--families vexcolour,parity] [--json]
        [--no-value-gates] [--no-gate]

For each task family (default: vexcolour, vexshape, parity, vexcount; none of them trained):
``learn_task`` puts its train file into a fresh bank (``--budget``, the learn defaults), then
every test question is answered zero-shot (k=0) and with memory at each ``--ks``
(greedy, scored like ``ikv-eval``). Also reported:

- ``retrieval@1``: the share of test questions whose top-1 entry (plain search, before the
  relevance gate) has the question's answer, i.e. shares the attribute asked about;
- ``gated``: the share answered without memory because the relevance gate closed;
- ``oracle_k1``: accuracy when the top-1 entry has the right answer (copying, apart from retrieval).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from inducekv.learn import learn_task
from inducekv.memory.bank import Bank, example_hash
from inducekv.runtime import Runtime
from inducekv.runtime.memory import Memory, image_of
from inducekv.runtime.scoring import score
from inducekv.runtime.tasks import load_task

FAMILIES = ("vexcolour", "vexshape", "parity", "vexcount")


def _answers_by_hash(examples) -> dict[bytes, str]:
    out = {}
    for ex in examples:
        d = {"prompt": ex.prompt, "answer": ex.answers[0], **({"image": str(ex.image)} if ex.image else {})}
        out[example_hash(d)] = ex.answers[0]
    return out


def run_family(bundle: Path, tasks: Path, family: str, ks: list[int], budget: int, n_test: int | None,
               value_gates: bool = True, gated: bool = True) -> dict:
    train = load_task(tasks / f"{family}.train.jsonl", require_answer=True)
    test = load_task(tasks / f"{family}.test.jsonl", require_answer=True)[:n_test]
    with tempfile.TemporaryDirectory() as tmp:
        bank_path = Path(tmp) / "bank.ikv"
        rt = Runtime.open(bundle)
        t0 = time.perf_counter()
        res = learn_task(rt, bank_path, tasks / f"{family}.train.jsonl", budget=budget, value_gates=value_gates,
                         gated=gated)
        learn_s = time.perf_counter() - t0
        rt = Runtime.open(bundle, memory=bank_path)
        bank = Bank.open(bank_path)
        answer_of = _answers_by_hash(train)
        entry_answer = {e.entry_id: answer_of.get(bytes(e.example_hash)) for e in bank.entries()}
        mem = Memory(rt, bank)
        out = {"family": family, "kept": res.added, "learn_s": round(learn_s, 1), "n_test": len(test),
               "value_gates": res.value_gates.get("groups") if res.value_gates_kept else None,
               "gate_margin": res.gate.get("margin"), "gate_harmful": res.gate.get("harmful")}
        hits = {k: [] for k in [0, *ks]}
        top_right, gated, ttft = [], [], {k: [] for k in ks}
        for ex in test:
            q = bank.calibrate(mem.query_key(ex.prompt, image_of(rt, ex)))
            ids, _ = mem.index.search(q, 1)
            top_right.append(entry_answer.get(int(ids[0])) in ex.answers)
            for k in [0, *ks]:
                r = rt.generate(ex.prompt, image=ex.image, max_new_tokens=8, k=k, stop=["\n"])
                hits[k].append(score(r.text, ex.answers)[0])
                if k:
                    ttft[k].append(r.timings.ttft_ms)
                if k == 1:
                    gated.append(not r.entries)
        out["zero_shot"] = statistics.mean(hits[0])
        for k in ks:
            out[f"k{k}"] = statistics.mean(hits[k])
            out[f"ttft_ms_k{k}"] = round(statistics.median(ttft[k]), 1)
        out["retrieval@1"] = statistics.mean(top_right)
        out["gated"] = statistics.mean(gated)
        if 1 in ks and any(top_right):
            out["oracle_k1"] = statistics.mean(h for h, t in zip(hits[1], top_right) if t)
        mem.close()
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--tasks", type=Path, required=True, help="directory from examples/make_image_tasks.py")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--ks", default="1,4")
    ap.add_argument("--budget", default="64MiB")
    ap.add_argument("--n-test", type=int, default=None, help="first N test questions (default: all)")
    ap.add_argument("--no-value-gates", action="store_true", help="learn without fitting the per-layer value gates")
    ap.add_argument("--no-gate", action="store_true",
                    help="learn without the relevance gate (every query gets memory), to see what the gate costs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from inducekv.core.cli import parse_bytes

    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for fam in args.families.split(","):
        row = run_family(args.bundle, args.tasks, fam, ks, parse_bytes(args.budget), args.n_test, not args.no_value_gates,
                         not args.no_gate)
        rows.append(row)
        print(json.dumps(row) if args.json else
              f"{fam:10s} kept {row['kept']}  zero-shot {row['zero_shot']:.2f}  "
              + "  ".join(f"k={k} {row[f'k{k}']:.2f}" for k in ks)
              + f"  retrieval@1 {row['retrieval@1']:.2f}  gated {row['gated']:.2f}"
              + (f"  copy when top-1 right {row['oracle_k1']:.2f}" if "oracle_k1" in row else "")
              + f"  value gates {row['value_gates']}", flush=True)
    if not args.json:
        print(f"{len(rows)} families, bundle {args.bundle}", file=sys.stderr)


if __name__ == "__main__":
    main()
