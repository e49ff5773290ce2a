"""Does the VLM read its image memories? New-vocabulary image tasks, zero-shot vs with memory.

    python examples/make_image_tasks.py -o image_tasks
    python benchmarks/vlm_memory.py --bundle bundles/vlm --tasks image_tasks [--families vexcolour,parity] [--json]
        [--no-value-gates] [--no-gate] [--others colour,shape,count,digit]

For each task family (default: vexcolour, vexshape, parity, vexcount; none of them trained):
``learn_task`` puts its train file into a fresh bank (``--budget``, the learn defaults), then
every test question is answered zero-shot (k=0) and with memory at each ``--ks``
(greedy, scored like ``ikv-eval``). Also reported:

- ``retrieval@1``: the share of test questions whose top-1 entry (plain search, before the
  relevance gate) has the question's answer, i.e. shares the attribute asked about;
- ``gated``: the share answered without memory because the relevance gate closed;
- ``oracle_k1``: accuracy when the top-1 entry has the right answer (copying, apart from retrieval);
- ``reworded``: the task's test questions asked in other words (``REWORDED``, written by hand,
  not by the task generator), zero-shot and at k=1, and the share of them that got memory;
- ``others`` (``--others``, default the families the tower was trained on): with the task's bank
  open, each other family's test questions zero-shot and at k=1 (as asked, and reworded), and
  the share that got one of the task's entries: what the task's memory does to questions it
  does not answer (the do-no-harm check).
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
OTHERS = ("colour", "shape", "count", "digit")
# each family's question in other words, written by hand (not the generator's phrasing); the
# i-th test question is asked with the (i mod n)-th
REWORDED = {
    "vexcolour": ("Tell me the Vexish word for this colour.", "In the Vexish language, which colour is this?",
                  "How do you say this colour in Vexish?"),
    "vexshape": ("Tell me the Vexish word for this shape.", "In the Vexish language, what is this shape?",
                 "How do you say this shape in Vexish?"),
    "parity": ("Is the number in the picture odd or even?", "Even or odd?", "Tell me whether this digit is odd or even."),
    "vexcount": ("Using Vexish, say how many shapes you see.", "In Vexish, what is the number of shapes here?",
                 "How many figures are in the picture? Answer in Vexish."),
    "colour": ("Which colour does this figure have?", "Name the colour of the shape.", "What colour do you see?"),
    "shape": ("What is the shape in the picture?", "Which figure is drawn here?", "Name this shape."),
    "count": ("How many figures do you see?", "Count the shapes in the picture.", "What number of shapes is shown?"),
    "digit": ("Which digit is written here?", "What number do you see?", "Read this digit."),
}


def _answers_by_hash(examples) -> dict[bytes, str]:
    out = {}
    for ex in examples:
        d = {"prompt": ex.prompt, "answer": ex.answers[0], **({"image": str(ex.image)} if ex.image else {})}
        out[example_hash(d)] = ex.answers[0]
    return out


def _ask(rt, examples, k: int, reworded: tuple | None = None) -> tuple[float, float]:
    """(accuracy, share answered with memory) of ``examples`` at k (k=0: zero-shot)."""
    hits, used = [], []
    for i, ex in enumerate(examples):
        prompt = reworded[i % len(reworded)] if reworded else ex.prompt
        r = rt.generate(prompt, image=ex.image, max_new_tokens=8, k=k, stop=["\n"])
        hits.append(score(r.text, ex.answers)[0])
        used.append(bool(r.entries))
    return round(statistics.mean(hits), 3), round(statistics.mean(used), 3)


def others_check(rt, tasks: Path, others: list[str], n_test: int | None) -> dict:
    """Other families' test questions with the task's bank open: zero-shot vs k=1, as asked and
    reworded, and the share of them that got memory."""
    out = {}
    for fam in others:
        test = load_task(tasks / f"{fam}.test.jsonl", require_answer=True)[:n_test]
        row = {}
        for tag, words in (("asked", None), ("reworded", REWORDED.get(fam))):
            if tag == "reworded" and not words:
                continue
            zero, _ = _ask(rt, test, 0, words)
            k1, used = _ask(rt, test, 1, words)
            row[tag] = {"zero_shot": zero, "k1": k1, "got_memory": used}
        out[fam] = row
    return out


def run_family(bundle: Path, tasks: Path, family: str, ks: list[int], budget: int, n_test: int | None,
               value_gates: bool = True, gated: bool = True, others: list[str] = ()) -> dict:
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
        if REWORDED.get(family):
            zero, _ = _ask(rt, test, 0, REWORDED[family])
            k1, used = _ask(rt, test, 1, REWORDED[family])
            out["reworded"] = {"zero_shot": zero, "k1": k1, "got_memory": used}
        if others:
            out["others"] = others_check(rt, tasks, [f for f in others if f != family], n_test)
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
    ap.add_argument("--others", default=",".join(OTHERS),
                    help="families asked with each task's bank open, to see what its memory does to them ('' for none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from inducekv.core.cli import parse_bytes

    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for fam in args.families.split(","):
        row = run_family(args.bundle, args.tasks, fam, ks, parse_bytes(args.budget), args.n_test, not args.no_value_gates,
                         not args.no_gate, [f for f in args.others.split(",") if f])
        rows.append(row)
        print(json.dumps(row) if args.json else
              f"{fam:10s} kept {row['kept']}  zero-shot {row['zero_shot']:.2f}  "
              + "  ".join(f"k={k} {row[f'k{k}']:.2f}" for k in ks)
              + f"  retrieval@1 {row['retrieval@1']:.2f}  gated {row['gated']:.2f}"
              + (f"  copy when top-1 right {row['oracle_k1']:.2f}" if "oracle_k1" in row else "")
              + f"  value gates {row['value_gates']}"
              + (f"\n  reworded: zero-shot {row['reworded']['zero_shot']:.2f}  k=1 {row['reworded']['k1']:.2f}  "
                 f"got memory {row['reworded']['got_memory']:.2f}" if "reworded" in row else "")
              + "".join(f"\n  {f} {tag}: zero-shot {v['zero_shot']:.2f}  k=1 {v['k1']:.2f}  got memory {v['got_memory']:.2f}"
                        for f, r in row.get("others", {}).items() for tag, v in r.items()), flush=True)
    if not args.json:
        print(f"{len(rows)} families, bundle {args.bundle}", file=sys.stderr)


if __name__ == "__main__":
    main()
