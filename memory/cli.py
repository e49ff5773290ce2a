"""``ikv-bank``: inspect, check and edit a memory bank file."""
from __future__ import annotations

import json
import logging

import click

from inducekv.core.cli import ByteSize, fail_on_bad_input
from inducekv.kernels.kvquant import SCHEMES, SPARSE

_CTX = {"help_option_names": ["-h", "--help"]}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _emit(obj: dict, as_json: bool, lines: list[str]) -> None:
    click.echo(json.dumps(obj, indent=2) if as_json else "\n".join(lines))


@click.group(context_settings=_CTX)
def cli():
    """Inspect and edit an inducekv memory bank (.ikv)."""
    logging.basicConfig(level=logging.WARNING)


def _runs(gates: list) -> str:
    """Per-layer gates as runs of equal consecutive layers: ``layers 0-9 x0.5, 10-29 x1.5``."""
    starts = [i for i in range(len(gates)) if i == 0 or gates[i] != gates[i - 1]] + [len(gates)]
    return "layers " + ", ".join(f"{a}-{b - 1} x{gates[a]:g}" for a, b in zip(starts, starts[1:]))


def _compact_line(rec, scheme: str) -> str:
    if isinstance(rec, dict) and rec.get("method") == "perlayer":
        return (f"perlayer, keep {rec.get('keep'):g}: each layer stores its own share of an entry's tokens "
                "(token counts below are slots per layer)")
    if isinstance(rec, dict) and rec.get("method") == "genv":
        return f"genv, {rec.get('slots')} tokens per entry"
    return "perlayer (no entries yet)" if scheme in SPARSE else "none (full entries)"


def _subjects(raw, entries) -> dict[str, int]:
    """Task -> how many of its live entries have subject words, for tasks with a subject gate
    (``runtime/subjects.py``; catalog record kept as stored, a malformed one is counted as none)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list) or not isinstance(raw.get("entries"), dict):
        return {}
    said = set(raw["entries"])
    return {str(t): sum(1 for e in entries if e.task == t and str(e.entry_id) in said) for t in raw["tasks"]}


def _copies(entries) -> int:
    """kv entries that copy a source entry of the same example and task (``ikv-learn --promote``)."""
    src = {(e.example_hash, e.task) for e in entries if e.kind == "source"}
    return sum(1 for e in entries if e.kind == "kv" and (e.example_hash, e.task) in src)


@cli.command(context_settings=_CTX)
@click.argument("bank", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(bank, as_json):
    """Cap, bytes used/free, entries per task, bytes per entry, quantization."""
    from inducekv.memory.bank import Bank
    from inducekv.memory.format import (PENDING_KEY, QUESTIONS_KEY, RELEVANCE_KEY, SUBJECTS_KEY, TIERS_KEY, TWINS_KEY,
                                        VALUE_GATES_KEY)

    with fail_on_bad_input(), Bank.open(bank) as b:
        g, u = b.geo, b.usage()
        per_entry = {t: g.entry_bytes(t) for t in (32, 64, 128) if t <= g.max_tokens}
        obj = {"path": str(b.path), "fingerprint": g.fingerprint, "scheme": g.scheme, "generation": b.gen,
               "model": {"layers": g.num_layers, "kv_heads": g.kv_heads, "head_dim": g.head_dim},
               "key": {"dim": g.key_dim, "space": g.key_space, "calibrated": b.calibration() is not None},
               "shared_key_scales": (None if g.scales_bytes == 0 else b.key_scales() is not None),
               "weighting": b.catalog.get("extra", {}).get("injection"),
               "compact": b.catalog.get("extra", {}).get("compact"),
               "learn_pending": b.catalog.get("extra", {}).get(PENDING_KEY),
               "relevance": b.catalog.get("extra", {}).get(RELEVANCE_KEY) or {},
               "question_gates": {t: len(v) for t, v in
                                  ((b.catalog.get("extra", {}).get(QUESTIONS_KEY) or {}).get("tasks") or {}).items()},
               "value_gates": b.catalog.get("extra", {}).get(VALUE_GATES_KEY) or {},
               "subject_gates": _subjects(b.catalog.get("extra", {}).get(SUBJECTS_KEY), b.snapshot().entries),
               "twins": b.catalog.get("extra", {}).get(TWINS_KEY) or {},
               "format_version": g.version, "source_capable": g.sources,
               "tiers": b.catalog.get("extra", {}).get(TIERS_KEY),
               **u, "tasks": b.tasks(), "entry_bytes_at_tokens": per_entry,
               "mean_entry_bytes": (u["bytes_used"] // u["entries"]) if u["entries"] else None,
               "kv_copies": _copies(b.entries()) if g.sources else 0}
        lines = [f"{b.path}: inducekv bank, generation {b.gen}",
                 f"  model      {g.fingerprint[:16]}  (L={g.num_layers}, kv heads={g.kv_heads}, head dim={g.head_dim})",
                 f"  payloads   {g.scheme}, pages of {g.page_bytes} B; keys {g.key_dim}-d {g.key_space}"
                 f"{' (calibrated)' if obj['key']['calibrated'] else ''}"
                 + ("" if obj["shared_key_scales"] is None else
                    f"; shared key scales {'set' if obj['shared_key_scales'] else 'not set yet'}"),
                 "  weighting  " + (f"softmax over retrieval scores, tau={obj['weighting']['tau']:g}"
                                    if obj["weighting"] and obj["weighting"].get("tau") else "none (entries unweighted)"),
                 "  compact    " + _compact_line(obj["compact"], g.scheme),
                 "  gate       " + (", ".join(f"{t} >= {m:g}" for t, m in obj["relevance"].items())
                                    + " (how far the top-1 retrieval score must stand out from the best"
                                    " entry that is not its twin)"
                                    if obj["relevance"] else "none" if obj["question_gates"] or obj["subject_gates"]
                                    else "none (every query gets its entries)"),
                 "  questions  " + (", ".join(f"{t} ({n} key{'s' * (n > 1)})" for t, n in obj["question_gates"].items())
                                    + " (image tasks: injected only for questions nearer to theirs than to others)"
                                    if obj["question_gates"] else "none"),
                 "  subjects   " + (", ".join(f"{t} ({n} entries with subject words)"
                                             for t, n in obj["subject_gates"].items())
                                    + " (text tasks: injected only for queries naming the top entry's subject)"
                                    if obj["subject_gates"] else "none"),
                 "  value gates " + ("; ".join(f"{t} {_runs(v)}" for t, v in obj["value_gates"].items())
                                     + " (scale of the injected values)" if obj["value_gates"] else "none"),
                 "  twins      " + (f"{len(obj['twins'])} entries in {len(set(obj['twins'].values()))} groups "
                                    "(statements that answer each other's questions)" if obj["twins"] else "none"),
                 f"  cap        {_mib(g.cap)} ({g.cap} B); file {g.file_bytes} B; format overhead {_mib(u['overhead_bytes'])}",
                 f"  used       {_mib(u['bytes_used'])} of {_mib(g.pages * g.page_bytes)} payload space; "
                 f"free {_mib(u['bytes_free'])}"
                 + (f"; slots {_mib(u['slot_bytes_used'])} of {_mib(g.slots * u['slot_bytes'])} (source entries live "
                    "in their slot, an image also in pages)" if g.sources else ""),
                 f"  entries    {u['entries']} of {g.slots} slots"
                 + (f"; mean {_mib(obj['mean_entry_bytes'])} of pages each" if u["entries"] else "")
                 + (f" ({u['kv_entries']} kv, {u['source_entries']} source"
                    + (f"; {obj['kv_copies']} of the kv are copies of source entries, promoted on use"
                       if obj["kv_copies"] else "") + ")" if g.sources else "")]
        if per_entry:
            lines.append("  per entry  " + ", ".join(f"{t} tok = {_mib(n)}" for t, n in per_entry.items()))
        if g.sources:
            t = obj["tiers"] or {}
            lines.insert(len(lines) - (2 if per_entry else 1), "  kinds      " + f"{t.get('kinds', 'tiered')}: source entries (the example's bytes, "
                         f"inline up to {g.inline_capacity} B) beside kv; slot {2 * g.record_bytes} B each"
                         + (f"; latency budget {t['ttft_budget']}, source share <= {t.get('share', 1):.2f}"
                            if t.get("ttft_budget") else "; no latency budget"))
        lines += [f"  task       {name}: {n} entries, {len(b.anchors(name))} anchors" for name, n in obj["tasks"].items()]
        if obj["learn_pending"]:
            lines.append(f"  pending    a learn of task {obj['learn_pending'].get('task')!r} was stopped after evicting "
                         f"{obj['learn_pending'].get('evicted')} entries, before adding its own: learn it again")
    _emit(obj, as_json, lines)


@cli.command(context_settings=_CTX)
@click.argument("bank", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-payloads", is_flag=True, help="Skip payload checksums (faster on big banks).")
def verify(bank, as_json, no_payloads):
    """Check every checksum and invariant; exit 1 when the bank is damaged."""
    from inducekv.memory.verify import verify as run

    rep = run(bank, payloads=not no_payloads)
    lines = [f"{bank}: {'OK' if rep['ok'] else 'DAMAGED'} (generation {rep['gen']}, {rep['entries']} entries)"]
    lines += [f"  problem: {p}" for p in rep["problems"]]
    _emit(rep, as_json, lines)
    if not rep["ok"]:
        raise SystemExit(1)


@cli.command("list", context_settings=_CTX)
@click.argument("bank", type=click.Path())
@click.option("--task", default=None, help="Only entries of this task.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def list_(bank, task, as_json):
    """One line per entry: slot, id, kind (kv or source), tokens, bytes, task."""
    from inducekv.memory.bank import Bank

    with fail_on_bad_input(), Bank.open(bank) as b:
        rows = [e for e in b.entries() if task is None or e.task == task]
        P, R2 = b.geo.page_bytes, 2 * b.geo.record_bytes
        obj = {"entries": [{"slot": e.slot, "id": e.entry_id, "task": e.task, "kind": e.kind, "tokens": e.tokens,
                            "payload_bytes": e.nbytes, "bytes": e.pages * P + R2, "example_hash": e.example_hash.hex()}
                           for e in rows]}
    lines = [f"{'slot':>6} {'id':>8}  {'kind':>6} {'tokens':>6} {'bytes':>9}  task"]
    lines += [f"{r['slot']:>6} {r['id']:>8}  {r['kind']:>6} {r['tokens']:>6} {r['bytes']:>9}  {r['task']}"
              for r in obj["entries"]]
    _emit(obj, as_json, lines)


@cli.command("remove-task", context_settings=_CTX)
@click.argument("bank", type=click.Path())
@click.argument("task")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def remove_task(bank, task, as_json):
    """Forget TASK: remove its entries and anchors and free their space (atomic)."""
    from inducekv.memory.bank import Bank

    with fail_on_bad_input(), Bank.open(bank, writable=True) as b:
        before = b.usage()["bytes_free"]
        with b.transaction() as tx:
            n = tx.remove_task(task)
        obj = {"task": task, "removed_entries": n, "freed_bytes": b.usage()["bytes_free"] - before}
    _emit(obj, as_json, [f"removed task {task!r}: {n} entries, {_mib(obj['freed_bytes'])} freed"])


@cli.command(context_settings=_CTX)
@click.argument("bank", type=click.Path())
@click.option("--bundle", required=True, type=click.Path(), help="Bundle the bank will serve (fixes model and key size).")
@click.option("--budget", required=True, type=ByteSize(), help="Hard cap on the file's bytes, e.g. 16MiB, 500KB.")
@click.option("--scheme", type=click.Choice(SCHEMES), default="int8", show_default=True,
              help="Payload quantization.")
@click.option("--max-tokens", type=click.IntRange(1, 65536), default=256, show_default=True, help="Longest entry.")
@click.option("--page-tokens", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="Payload page size in tokens (smaller wastes less per entry).")
@click.option("--kinds", type=click.Choice(["kv", "tiered", "source"]), default="kv", show_default=True,
              help="Entry kinds the bank holds: kv (K/V payloads), source (each example's own bytes, re-encoded "
                   "when retrieved), tiered (both; ikv-learn --ttft-budget chooses the mix). Banks with source "
                   "entries use format 3 (memory/FORMAT.md).")
@click.option("--slot-share", type=click.FloatRange(0.02, 0.95), default=None,
              help="A tiered bank's share of the cap in slots (default 0.5; ikv-learn --kinds tiered sizes it "
                   "from measured costs instead). A source bank gives slots 0.95.")
@click.option("--force", is_flag=True, help="Replace an existing file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def create(bank, bundle, budget, scheme, max_tokens, page_tokens, kinds, slot_share, force, as_json):
    """Create an empty bank of at most --budget bytes for --bundle (ikv-learn does this too)."""
    from inducekv.core.errors import BankError
    from inducekv.core.manifest import read_manifest
    from inducekv.memory.bank import Bank
    from inducekv.memory.format import TIERS_KEY
    from inducekv.memory.kinds import bank_kind_layout, tiers_catalog

    with fail_on_bad_input():
        m = read_manifest(bundle)
        if budget <= 0:
            raise BankError("--budget must be positive")
        if slot_share is not None and kinds != "tiered":
            raise BankError("--slot-share sizes a tiered bank; add --kinds tiered")
        layout = {"max_tokens": max_tokens, "page_tokens": page_tokens,
                  **bank_kind_layout(kinds, 0.5 if kinds == "tiered" and slot_share is None else slot_share)}
        with Bank.create_for(bank, budget, m, scheme=scheme, force=force, **layout) as b:
            if kinds != "kv":
                with b.transaction() as tx:
                    tx.set_extra(TIERS_KEY, tiers_catalog(kinds))
            g = b.geo
            obj = {"path": str(b.path), "cap": g.cap, "file_bytes": g.file_bytes, "slots": g.slots, "pages": g.pages,
                   "page_bytes": g.page_bytes, "entry_bytes_at_tokens": {t: g.entry_bytes(t) for t in (32, 64, 128)
                                                                         if t <= g.max_tokens}}
    obj["kinds"] = kinds
    _emit(obj, as_json, [f"created {bank}: {g.file_bytes} B of a {g.cap} B cap, {g.slots} slots, "
                         f"{g.pages} pages of {g.page_bytes} B" + (f"; kinds {kinds}" if kinds != "kv" else "")])


def main():
    cli()
