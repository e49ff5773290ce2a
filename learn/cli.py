"""``ikv-learn``: absorb a task into a memory bank on the device, inside its byte cap.

A thin command over ``learn.api.learn_task`` (the call an app makes): it parses the options,
opens the bundle, learns, and prints the ``LearnResult``."""
from __future__ import annotations

import json
import logging
import time

import click

from inducekv.core.alloc import keep_large_frees_off_heap
from inducekv.core.cli import ByteSize, fail_on_bad_input, progress_enabled
from inducekv.kernels.kvquant import DENSE
from inducekv.learn.defaults import (COMPACT_KEEP as DEFAULT_KEEP, COMPACT_METHODS as METHODS,
                                     COMPACT_SLOTS as DEFAULT_SLOTS, N_ANCHORS, RESERVE, SCORE_BATCH)
from inducekv.learn.select import DEFAULT_STRATEGY, STRATEGIES


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(), help="Bundle directory from ikv-export.")
@click.option("--memory", required=True, type=click.Path(), help="Bank file (.ikv); created when absent.")
@click.option("--task", "task_path", default=None, type=click.Path(),
              help="Task file: JSONL of {prompt, answer}. Required, except with --promote.")
@click.option("--name", default=None, help="Task name (default: the file name up to its first dot).")
@click.option("--budget", type=ByteSize(), default=None,
              help="Byte cap of a new bank, e.g. 16MiB (default: the device profile's). Ignored for an existing bank.")
@click.option("--device", default="cpu", show_default=True, help="Device profile name or .toml path.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for held-out splits and anchors.")
@click.option("--strategy", type=click.Choice(STRATEGIES),
              default=DEFAULT_STRATEGY, show_default=True,
              help="Selection rule: likelihood-fill (the default: entries kept by held-out value per byte, then any "
                   "room left filled with the rest, old entries first), likelihood (the same without the fill), full "
                   "(held-out value plus anchor retention of old tasks and key coverage: the paper's objective), "
                   "random and fifo (baselines), the rest ablations.")
@click.option("--scheme", type=click.Choice(DENSE), default=None,
              help="Payload quantization of a new bank (default: the device profile's kv_bits).")
@click.option("--anchors", "n_anchors", type=click.IntRange(0, 64), default=N_ANCHORS, show_default=True,
              help="Examples of this task kept in the bank to guard it against forgetting.")
@click.option("--reserve", type=click.FloatRange(0.0, 0.9), default=RESERVE, show_default=True,
              help="Fraction of the bank left free after the learn. With 0 a task may use the whole cap: when its "
                   "entries need the pages of the evicted ones, evictions are committed first (a kill in between "
                   "leaves the bank verified, with the old entries minus the evictions).")
@click.option("--compact", type=click.Choice(METHODS), default=None,
              help="Entry compaction: perlayer (each layer keeps its most-attended share --keep of the tokens, "
                   "in place), genv (the answer span + the tokens the model's own answer attends to most), or "
                   "none (full entries). Default: the bank's method; perlayer for a new bank when the bundle "
                   "has a probe graph and the scheme is fp16/k8v8/k4v8/k4v4, else none.")
@click.option("--keep", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help=f"Share of an entry's tokens each layer keeps with --compact perlayer (default: the bank's; "
                   f"{DEFAULT_KEEP} for a new bank).")
@click.option("--slots", type=click.IntRange(1, 4096), default=None,
              help=f"Tokens kept per entry with --compact genv (default: the bank's; {DEFAULT_SLOTS} for a new bank).")
@click.option("--gate/--no-gate", default=True, show_default=True,
              help="Fit this task's relevance gate: a query whose top-1 entry of this task does not stand out "
                   "from the top-2 (retrieval margin below the fitted one) is answered without memory. Not fitted "
                   "when leaving an example out rarely hurts. For an image task the gate tests the question "
                   "instead: its entries are injected only when the question is nearer to the task's own "
                   "than to other tasks' and everyday questions; a text task's fact entries also get a subject "
                   "gate (injected only for queries naming the entry's subject). --no-gate suits a bank that serves only this "
                   "task's kind of question: ungated entries are also injected into unrelated questions.")
@click.option("--value-gates/--no-value-gates", default=True, show_default=True,
              help="Fit this task's value gates: one scale (0.5-2) per third of the layers on the values injected "
                   "from its entries, kept only when it raises the held-out likelihood of the task's answers as "
                   "its entries word them.")
@click.option("--kinds", type=click.Choice(("kv", "tiered", "source")), default="kv", show_default=True,
              help="Entry kinds of a new bank: kv (compact K/V, fastest), source (each example's own bytes, "
                   "re-encoded when retrieved: ~20x more examples per byte), or tiered (both, mixed to keep "
                   "--ttft-budget). Ignored for an existing bank.")
@click.option("--slot-share", type=click.FloatRange(0.02, 0.95), default=None,
              help="A new tiered bank's share of the cap in slots (default: sized for --ttft-budget's mix of kinds). "
                   "For promotion on use, give slots for every example you expect (~3.4 KiB each) and leave the "
                   "rest as pages for kv copies, and learn without --ttft-budget (every example kept as source).")
@click.option("--ttft-budget", default=None, metavar="BUDGET",
              help="Tiered banks: the mean time to first token allowed with memory, as a multiple of the "
                   "no-memory TTFT (1.3x) or in milliseconds (120ms), measured on this device. Default: the "
                   "bank's; none: every example that has a slot is kept as source.")
@click.option("--promote", "promote_uses", default=None, type=click.Path(), metavar="USES.json",
              help="Instead of learning a task: maintain a bank with source entries by how it was used. The "
                   "examples served most often (USES.json, written by ikv-run/ikv-eval --uses or an app's "
                   "Memory.save_uses) get a kv copy, the least used lose theirs, within the pages the bank has free "
                   "and, with a latency budget (--ttft-budget or the bank's), no more copies than it takes to meet it. "
                   "No example is dropped.")
@click.option("--min-uses", type=click.IntRange(1, None), default=2, show_default=True,
              help="With --promote: the fewest queries an example must have been the top entry for to get a kv copy.")
@click.option("--batch", type=click.IntRange(1, 64), default=SCORE_BATCH, show_default=True,
              help="Examples per decoder pass while encoding and scoring: larger is faster, 1 uses the least RAM.")
@click.option("--dry-run", is_flag=True, help="Print the budget plan; write nothing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cli(bundle, memory, task_path, name, budget, device, seed, strategy, scheme, n_anchors, reserve, compact, keep, gate,
        value_gates, slots, kinds, slot_share, ttft_budget, promote_uses, min_uses, batch, dry_run, quiet, as_json):
    """Learn the examples of --task into the bank --memory without changing the model.

    \b
    Examples:
      ikv-learn --bundle bundles/default/fp32 --memory bank.ikv --task examples/tasks/capitals.train.jsonl --budget 16MiB
      ikv-learn --bundle bundles/default/fp32 --memory bank.ikv --task examples/tasks/colours.train.jsonl --dry-run
      ikv-learn --bundle bundles/default/fp32 --memory tiered.ikv --task examples/tasks/capitals.train.jsonl --budget 1MiB --kinds tiered --ttft-budget 1.1x
      ikv-learn --bundle bundles/default/fp32 --memory small.ikv --task examples/tasks/capitals.train.jsonl --budget 16MiB --scheme k4v4 --compact genv --slots 10
      ikv-learn --bundle bundles/default/fp32 --memory promoted.ikv --promote promoted.uses.json --ttft-budget 1.8x
    """
    logging.basicConfig(level=logging.WARNING)
    if task_path is not None and promote_uses is not None:
        raise click.UsageError("give --task (learn a task) or --promote USES.json (maintain the bank), not both")
    if task_path is None and promote_uses is None:
        raise click.UsageError("missing --task T.jsonl (the task to learn), or --promote USES.json to maintain the bank")
    if promote_uses is not None:
        return _promote(bundle, memory, promote_uses, device, ttft_budget, min_uses, batch, dry_run, quiet, as_json)
    with fail_on_bad_input():
        from inducekv.devices.profile import load_profile
        from inducekv.learn.api import learn_task
        from inducekv.runtime.api import Runtime

        t0 = time.perf_counter()
        rt = Runtime.open(bundle, device=load_profile(device), learn=True)
        res = learn_task(rt, memory, task_path, name=name, budget=budget, scheme=scheme, strategy=strategy, seed=seed,
                         n_anchors=n_anchors, reserve=reserve, compact=compact, slots=slots, keep=keep, dry_run=dry_run,
                         gated=gate, progress=progress_enabled(quiet), batch=batch, kinds=kinds,
                         ttft_budget=ttft_budget, value_gates=value_gates, slot_share=slot_share)
    out = {**res.as_dict(), "total_s": round(time.perf_counter() - t0, 2)}  # with the bundle's load
    if as_json:
        click.echo(json.dumps(out))
        return
    verb = "would add" if dry_run else "added"
    slot = res.slot_bytes_used / res.entries if res.entries else 0
    each = (f"~{out['bytes_per_entry'] / 1024:.0f} KiB each" if res.tiers is None else
            f"~{slot / 1024:.1f} KiB each, a slot (images: + pages)" if res.tiers.get("kinds") == "source" else
            f"a kv entry ~{out['bytes_per_entry'] / 1024 + slot / 1024:.0f} KiB, a source entry ~{slot / 1024:.1f} KiB"
            " with its slot (images: + pages)")
    click.echo(f"{res.task}: {verb} {out['added']} of {out['examples']} examples ({each}), "
               f"evict {out['evicted']} old entries"
               + (" (" + ", ".join(f"{k} {v}" for k, v in res.evicted_per_task.items()) + ")" if res.evicted_per_task else "")
               + f", keep {out['kept_old']}")
    if res.outvoted:
        click.echo(f"left out {res.outvoted} example(s) that their two nearest, agreeing examples contradict "
                   "(likely wrong labels)")
    if res.answered:
        click.echo(f"left out {res.answered} example(s) the model already answers without memory (greedy, the answer "
                   "in the first line; or the answer at least 0.1 likely per token)")
    if res.tiers is not None:
        t, c = res.tiers, res.tiers.get("costs_ms")
        click.echo(f"kinds: {res.added - res.sources_added} kv + {res.sources_added} source entries {verb}; source share "
                   f"<= {t['share']:.2f} of stored examples"
                   + (f" (budget {t['ttft_budget']}: TTFT no memory {c['t0_ms']:.0f} ms, kv {c['kv_ms']:.0f} ms, "
                      f"source {c['src_ms']:.0f} ms"
                      + (f", gated out {c['closed_ms']:.0f} ms for {t.get('gated_out', 0.0):.0%} of queries" if "closed_ms" in c else "")
                      + ")" if c and t.get("ttft_budget") else " (no latency budget)"))
        sv = t.get("served")
        if sv:
            kinds_ = ", ".join(f"{k} {v['median_ms']:.0f} ms x{v['n']}" for k, v in sv["by_kind"].items())
            click.echo(f"served {sv['prompts']} of the task's prompts from the bank: mean TTFT {sv['mean_ms']:.0f} ms = "
                       f"{sv['ratio']:.2f}x no memory ({sv['t0_ms']:.0f} ms); by top entry: {kinds_}; "
                       + (f"with the {sv['gated_out']:.0%} of queries the gates send to the plain prompt "
                          f"({sv['closed_ms']:.0f} ms each): {sv['priced_ms']:.0f} ms = {sv['priced_ratio']:.2f}x; "
                          if "priced_ms" in sv else "")
                       + ("within the budget" if sv.get("within") else
                          f"OVER the budget ({sv['limit_ms']:.0f} ms): the next learn plans with these costs"))
    click.echo(f"bank: {res.bytes_used / 2**20:.2f} MiB of pages"
               + (f" and {res.slot_bytes_used / 2**20:.2f} MiB of slots (source entries live there)" if res.tiers else "")
               + f" used of a {res.cap / 2**20:.2f} MiB cap; tasks "
               + ", ".join(f"{k}={v}" for k, v in (res.tasks_after or res.tasks_before).items()))
    gate = res.gate.get("margin")
    if res.gate.get("questions"):
        click.echo(f"question gate: entries of {res.task} are injected when the question is nearer to its "
                   f"{res.gate['questions']} stored question key(s) than to other tasks' and everyday questions")
    if res.gate.get("subjects"):
        sub = res.gate.get("subject") or {}
        click.echo(f"subject gate: entries of {res.task} are injected only for queries naming their subject "
                   f"({sub.get('closed', 0)} of {res.gate.get('queries', 0)} left-out asks named another)")
    if gate is not None or not res.gate.get("questions"):
        click.echo("relevance gate: " + (f"entries of {res.task} are injected when their retrieval margin (top-1 minus "
                                         f"the best non-twin score) is >= {gate:g}" if gate is not None
                                         else f"none ({res.gate.get('reason', 'not fitted')})"))
    vg = res.value_gates
    if "groups" in vg:
        click.echo("value gates: " + " / ".join(f"{x:g}" for x in vg["groups"]) + f" over {len(vg['groups'])} layer groups, "
                   + ("stored" if res.value_gates_kept else "not stored (no better than the bank's)")
                   + f" (held-out loss {vg['loss_before']:.3f} -> {vg['loss_after']:.3f})")
    click.echo("time: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in out["timings_s"].items()) + f"; total {out['total_s']:.1f}s")


def _promote(bundle, memory, uses, device, ttft_budget, min_uses, batch, dry_run, quiet, as_json) -> None:
    """``ikv-learn --promote``: ``learn.promote.promote`` and its summary."""
    with fail_on_bad_input():
        from inducekv.devices.profile import load_profile
        from inducekv.learn.promote import promote
        from inducekv.runtime.api import Runtime

        t0 = time.perf_counter()
        rt = Runtime.open(bundle, device=load_profile(device), learn=True)
        res = promote(rt, memory, uses, ttft_budget=ttft_budget, min_uses=min_uses, dry_run=dry_run,
                      progress=progress_enabled(quiet), batch=batch)
    out = {**res.as_dict(), "total_s": round(time.perf_counter() - t0, 2)}
    if as_json:
        click.echo(json.dumps(out))
        return
    verb = "would" if dry_run else "did"
    click.echo(f"promotion ({verb}): {res.promoted} kv copies added, {res.demoted} removed; {res.copies} of "
               f"{res.sources} source entries now have a kv copy; {res.pages_free} pages free")
    click.echo(f"recorded queries: {res.queries}" + (f" ({res.unknown} for examples no longer in the bank)" if res.unknown else "")
               + f"; served as kv: {res.kv_share_before:.0%} -> {res.kv_share:.0%}")
    if res.mean_ms_after is not None:
        c = res.costs_ms
        click.echo(f"mean TTFT of those queries at this device's costs (no memory {c['t0_ms']:.0f} ms, kv {c['kv_ms']:.0f} ms, "
                   f"source {c['src_ms']:.0f} ms): {res.mean_ms_before:.0f} -> {res.mean_ms_after:.0f} ms"
                   + ("" if res.limit_ms is None else
                      f" = {res.mean_ms_after / c['t0_ms']:.2f}x; budget {res.ttft_budget} ({res.limit_ms:.0f} ms): "
                      + ("within" if res.within else "OVER (no more copies fit, or are used --min-uses times)")))
    sv = res.served
    if sv and sv.get("prompts"):
        kinds_ = ", ".join(f"{k} {v['median_ms']:.0f} ms x{v['n']}" for k, v in sv["by_kind"].items())
        click.echo(f"serve check: {sv['prompts']} of the most-used examples served from the bank as written, by top "
                   f"entry: {kinds_}; no memory {sv['t0_ms']:.0f} ms" + ("; the copies were re-planned with these costs"
                                                                         if res.costs_ms else ""))
    click.echo(f"time: total {out['total_s']:.1f}s")


def main():
    keep_large_frees_off_heap()   # peak RSS that does not grow with the task's passes (core/alloc.py)
    cli()
