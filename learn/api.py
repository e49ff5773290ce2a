"""The one call that absorbs a task into a bank file: what ``ikv-learn`` runs, for apps too.

    from inducekv.learn import learn_task
    res = learn_task(rt, "bank.ikv", "examples/tasks/capitals.train.jsonl", budget=16 << 20,
                     progress=lambda stage, done, total: print(stage, done, total))
    res.added, res.evicted, res.bytes_used, res.tasks_after, res.calibration_kept

``task`` is a task file (JSONL) or examples in memory (``{"prompt", "answer" | "answers",
"image"?}`` dicts or ``runtime.tasks.Example``s; then ``name`` is required). The bank is
created with ``budget`` (default: the runtime's device profile's) when absent. Selection,
defaults and the summary are ``ikv-learn``'s, which calls this. Every input is checked
before the bank is touched; the commit is atomic (``learn.plan.write``); a runtime serving
the same bank (``Runtime.open(..., memory=)``, any thread) picks the commit up on its next
query.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from inducekv.core.errors import InduceKVError
from inducekv.kernels.kvquant import SPARSE, scheme_for_bits
from inducekv.learn.candidates import as_example
from inducekv.learn.compact import check_request, new_bank_scheme
from inducekv.learn.defaults import N_ANCHORS, RESERVE, SCORE_BATCH
from inducekv.learn.plan import create_bank, open_or_create, plan, read_examples, task_name, write
from inducekv.learn.select import DEFAULT_STRATEGY
from inducekv.learn.tiers import resplit
from inducekv.learn.progress import Progress, report
from inducekv.memory.bank import Bank


@dataclass(frozen=True)
class LearnResult:
    """What a learn did (or, with ``dry_run``, would do); ``as_dict`` is ``ikv-learn --json``."""
    task: str
    examples: int                  # examples given
    added: int                     # new entries written
    evicted: int                   # old entries removed to make room
    kept_old: int                  # old entries kept
    new_ids: tuple[int, ...]       # entry ids of the added entries (empty for a dry run)
    evicted_per_task: dict         # task -> entries evicted
    bytes_per_entry: int           # mean bytes (pages) of this task's candidate entries
    dry_run: bool
    tasks_before: dict             # task -> live entries, before
    tasks_after: dict | None       # task -> live entries, after (None for a dry run)
    entries: int                   # live entries in the bank now
    bytes_used: int                # payload bytes in use now (``ikv-bank info``'s bytes_used)
    slot_bytes_used: int           # bytes of the live entries' slot records (a source entry lives there)
    cap: int                       # the bank's byte cap
    calibration_kept: bool         # the fitted retrieval calibration lowered held-out loss and was stored
    calibration: dict              # its report (losses before/after, or why it was not fitted)
    weighting_kept: bool           # the fitted injection weighting (tau) beat unweighted and was stored
    weighting: dict                # its report
    value_gates_kept: bool         # the fitted per-layer value gates beat the bank's (or none) and were stored
    value_gates: dict              # their report (one gate per layer group, losses before/after)
    gate: dict                     # the task's relevance gate: margin (None: ungated) and its report
    compact: dict                  # entry compaction used
    commits: int                   # commits made: 1, or 2 when evictions went first (learn/commit.py); 0 dry run
    sources_added: int             # of ``added``, entries kept as source (a bank with source entries)
    outvoted: int                  # examples worth nothing: their two nearest, which agree, contradict them
                                   # (likely wrong labels; ``learn.value.contradicted``)
    answered: int                  # examples the bare model already answers: not written (``learn.value.answered``)
    tiers: dict | None             # kinds, source share, latency budget and measured costs (None: a kv-only bank)
    timings_s: dict                # seconds per phase
    total_s: float

    def as_dict(self) -> dict:
        out = asdict(self)
        out["new_ids"] = list(self.new_ids)
        return out


def learn_task(rt, memory, task, *, name: str | None = None, budget: int | None = None, scheme: str | None = None,
               strategy: str = DEFAULT_STRATEGY, seed: int = 0, n_anchors: int = N_ANCHORS, reserve: float = RESERVE,
               compact: str | None = None, slots: int | None = None, keep: float | None = None, dry_run: bool = False,
               gated: bool = True, progress: Progress = None, batch: int = SCORE_BATCH, kinds: str = "kv",
               ttft_budget: str | None = None, value_gates: bool = True, slot_share: float | None = None) -> LearnResult:
    """Learn ``task`` (a task file path, or a list of examples) into the bank ``memory`` (a path,
    or a ``Bank`` opened writable, which stays open) with the runtime ``rt``.

    ``budget``: byte cap of a new bank (default: the device profile's); ``scheme``: payload
    quantization of a new bank (default: the profile's kv_bits); ``strategy``, ``seed``,
    ``n_anchors``, ``reserve``, ``compact``, ``slots``, ``keep``: as ``ikv-learn``'s options;
    ``dry_run``: plan only, write nothing; ``gated``: fit the task's relevance gate (False: never gated);
    ``value_gates``: fit the bank's per-layer value gates (False: the bank's stay as they are);
    ``batch``: examples per decoder pass while encoding and scoring (1 uses the least RAM);
    ``kinds``: entry kinds of a new bank (kv, tiered, source; ``learn.tiers``); ``ttft_budget``:
    the mean-TTFT budget of a bank with source entries (``1.5x``, ``120ms``; None: the bank's);
    ``slot_share``: a new tiered bank's share of the cap in slots (None: sized for the budget's mix,
    ``tiers.new_bank_share``; a bank to promote on use wants slots for every example and pages for
    the copies, ``learn.promote``); ``progress``: ``callback(stage, done, total)`` or
    True for progress bars (``learn.progress``)."""
    t0 = time.perf_counter()
    examples, tname = _examples(task, name)  # bad examples fail here, before the bank is touched
    if isinstance(memory, Bank):
        if not memory.writable:
            raise InduceKVError(f"{memory.path} is open read-only; open it with writable=True to learn into it")
        return _learn(rt, memory, examples, tname, t0, strategy, seed, n_anchors, reserve, compact, slots, keep,
                      dry_run, progress, gated, batch, ttft_budget, value_gates)
    path = Path(memory)
    check_kinds(kinds, ttft_budget, path)
    check_request(rt, compact, slots, path.exists(), keep)  # before a bank is created
    if not path.exists():   # a new bank: the profile's scheme and compaction unless asked otherwise
        scheme = new_bank_scheme(rt, scheme or scheme_for_bits(rt.profile.kv_bits),
                                 compact if compact is not None or rt.profile.compact == "perlayer" else "none")
        if keep is None and scheme in SPARSE:
            keep = rt.profile.keep
    if slot_share is not None and kinds != "tiered" and not path.exists():
        raise InduceKVError("a slot share sizes a new tiered bank; add --kinds tiered")
    if slot_share is not None and not 0.02 <= slot_share <= 0.95:
        raise InduceKVError(f"the slot share must be between 0.02 and 0.95, got {slot_share}")
    sizing = None
    if kinds != "kv" and not path.exists() and slot_share is None:   # size the slots for the kinds' (and the budget's) mix
        from inducekv.learn.tiers import new_bank_share

        slot_share, sizing = new_bank_share(rt, examples, scheme or scheme_for_bits(rt.profile.kv_bits), keep, ttft_budget,
                                       budget if budget is not None else rt.profile.default_budget_bytes,
                                       rt.profile.k or 1, kinds)
    tmp = None
    if dry_run and not path.exists():  # plan against an empty bank of that cap; leave nothing behind
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "plan.ikv"
    try:
        cap = budget if budget is not None else rt.profile.default_budget_bytes
        scheme = scheme or scheme_for_bits(rt.profile.kv_bits)
        bank = open_or_create(path, rt, cap, scheme, kinds=kinds, slot_share=slot_share, sizing=sizing)
        try:
            if ttft_budget is not None and not bank.geo.sources:
                raise InduceKVError(f"{path} holds kv entries only; --ttft-budget needs a bank created with "
                                    "--kinds tiered")
            first, extra = None, {}
            if sizing is not None and sizing.get("ttft_budget") is not None:   # a new tiered bank
                first = _plan(rt, bank, examples, tname, strategy, seed, n_anchors, reserve, compact, slots, keep,
                              progress, gated, batch, ttft_budget, value_gates)
                split = resplit(sizing, first.tiers.share) if first.tiers is not None else None
                if split is not None:   # split it for the gated-out queries the first plan priced; plan again
                    bank.close()
                    share, sizing = split
                    bank = create_bank(path, cap, rt.manifest, scheme, kinds=kinds, slot_share=share, force=True,
                                       sizing=sizing)
                    extra = {"resplit_plan_s": sum(first.timings.values())}   # the first plan's phases, summed
                    first = None
            return _learn(rt, bank, examples, tname, t0, strategy, seed, n_anchors, reserve, compact, slots, keep,
                          dry_run, progress, gated, batch, ttft_budget, value_gates, first=first, extra_timings=extra)
        finally:
            bank.close()
    finally:
        if tmp is not None:
            tmp.cleanup()


def _examples(task, name: str | None) -> tuple[list, str]:
    """(examples, task name) from a task file path or a list of examples, validated."""
    if isinstance(task, (str, Path)):
        return read_examples(task), task_name(Path(task), name)
    if not isinstance(task, (list, tuple)):
        raise InduceKVError(f"task must be a task file path or a list of examples, got {type(task).__name__}")
    if not name or not isinstance(name, str):
        raise InduceKVError("examples given in memory need a task name: pass name=...")
    examples = [as_example(ex, n) for n, ex in enumerate(task, start=1)]
    for ex in examples:
        if ex.image is not None and not Path(ex.image).is_file():
            raise InduceKVError(f"example {ex.line}: image {ex.image} does not exist")
    return examples, name


def check_kinds(kinds: str, ttft_budget: str | None, path: Path) -> None:
    """Bad ``kinds`` / ``ttft_budget`` fail before a bank is touched."""
    from inducekv.learn.tiers import Budget
    from inducekv.memory.kinds import KINDS

    if kinds not in KINDS:
        raise InduceKVError(f"unknown entry kinds {kinds!r}; choose one of {', '.join(KINDS)}")
    Budget.parse(ttft_budget)
    if not path.exists() and ttft_budget is not None and kinds != "tiered":
        raise InduceKVError("--ttft-budget chooses between kv and source entries; it needs --kinds tiered")


def _plan(rt, bank: Bank, examples, tname, strategy, seed, n_anchors, reserve, compact, slots, keep, progress,
          gated=True, batch=SCORE_BATCH, ttft_budget=None, value_gates=True):
    bank.refresh()
    return plan(rt, bank, examples, tname, strategy=strategy, seed=seed, n_anchors=n_anchors, reserve=reserve,
                k=rt.profile.k or 1, progress=progress, gated=gated, compact=compact, slots=slots, keep=keep,
                batch=batch, ttft_budget=ttft_budget, value_gates=value_gates)


def _learn(rt, bank: Bank, examples, tname, t0, strategy, seed, n_anchors, reserve, compact, slots, keep, dry_run,
           progress, gated=True, batch=SCORE_BATCH, ttft_budget=None, value_gates=True, first=None,
           extra_timings=None) -> LearnResult:
    """Plan (or take ``first``, a plan already made on this bank) and write, unless ``dry_run``.
    ``extra_timings``: phases before this plan (a new tiered bank's first plan, when it was
    re-split) reported with its own."""
    p = first or _plan(rt, bank, examples, tname, strategy, seed, n_anchors, reserve, compact, slots, keep, progress,
                       gated, batch, ttft_budget, value_gates)
    p.timings.update(extra_timings or {})
    before = bank.tasks()
    ids: list[int] = []
    tiers = p.tiers.catalog() if p.tiers is not None else None
    if not dry_run:
        report(progress, "write", 0, 1)
        ids = write(bank, p)
        report(progress, "write", 1, 1)
        if p.tiers is not None and p.tiers.budget is not None:
            from inducekv.learn.tiers import serve_check

            report(progress, "serve check", 0, 1)
            t = time.perf_counter()
            tiers = serve_check(rt, bank, p.tiers, examples, seed)
            p.timings["serve_check_s"] = time.perf_counter() - t
            report(progress, "serve check", 1, 1)
    usage = bank.usage()
    return LearnResult(
        task=tname, examples=len(examples), added=len(p.add) + len(p.sources), evicted=len(p.evict), kept_old=len(p.keep_old),
        new_ids=tuple(ids), evicted_per_task=dict(p.evicted_per_task), bytes_per_entry=round(p.bytes_per_entry),
        dry_run=dry_run, tasks_before=before, tasks_after=None if dry_run else bank.tasks(), entries=usage["entries"],
        bytes_used=usage["bytes_used"], slot_bytes_used=usage["slot_bytes_used"], cap=usage["cap"], calibration_kept=p.calibration.accepted,
        calibration=p.calibration.as_dict(), weighting_kept=p.injection.accepted, weighting=p.injection.as_dict(),
        value_gates_kept=p.value_gates.accepted, value_gates=p.value_gates.as_dict(), gate=p.gate.as_dict(),
        compact=p.compaction.as_dict(), commits=p.commits, sources_added=len(p.sources), outvoted=p.outvoted,
        answered=p.answered,
        tiers=tiers, timings_s={k: round(v, 2) for k, v in p.timings.items()},
        total_s=round(time.perf_counter() - t0, 2))
