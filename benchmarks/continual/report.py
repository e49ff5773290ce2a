"""Tables and plots for ``run.py``'s results: results.md, results.json, *.png."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

CAPPED = ("inducekv", "random", "fifo", "prompt-retrieval", "lora", "replay", "experts")


def _ordered(per: dict) -> list[str]:
    """The capped methods of one cap in table order: the main ones, then ablations as run."""
    return [m for m in CAPPED if m in per] + [m for m in per if m not in CAPPED]
ONCE = ("zero-shot", "unbounded-fp16")


def _mib(cap) -> str:
    return f"{int(cap) / 2 ** 20:.3g} MiB"


def _known(run: dict, zero: dict) -> str:
    """Do no harm: final accuracy on the test questions the bare model answers, and how
    many there are ("-": none, or results from before per-question hits were kept)."""
    pairs = [(h, z) for t, zs in zero.get("final_hits", {}).items()
             for h, z in zip(run.get("final_hits", {}).get(t, []), zs)]
    known = [h for h, z in pairs if z]
    return f"{sum(known) / len(known):.2f} ({len(known)})" if known else "-"


def summary(results: dict) -> dict:
    """Per sequence and method (capped methods per cap): final avg, forgetting, median TTFT."""
    out = {"seed": results["seed"], "quick": results["quick"], "wall_s": round(results["wall_s"], 1), "sequences": {}}
    for seq, r in results["sequences"].items():
        rows = {}
        for m in (m for m in ONCE if m in r):
            rows[m] = {k: round(r[m][k], 4) for k in ("final_avg", "forgetting", "bwt", "avg_incremental", "median_ttft_ms")}
        for cap, per in r["caps"].items():
            for m, v in per.items():
                rows[f"{m}@{_mib(cap)}"] = {k: round(v[k], 4) for k in
                                            ("final_avg", "forgetting", "bwt", "avg_incremental", "median_ttft_ms")}
        out["sequences"][seq] = rows
    return out


def _curves(r: dict, cap: str) -> dict[str, list[float]]:
    """Per method (zero-shot, the capped ones at ``cap``, unbounded): the mean accuracy over the
    tasks seen so far after each task (row means of the accuracy matrix)."""
    runs = [("zero-shot", r["zero-shot"])] + [(m, r["caps"][cap][m]) for m in _ordered(r["caps"][cap])] \
        + [(m, r[m]) for m in ONCE[1:] if m in r]
    return {m: [sum(a for a in row if a is not None) / sum(a is not None for a in row) for row in v["matrix"]]
            for m, v in runs}


def markdown(results: dict) -> str:
    lines = [f"# Continual-learning benchmark (seed {results['seed']}{', quick' if results['quick'] else ''})", "",
             f"Wall time {results['wall_s'] / 60:.1f} min"
             + "".join(f" + {w / 60:.1f} min (merged run)" for w in results.get("merged_wall_s", []))
             + (f"; LoRA {results['lora_epochs']} epochs per task" if results.get("lora_epochs") else "")
             + ". Accuracy is README scoring (answer in the first line), "
             "k=1, greedy. Forgetting: mean drop from a task's best to its final accuracy; BWT: final minus "
             "just-learned accuracy.", ""]
    for seq, r in results["sequences"].items():
        sizes = {tuple(v) for v in r.get("sizes", {}).values()} or {(r["n_train"], r["n_test"])}
        per_task = (f"up to {r['n_train']} train / {r['n_test']} test per task" if len(sizes) != 1
                    else "{} train / {} test per task".format(*sizes.pop()))
        lines += [f"## {seq}: {', '.join(r['tasks'])} ({per_task})", "",
                  "| method | cap | final avg acc | known | avg incremental | forgetting | BWT | median TTFT ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in (m for m in ONCE if m in r):
            v = r[m]
            lines.append(f"| {m} | {'-' if m == 'zero-shot' else 'unbounded'} | {v['final_avg']:.3f} | "
                         f"{_known(v, r['zero-shot'])} | "
                         f"{v['avg_incremental']:.3f} | {v['forgetting']:.3f} | {v['bwt']:.3f} | {v['median_ttft_ms']:.0f} |")
        for cap, per in r["caps"].items():
            for m in _ordered(per):
                v = per[m]
                lines.append(f"| {m} | {_mib(cap)} | {v['final_avg']:.3f} | {_known(v, r['zero-shot'])} | "
                             f"{v['avg_incremental']:.3f} | "
                             f"{v['forgetting']:.3f} | {v['bwt']:.3f} | {v['median_ttft_ms']:.0f} |")
        lines += ["", "Known: final accuracy on the test questions the bare model answers (zero-shot right); "
                  "do no harm means ~1.00 there."]
        lines.append("")
        cap = list(r["caps"])[-1]
        curves = _curves(r, cap)
        lines += [f"Average accuracy over the tasks seen so far, after each task ({_mib(cap)}):", "",
                  "| method | " + " | ".join(f"{i + 1}" for i in range(len(r["tasks"]))) + " |",
                  "|---|" + "---|" * len(r["tasks"])]
        lines += [f"| {m} | " + " | ".join(f"{a:.2f}" for a in c) + " |" for m, c in curves.items()]
        lines.append("")
        lines += [f"Accuracy matrices at {_mib(cap)} (row: after learning task i; column: task j):", ""]
        for m in _ordered(r["caps"][cap]):
            lines.append(f"- {m}: " + " / ".join(" ".join("-" if a is None else f"{a:.2f}" for a in row)
                                                  for row in r["caps"][cap][m]["matrix"]))
        lines.append("")
    return "\n".join(lines) + "\n"


def _save(fig, out: Path, name: str) -> str:
    """Lay out, write ``out/name`` and close ``fig``; returns the name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    for seq, r in results["sequences"].items():
        cap = list(r["caps"])[-1]
        mats = [("zero-shot", r["zero-shot"])] + [(m, r["caps"][cap][m]) for m in _ordered(r["caps"][cap])] + [(m, r[m]) for m in ONCE[1:] if m in r]
        fig, axes = plt.subplots(1, len(mats), figsize=(3 * len(mats), 3.2), squeeze=False)
        for ax, (m, v) in zip(axes[0], mats):
            a = np.array([[np.nan if x is None else x for x in row] for row in v["matrix"]])
            ax.imshow(a, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(m if m in ONCE else f"{m}\n{_mib(cap)}", fontsize=9)
            ax.set_xticks(range(len(r["tasks"])), r["tasks"], rotation=60, fontsize=7)
            ax.set_yticks(range(len(r["tasks"])), r["tasks"], fontsize=7)
            for i in range(a.shape[0]):
                for j in range(a.shape[1]):
                    if not np.isnan(a[i, j]):
                        ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        files.append(_save(fig, out, f"{seq}_matrices.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        for m, c in _curves(r, cap).items():
            ax.plot(range(1, len(c) + 1), c, marker="o", label=m, linestyle=":" if m in ONCE else "-")
        ax.set_xlabel("tasks learned")
        ax.set_ylabel("mean accuracy over the tasks seen")
        ax.set_ylim(0, 1)
        ax.set_title(f"{seq}: after each task, {_mib(cap)}")
        ax.legend(fontsize=7)
        files.append(_save(fig, out, f"{seq}_after_each.png"))

        caps = [int(c) for c in r["caps"]]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for m in (m for m in CAPPED if m in r["caps"][str(caps[0])]):
            a1.plot([c / 2 ** 20 for c in caps], [r["caps"][str(c)][m]["final_avg"] for c in caps], marker="o", label=m)
            a2.scatter([r["caps"][str(c)][m]["median_ttft_ms"] for c in caps],
                       [r["caps"][str(c)][m]["final_avg"] for c in caps], label=m)
        for m, style in ((m, st) for m, st in (("zero-shot", ":"), ("unbounded-fp16", "--")) if m in r):
            a1.axhline(r[m]["final_avg"], linestyle=style, color="grey", label=m)
            a2.scatter([r[m]["median_ttft_ms"]], [r[m]["final_avg"]], marker="x", label=m)
        a1.set_xscale("log", base=2)
        a1.set_xlabel("cap (MiB)")
        a1.set_ylabel("final average accuracy")
        a1.set_title(f"{seq}: accuracy vs budget")
        a2.set_xlabel("median time to first token (ms)")
        a2.set_ylabel("final average accuracy")
        a2.set_title(f"{seq}: TTFT vs accuracy (all caps)")
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        files.append(_save(fig, out, f"{seq}_budget_ttft.png"))
    return files


def write_report(results: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    s = summary(results)
    if importlib.util.find_spec("matplotlib") is None:   # the tables are written: no traceback at the end
        print("plots skipped: matplotlib is not installed (pip install -e \".[bench]\")", file=sys.stderr)
        s["plots"] = []
        return s
    s["plots"] = plots(results, out)
    return s
