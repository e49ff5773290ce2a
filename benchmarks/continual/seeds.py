"""Mean and spread over seeds of continual-benchmark runs (one ``run.py --seed S --out DIR`` each).

    python benchmarks/continual/seeds.py results/continual/value/seed0 results/continual/value/seed1 ... \\
        [--sequence value] [--out results/continual/value/seeds.md]

Prints, per cap and method, the final average accuracy of each seed, their mean and
standard deviation, and the difference to random and FIFO measured on the same seeds
(``mean (min..max)`` of the per-seed differences: the same task data, so paired) and the
accuracy on the questions the bare model answers, pooled over seeds (``known``); then the
mean accuracy over the tasks seen so far after each task (the long sequence's curve).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(dirs: list[Path], sequence: str) -> dict[int, dict]:
    """seed -> that run's results for ``sequence``."""
    out = {}
    for d in dirs:
        f = d / "results.json"
        if not f.is_file():
            raise SystemExit(f"no results.json in {d}")
        r = json.loads(f.read_text())
        if sequence not in r["sequences"]:
            raise SystemExit(f"{f} has no sequence {sequence!r} (it has {', '.join(r['sequences'])})")
        if r["seed"] in out:
            raise SystemExit(f"seed {r['seed']} appears twice ({d})")
        out[r["seed"]] = r["sequences"][sequence]
    return out


def table(runs: dict[int, dict]) -> list[str]:
    seeds = sorted(runs)
    caps = sorted({c for r in runs.values() for c in r["caps"]}, key=int)
    lines = ["| cap | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd | - random | - FIFO | known |",
             "|---|---|" + "---|" * (len(seeds) + 5)]
    zero = [runs[s]["zero-shot"]["final_avg"] for s in seeds]
    lines.append("| - | zero-shot | " + " | ".join(f"{z:.3f}" for z in zero) + f" | {statistics.mean(zero):.3f} | "
                 f"{statistics.pstdev(zero):.3f} | | | {known(runs, seeds, lambda r: r['zero-shot'])} |")
    for cap in caps:
        methods = sorted({m for s in seeds for m in runs[s]["caps"].get(cap, {})})
        for m in methods:
            got = {s: runs[s]["caps"][cap][m]["final_avg"] for s in seeds if m in runs[s]["caps"].get(cap, {})}
            cells = [f"{got[s]:.3f}" if s in got else "-" for s in seeds]
            vals = list(got.values())
            diff = []
            for base in ("random", "fifo"):
                d = [got[s] - runs[s]["caps"][cap][base]["final_avg"] for s in got if base in runs[s]["caps"][cap]]
                diff.append(f"{statistics.mean(d):+.3f} ({min(d):+.3f}..{max(d):+.3f})" if d and m != base else "")
            lines.append(f"| {int(cap) / 2 ** 20:g} MiB | {m} | " + " | ".join(cells) + f" | {statistics.mean(vals):.3f} | "
                         f"{statistics.pstdev(vals):.3f} | {diff[0]} | {diff[1]} | "
                         f"{known(runs, list(got), lambda r: r['caps'][cap][m])} |")
    return lines


def known(runs: dict[int, dict], seeds: list[int], pick) -> str:
    """Do no harm, pooled over ``seeds``: the final accuracy on the test questions the bare
    model answers (zero-shot right), and how many such questions there are."""
    hits = []
    for s in seeds:
        zero, run = runs[s]["zero-shot"].get("final_hits", {}), pick(runs[s]).get("final_hits", {})
        hits += [h for t, zs in zero.items() for h, z in zip(run.get(t, []), zs) if z]
    return f"{sum(hits) / len(hits):.2f} ({len(hits)})" if hits else "-"


def curves(runs: dict[int, dict]) -> list[str]:
    """Per cap and method: the mean over seeds of the accuracy over the tasks seen so far after
    each task (row means of the accuracy matrix), with the number of seeds behind it."""
    seeds = sorted(runs)
    T = len(runs[seeds[0]]["tasks"])
    lines = ["| cap | method | seeds | " + " | ".join(str(i + 1) for i in range(T)) + " |", "|---|---|---|" + "---|" * T]

    def rows(v):
        return [sum(a for a in row if a is not None) / sum(a is not None for a in row) for row in v["matrix"]]

    zero = [rows(runs[s]["zero-shot"]) for s in seeds]
    lines.append("| - | zero-shot | " + f"{len(zero)} | " + " | ".join(f"{statistics.mean(c):.2f}" for c in zip(*zero)) + " |")
    for cap in sorted({c for r in runs.values() for c in r["caps"]}, key=int):
        for m in sorted({m for s in seeds for m in runs[s]["caps"].get(cap, {})}):
            got = [rows(runs[s]["caps"][cap][m]) for s in seeds if m in runs[s]["caps"].get(cap, {})]
            lines.append(f"| {int(cap) / 2 ** 20:g} MiB | {m} | {len(got)} | "
                         + " | ".join(f"{statistics.mean(c):.2f}" for c in zip(*got)) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="--out folders of run.py, one per seed")
    ap.add_argument("--sequence", default="value")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    runs = load(args.dirs, args.sequence)
    text = "\n".join([f"# {args.sequence}: final average accuracy over seeds {', '.join(map(str, sorted(runs)))}", ""]
                     + table(runs) + ["", "Mean accuracy over the tasks seen so far, after each task (mean over seeds):", ""]
                     + curves(runs)) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
