"""``ikv-run``: answer prompts with a bundle on the device."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from inducekv.core.cli import fail_on_bad_input, progress_enabled
from inducekv.runtime.sampling import DEFAULT_MAX_NEW_TOKENS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", type=click.Path(), help="Bundle directory from ikv-export (required).")
@click.option("--memory", type=click.Path(), default=None, help="Memory bank (.ikv) to retrieve from.")
@click.option("--k", type=click.IntRange(0, 64), default=None,
              help="Memory entries per query (default: the device profile's; 0 = none).")
@click.option("--no-memory", is_flag=True, help="Ignore --memory: answer with the plain chat prompt.")
@click.option("--prompt", help="One prompt to answer.")
@click.option("--task", "task", type=click.Path(), help="A JSONL file of prompts to answer, one per line.")
@click.option("--image", type=click.Path(), default=None, help="Image for --prompt (multimodal bundles).")
@click.option("--max-new-tokens", type=click.IntRange(1, 1 << 20), default=DEFAULT_MAX_NEW_TOKENS, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 100), default=0.0, show_default=True,
              help="0 = greedy decoding.")
@click.option("--top-k", type=click.IntRange(0, None), default=0, show_default=True, help="0 = no top-k cut.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling (same seed, same text).")
@click.option("--system", default=None, help="System prompt (default: the chat template's).")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--device", default="cpu", show_default=True, help="Device profile name or .toml path.")
@click.option("--list-devices", is_flag=True,
              help="List the device profiles and the execution providers this machine has, then exit.")
@click.option("--uses", "uses_path", type=click.Path(), default=None, metavar="USES.json",
              help="Add which memory entries this run served to this uses record (created when absent), for "
                   "ikv-learn --promote.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per answer (text, timings, entries).")
def cli(bundle, memory, k, no_memory, prompt, task, image, max_new_tokens, temperature, top_k, top_p, seed, system,
        stop, device, list_devices, uses_path, quiet, as_json):
    """Answer --prompt TEXT, or every prompt of --task FILE.jsonl, with a bundle.

    \b
    Examples:
      ikv-run --bundle bundles/default/fp32 --prompt "What is the capital of France?"
      ikv-run --bundle bundles/default/fp32 --task examples/questions.jsonl --json
      ikv-run --bundle bundles/default/fp32 --memory bank.ikv --k 1 --prompt "Which city is Dikrodor's capital?"
      ikv-run --list-devices
    """
    logging.basicConfig(level=logging.WARNING)
    if list_devices:
        with fail_on_bad_input():
            _list_devices(as_json)
        return
    if bundle is None:
        ctx = click.get_current_context()
        raise click.MissingParameter(ctx=ctx, param=next(p for p in ctx.command.params if p.name == "bundle"))
    with fail_on_bad_input():
        if (prompt is None) == (task is None):
            from inducekv.core.errors import InduceKVError
            raise InduceKVError("pass exactly one of --prompt TEXT or --task FILE.jsonl")
        from inducekv.runtime.api import Result, Runtime
        from inducekv.runtime.tasks import load_task

        if uses_path is not None and (memory is None or no_memory):
            from inducekv.core.errors import InduceKVError
            raise InduceKVError("--uses records what a memory bank served; pass --memory BANK.ikv too")
        rt = Runtime.open(bundle, memory=None if no_memory else memory, device=device)
        if uses_path is not None:
            from inducekv.memory import uses as uses_
            if Path(uses_path).exists():
                uses_.read(uses_path)   # a bad record fails before any work
        opts = dict(max_new_tokens=max_new_tokens, k=k, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, stop=list(stop), system=system)
        if prompt is not None:
            res = Result("", [], "length")
            live = not as_json and sys.stdout.isatty()
            for piece in rt.stream(prompt, image=image, result=res, **opts):
                if live:
                    click.echo(piece, nl=False)
            _report(res, prompt, as_json, echoed=live)
            if uses_path is not None:
                rt.memory.save_uses(uses_path)
            return
        examples = load_task(task, require_answer=False)
        from tqdm.auto import tqdm
        for ex in tqdm(examples, desc="ikv-run", unit="prompt", disable=not progress_enabled(quiet)):
            res = rt.generate(ex.prompt, image=ex.image, **opts)
            _report(res, ex.prompt, as_json, echoed=False)
        if uses_path is not None:
            rt.memory.save_uses(uses_path)


def _report(res, prompt: str, as_json: bool, echoed: bool):
    t = res.timings
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "text": res.text, "stop_reason": res.stop_reason,
                               "entries": res.entries, "timings": t.as_dict()}))
        return
    if not echoed:
        click.echo(res.text)
    else:
        click.echo()
    if res.entries:
        click.echo("[memory: " + ", ".join(f"#{e['id']} {e['task']} ({e['score']:.2f})" for e in res.entries) + "]", err=True)
    click.echo(f"[{t.prompt_tokens} prompt tokens, {t.new_tokens} new; ttft {t.ttft_ms:.0f} ms, "
               f"{t.tokens_per_s:.1f} tok/s]", err=True)


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


def _list_devices(as_json: bool):
    from inducekv.devices.profile import describe_profiles, machine_summary

    here, rows = machine_summary(), describe_profiles()
    if as_json:
        click.echo(json.dumps({**here, "profiles": rows}))
        return
    from inducekv.kernels.kvquant import scheme_for_bits

    table = [("profile", "threads", "providers, in order", "used here", "weights", "kv", "compact", "k", "budget",
              "target")]
    table += [(r["name"], str(r["intra_op_threads"]), ", ".join(map(_short, r["execution_providers"])),
               ", ".join(map(_short, r["uses_here"])), r["weights"], scheme_for_bits(r["kv_bits"]),
               f"perlayer {r['keep']:g}" if r["compact"] == "perlayer" else "none", str(r["k"]),
               r["default_budget"], r["description"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    click.echo(f"this machine: {here['machine']}, onnxruntime {here['onnxruntime']}, providers "
               + ", ".join(map(_short, here["available_providers"]))
               + "; a profile's missing providers fall back to the next, with one warning line")


def main():
    sys.exit(cli.main(standalone_mode=True))
