"""Does an entry's value predict its use? Two ways of reading the answer, tested on paraphrases.

    python benchmarks/value_use.py --bundle bundles/default/fp32 [--tasks capitals,inventors,planets,foods]
        [--n 24] [--seed 0] [--data-seed 7] [--json]

The tasks are made afresh by ``examples/make_tasks.py --seed DATA_SEED`` (default 7), not read
from ``examples/tasks`` (seed 0, whose test questions report accuracies): this measures a
design choice, so it stays off the test files.

Per task, every training example becomes an entry of one bank (strategy ``all``: no
selection, no relevance or value gates; the default compacted 4-bit entries), each test
question, phrased differently from training, is answered at k=1 (greedy, README scoring),
and the entry it retrieved is credited with that answer. Each stored entry's value is its
answer's gain (mean log p per answer token, with the entry in memory minus without) on its
own training prompt, read two ways:

    first     the answer as the reply's first tokens (``ikv-learn`` before 2026-12-04)
    lead-in   the answer after the template's lead-in, "The answer is" (``learn/value.py``
              ``value_scorer``: a model that copies an entry writes its answer there)

Printed per task: the questions whose retrieved entry states the asked fact ("on fact"), how
many of those are answered right, and for each reading the accuracy on those questions whose
entry's value is in the upper vs the lower half of the task's values, and the AUC of the value
for a right answer (0.5: no information). Pooled: the AUC of each entry's value rank within its
task (selection compares values within a task: ``learn/select.py`` counts each task in its own unit).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu, rankdata

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "continual"), str(HERE.parent / "examples")]

import methods as M  # noqa: E402
import run  # noqa: E402
from inducekv.learn.candidates import Scorer, lead_of, unpack  # noqa: E402
from inducekv.memory.bank import Bank, example_hash  # noqa: E402
from inducekv.runtime.memory import Layout, template_from  # noqa: E402
from inducekv.runtime.scoring import score  # noqa: E402


def auc(values: np.ndarray, right: np.ndarray) -> float | None:
    """P(value of a right answer's entry > value of a wrong one's), ties half; None without both."""
    if right.all() or not right.any():
        return None
    return float(mannwhitneyu(values[right], values[~right]).statistic / (right.sum() * (~right).sum()))


def halves(values: np.ndarray, right: np.ndarray) -> tuple[float, float]:
    """Accuracy of the questions whose entry's value is above the median, and at or below it."""
    hi = values > np.median(values)
    return (float(right[hi].mean()) if hi.any() else float("nan"),
            float(right[~hi].mean()) if (~hi).any() else float("nan"))


def cells(d: dict) -> str:
    a = "    -" if d["auc"] is None else f"{d['auc']:5.2f}"
    return f"{d['hi_half']:.2f} / {d['lo_half']:.2f}".rjust(20) + " " + a


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="bundles/default/fp32")
    ap.add_argument("--tasks", default="capitals,inventors,planets,foods")
    ap.add_argument("--n", type=int, default=24, help="test questions per task (train: the facts they ask)")
    ap.add_argument("--seed", type=int, default=0, help="which test questions (a seeded sample)")
    ap.add_argument("--data-seed", type=int, default=7, help="examples/make_tasks.py's seed for the task data")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rt = M.runtime(args.bundle)
    out = {"bundle": args.bundle, "n": args.n, "seed": args.seed, "data_seed": args.data_seed, "tasks": {}}
    pooled = {"first": [], "lead": [], "right": []}
    print(f"{'task':10s} {'on fact':>8s} {'right':>6s} | {'first: hi / lo half':>20s} {'AUC':>5s} | "
          f"{'lead-in: hi / lo half':>22s} {'AUC':>5s}")
    with tempfile.TemporaryDirectory() as work:
        run.TASKS = Path(work) / "tasks"     # ``run.text_task`` reads its tasks from there
        subprocess.run([sys.executable, str(HERE.parent / "examples" / "make_tasks.py"), "--out", str(run.TASKS),
                        "--seed", str(args.data_seed)], check=True, stdout=subprocess.DEVNULL)
        for name in args.tasks.split(","):
            train, test = run.text_task(name, args.n, args.n, args.seed)
            cands = M.encode(args.bundle, Path(work), {name: train})
            bm = M.BankMethod(name, args.bundle, Path(work) / f"{name}.ikv", 64 << 20, "all", seed=args.seed,
                              gated=False, value_gates=False, subjects=False, known_out=False)
            bm.learn(name, train, cands[name])
            with Bank.open(bm.path) as bank:
                g, key_scale = bank.geo, bank.key_scales()
                layout = Layout(rt, *template_from(bank.catalog.get("template")))
                first, lead = Scorer(rt, layout), Scorer(rt, layout, lead=lead_of(layout.template))
                by_hash = {example_hash({"prompt": ex.prompt, "answer": ex.answers[0]}): ex for ex in train}
                value = {}   # entry id -> (answer, first gain, lead-in gain)
                for e in bank.entries():
                    ex = by_hash[e.example_hash]
                    kv = unpack(g, bank.read_payload(e.slot, e.entry_id)[0], e.tokens, key_scale)
                    gains = [s.logp(ex.prompt, ex.answers[0], [kv]) - s.logp(ex.prompt, ex.answers[0], [])
                             for s in (first, lead)]
                    value[e.entry_id] = (ex.answers[0], *gains)
            rows = []   # (first, lead, right) of the questions whose entry states the asked fact
            n_right = 0
            for ex in test:
                r = rt.generate(ex.prompt, max_new_tokens=M.MAX_NEW, k=1, stop=["\n"], memory=bm.memory)
                right = bool(score(r.text, ex.answers)[0])
                n_right += right
                top = r.entries[0]["id"] if r.entries else None
                if top in value and value[top][0] in ex.answers:
                    rows.append((value[top][1], value[top][2], right))
            bm.memory.close()
            v = np.array(rows, np.float64).reshape(-1, 3)
            right = v[:, 2].astype(bool)
            res = {"questions": len(test), "right": n_right, "on_fact": len(rows), "on_fact_right": int(right.sum())}
            for i, key in ((0, "first"), (1, "lead")):
                hi, lo = halves(v[:, i], right) if len(v) else (float("nan"),) * 2
                res[key] = {"hi_half": hi, "lo_half": lo, "auc": auc(v[:, i], right),
                            "mean_gain": float(v[:, i].mean()) if len(v) else None}
                pooled[key] += list(rankdata(v[:, i]) / max(len(v), 1))
            pooled["right"] += list(right)
            out["tasks"][name] = res
            print(f"{name:10s} {len(rows):>8d} {int(right.sum()):>6d} | {cells(res['first'])} | {cells(res['lead'])}",
                  flush=True)
    right = np.array(pooled["right"], bool)
    out["pooled_auc"] = {k: auc(np.array(pooled[k]), right) for k in ("first", "lead")}
    print("pooled AUC of the within-task value rank: " +
          ", ".join(f"{k} {a:.3f}" if a is not None else f"{k} -" for k, a in out["pooled_auc"].items()))
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
