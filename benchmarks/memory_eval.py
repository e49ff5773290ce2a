"""Accuracy with memory vs without, per prompt template, position policy and k.

    python benchmarks/memory_eval.py --bundle bundles/default/fp32 [--tasks capitals,colours] [--n-test 30] [--json]

Every train example of each task goes into one int8 bank per template; the test
prompts ask the same facts in other words (examples/tasks, made-up facts, so the
model cannot know them). Reports accuracy (README scoring) and retrieval@1 (the
top entry is the example about the same subject).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from facts import TASKS, template_words, words
from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
from inducekv.learn import absorb
from inducekv.runtime.memory import TEMPLATES
from inducekv.runtime.scoring import score, summarize
from inducekv.runtime.tasks import load_task



_COMMON: set[str] = set()  # words of the prompt templates (filled in main): the rest names the subject


def _subject(prompt: str) -> set[str]:
    return words(prompt) - _COMMON


def _bank(plain: Runtime, path: Path, tasks: dict, template: str) -> dict[int, set]:
    """Bank with every train example; returns entry id -> subject words."""
    m = plain.manifest
    with Bank.create_for(path, 512 << 20, m, force=True, max_tokens=96) as b:
        for name, (train, _) in tasks.items():
            absorb(plain, b, train, name, strategy="all", reserve=0.0, n_anchors=0, template=template)
        ids = sorted(e.entry_id for e in b.entries())
    subjects = [_subject(ex.prompt) for train, _ in tasks.values() for ex in train]
    return dict(zip(ids, subjects))


def evaluate(rt: Runtime, tests, k, margin, subjects=None) -> dict:
    rows, hits, t0 = [], 0, time.perf_counter()
    for ex in tests:
        kw = {} if k is None else {"k": k, "k_margin": margin}
        r = rt.generate(ex.prompt, max_new_tokens=16, stop=["\n"], use_memory=k is not None, **kw)
        rows.append(score(r.text, ex.answers))
        if subjects is not None and r.entries:
            hits += bool(subjects.get(r.entries[0]["id"], set()) & _subject(ex.prompt))
    out = summarize(rows)
    out["retrieval_at_1"] = hits / len(tests) if subjects is not None else None
    out["s_per_query"] = (time.perf_counter() - t0) / len(tests)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--tasks", default="capitals,colours")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=30)
    ap.add_argument("--templates", default=",".join(TEMPLATES))
    ap.add_argument("--policies", default="rerotate,parallel")
    ap.add_argument("--ks", default="1,2,4,adaptive")
    ap.add_argument("--margin", type=float, default=0.004, help="adaptive k: keep entries within this cosine of the best")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tasks = {n: (load_task(TASKS / f"{n}.train.jsonl")[: args.n_train], load_task(TASKS / f"{n}.test.jsonl")[: args.n_test])
             for n in args.tasks.split(",")}
    _COMMON.update(template_words(ex.prompt for train, tests in tasks.values() for ex in [*train, *tests]))
    plain = Runtime.open(args.bundle)
    results = []
    for task, (_, tests) in tasks.items():
        results.append({"task": task, "memory": "none", **evaluate(plain, tests, None, None)})
    with tempfile.TemporaryDirectory() as d:
        for template in args.templates.split(","):
            path = Path(d) / f"{template}.ikv"
            subjects = _bank(plain, path, tasks, template)
            for policy in args.policies.split(","):
                with Bank.open(path, writable=True) as b, b.transaction() as tx:
                    tx.set_template({"template": asdict(TEMPLATES[template]), "policy": policy})
                rt = Runtime.open(args.bundle, memory=path)
                for ks in args.ks.split(","):
                    k, margin = (4, args.margin) if ks == "adaptive" else (int(ks), None)
                    for task, (_, tests) in tasks.items():
                        r = evaluate(rt, tests, k, margin, subjects)
                        results.append({"task": task, "memory": f"{template}/{policy}", "k": ks, **r})
                        if not args.json:
                            print(f"{task:>9} {template:>6}/{policy:<9} k={ks:<8} acc {r['accuracy']:.2f} "
                                  f"exact {r['exact']:.2f} retrieval@1 {r['retrieval_at_1']:.2f}", flush=True)
    if args.json:
        print(json.dumps({"results": results}))
        return
    for r in results:
        if r["memory"] == "none":
            print(f"{r['task']:>9} no memory: acc {r['accuracy']:.2f} exact {r['exact']:.2f}")


if __name__ == "__main__":
    main()
