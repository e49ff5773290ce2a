"""``ikv-eval``: answer every example of a task file and score the answers."""
from __future__ import annotations

import json
import logging
import statistics
import sys

import click

from inducekv.core.cli import fail_on_bad_input, progress_enabled


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(), help="Bundle directory from ikv-export.")
@click.option("--memory", type=click.Path(), default=None, help="Memory bank (.ikv) to retrieve from (default: none).")
@click.option("--task", required=True, type=click.Path(), help="JSONL task file; every line needs an answer.")
@click.option("--k", type=click.IntRange(0, 64), default=None,
              help="Memory entries per query (default: the device profile's; 0 = none).")
@click.option("--max-new-tokens", type=click.IntRange(1, 1 << 20), default=24, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Device profile name or .toml path.")
@click.option("--uses", "uses_path", type=click.Path(), default=None, metavar="USES.json",
              help="Add which memory entries this run served to this uses record (created when absent), for "
                   "ikv-learn --promote.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: scores, median TTFT, per-example rows.")
def cli(bundle, memory, task, k, max_new_tokens, device, uses_path, quiet, as_json):
    """Answer every example of --task FILE.jsonl (greedy) and report accuracy and exact match.

    Only the first non-empty line of each answer is scored, after normalising
    (lower-case, collapsed spaces, punctuation dropped at the ends). accuracy:
    an expected answer occurs in it as whole words ("The capital of Vexland is
    Morrow." is correct for "Morrow"); exact: it equals an expected answer.

    \b
    Examples:
      ikv-eval --bundle bundles/default/fp32 --task examples/tasks/capitals.test.jsonl
      ikv-eval --bundle bundles/default/fp32 --memory bank.ikv --k 1 --task examples/tasks/capitals.test.jsonl --json
    """
    logging.basicConfig(level=logging.WARNING)
    with fail_on_bad_input():
        from tqdm.auto import tqdm

        from inducekv.runtime.api import Runtime
        from inducekv.runtime.scoring import first_line, score, summarize
        from inducekv.runtime.tasks import load_task

        examples = load_task(task, require_answer=True)
        if uses_path is not None:
            from pathlib import Path

            from inducekv.core.errors import InduceKVError
            from inducekv.memory import uses as uses_
            if memory is None:
                raise InduceKVError("--uses records what a memory bank served; pass --memory BANK.ikv too")
            if Path(uses_path).exists():
                uses_.read(uses_path)   # a bad record fails before any work
        rt = Runtime.open(bundle, memory=memory, device=device)
        rows, ttfts = [], []
        for ex in tqdm(examples, desc="ikv-eval", unit="example", disable=not progress_enabled(quiet)):
            res = rt.generate(ex.prompt, image=ex.image, max_new_tokens=max_new_tokens, k=k)
            correct, exact = score(res.text, ex.answers)
            ttfts.append(res.timings.ttft_ms)
            rows.append({"line": ex.line, "prompt": ex.prompt, "answers": list(ex.answers),
                         "generated": first_line(res.text).strip(), "correct": correct, "exact": exact,
                         "entries": res.entries})
        if uses_path is not None:
            rt.memory.save_uses(uses_path)
    summary = summarize((r["correct"], r["exact"]) for r in rows)
    summary["median_ttft_ms"] = statistics.median(ttfts)
    if as_json:
        click.echo(json.dumps({**summary, "task": str(task), "bundle": str(bundle), "memory": memory,
                               "k": 0 if memory is None else rt.profile.k if k is None else k, "examples": rows}))
        return
    n = summary["n"]
    n_correct, n_exact = sum(r["correct"] for r in rows), sum(r["exact"] for r in rows)
    click.echo(f"task         {task}\n"
               f"n            {n}\n"
               f"accuracy     {summary['accuracy']:.3f}  ({n_correct}/{n})\n"
               f"exact        {summary['exact']:.3f}  ({n_exact}/{n})\n"
               f"median TTFT  {summary['median_ttft_ms']:.0f} ms")


def main():
    sys.exit(cli.main(standalone_mode=True))
