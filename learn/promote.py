"""Promotion on use (issue 19): source entries served often get a kv copy, rarely used copies go.

A bank with source entries (``--kinds tiered|source``) keeps many examples as their own bytes,
re-encoded on every query that retrieves them (~2x the no-memory TTFT on text), and a few as
compacted kv (~1.5x). Which examples deserve kv depends on what the app asks, which only
serving shows: the runtime counts it (``memory/uses.py``). ``promote`` reads those counts and,
off the serving path, makes the bank's kv share follow them:

    rank      source-backed examples by the queries they were the top entry for
    promote   re-encode the most used as kv **copies**: the same example, key and task; the
              source entry stays, so nothing is lost and a copy can go again at any time
    demote    drop the copies of examples no longer among the most used
    bound     copies fill at most the pages the bank has free of its other entries; with a
              latency budget (``--ttft-budget``, or the bank's), no more copies than it takes
              to bring the mean TTFT of the recorded queries within it

The runtime serves one entry per example: of a source entry and its copy (one key, one
score) the kv copy (``runtime.memory.Memory._one_per_example``). The pair is recorded as
twins (the relevance gate's margin skips a twin) and the copy gets the source's subject
words and stored gain, so every gate treats it as the source.

The mean TTFT of the recorded queries, priced with the bank's per-kind costs (``tiers.Costs``;
measured here when the bank has none): ``gated_out`` queries at the gated-out cost, each other
at its top entry's kind. Commits: the demotions first when the copies need their pages (a kill
in between leaves fewer copies: every example still served), then the new copies.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path


from inducekv.core.errors import BankError, InduceKVError
from inducekv.kernels import kvquant
from inducekv.learn import tiers as tiers_
from inducekv.learn.candidates import Ask, Scorer, encode_candidates, fit_key_scales
from inducekv.learn.compact import compactor_for, resolve as resolve_compaction
from inducekv.learn.defaults import GAINS_KEY, SCORE_BATCH
from inducekv.learn.progress import Progress, report
from inducekv.memory import uses as uses_
from inducekv.memory.bank import Bank, NewEntry
from inducekv.memory.format import SUBJECTS_KEY, TWINS_KEY
from inducekv.memory.source import unpack_source
from inducekv.runtime import subjects as subj
from inducekv.runtime.memory import TIERS_KEY, Layout, image_of, template_from, tiers_from, twins_from
from inducekv.runtime.tasks import Example

MIN_USES = 2   # an example must have been the top entry this often to be worth a kv copy
PROMOTION_KEY = "promotion"   # in the bank's tiers record: what the last promotion did


@dataclass(frozen=True)
class PromoteResult:
    """What ``promote`` did (or, with ``dry_run``, would do); ``as_dict`` is ``ikv-learn --promote --json``."""
    promoted: int            # kv copies written
    demoted: int             # kv copies removed
    copies: int              # kv copies in the bank after
    sources: int             # source entries in the bank (unchanged)
    queries: int             # queries in the uses record
    unknown: int             # of them, queries whose top entry is no longer in the bank (not priced)
    kv_share: float          # share of the priced queries whose example is served as kv after
    kv_share_before: float
    ttft_budget: str | None
    costs_ms: dict | None    # the per-kind costs the mean is priced with
    mean_ms_before: float | None
    mean_ms_after: float | None
    limit_ms: float | None
    within: bool | None      # the priced mean after is within the budget (None: no budget)
    pages_free: int          # pages free after (or as planned)
    commits: int
    dry_run: bool
    timings_s: dict
    total_s: float
    served: dict | None = None   # the serve check after the write (``tiers.served``; with a budget)
    fidelity: dict | None = None  # example hash (hex) -> its new kv copy's log-likelihood drop vs its source

    def as_dict(self) -> dict:
        return asdict(self)


def _examples_of(bank: Bank, sources: list, folder: Path) -> list[Example]:
    """The source entries' examples, their images written to ``folder`` (the encoder reads files)."""
    out = []
    for n, e in enumerate(sources, start=1):
        got = bank.read_payload(e.slot, e.entry_id)
        if got is None:
            raise BankError(f"source entry {e.entry_id} changed while it was read; promote again")
        src = unpack_source(got[0])
        image = None
        if src.image is not None:
            image = folder / f"{e.entry_id}.img"
            image.write_bytes(src.image)
        out.append(Example(src.prompt, (src.answer,), image, n))
    return out


def _priced(top: dict, kv: set, costs: "tiers_.Costs", gated_out: int) -> tuple[float | None, float]:
    """(mean TTFT in ms of the recorded queries when the examples in ``kv`` are served as kv,
    share of the served ones that are kv); ``top``: example hash -> queries it was first for."""
    served = sum(top.values())
    n_kv = sum(n for h, n in top.items() if h in kv)
    share = n_kv / served if served else 0.0
    if costs is None or served + gated_out == 0:
        return None, share
    closed = costs.closed_ms if costs.closed_ms is not None else costs.kv_ms
    total = gated_out * closed + n_kv * costs.kv_ms + (served - n_kv) * costs.src_ms
    return total / (served + gated_out), share


def promote(rt, memory, uses, *, ttft_budget: str | None = None, min_uses: int = MIN_USES, dry_run: bool = False,
            progress: Progress = None, batch: int = SCORE_BATCH, max_drop: float | None = None) -> PromoteResult:
    """Make the bank ``memory`` (a path, or a ``Bank`` opened writable) keep kv copies of its
    most-used source entries, by ``uses`` (a ``memory.uses.Uses`` or the path of a uses record);
    see the module docstring. ``ttft_budget``: the mean-TTFT budget (``1.8x``, ``120ms``;
    None: the bank's, else no bound but the pages); ``min_uses``: the fewest top-entry uses a
    copy needs; ``max_drop``: leave out an example whose kv copy's answer log-likelihood on its own
    prompt is more than this below its source's (nats per token; None: no check); ``dry_run``: plan only."""
    t0 = time.perf_counter()
    if isinstance(min_uses, bool) or not isinstance(min_uses, int) or min_uses < 1:
        raise InduceKVError(f"min_uses must be a positive integer, got {min_uses!r}")
    record = uses if isinstance(uses, uses_.Uses) else uses_.read(uses)
    budget = tiers_.Budget.parse(ttft_budget)   # a bad budget fails before the bank is opened
    if isinstance(memory, Bank):
        if not memory.writable:
            raise InduceKVError(f"{memory.path} is open read-only; open it with writable=True to promote in it")
        return _promote(rt, memory, record, budget, min_uses, dry_run, progress, batch, t0, max_drop)
    path = Path(memory)
    if not path.exists():
        raise InduceKVError(f"{path} does not exist; promotion works on a bank that ikv-learn has filled")
    with Bank.open(path, writable=True, fingerprint=rt.manifest.fingerprint) as bank:
        return _promote(rt, bank, record, budget, min_uses, dry_run, progress, batch, t0, max_drop)


def _promote(rt, bank: Bank, record: uses_.Uses, budget, min_uses, dry_run, progress, batch, t0,
             max_drop=None) -> PromoteResult:
    """Plan and write with the bank's costs (or timed ones); then, with a budget, serve the bank as
    written (``tiers.served``: the runtime's own path, a few of the most-used examples of each kind)
    and, when those served costs put the recorded queries over the budget, plan once more with them."""
    bank.refresh()
    es = bank.entries()
    pairs = {(e.example_hash, e.task) for e in es if e.kind == "source"}
    baseline = {e.example_hash for e in es if e.kind == "kv" and (e.example_hash, e.task) in pairs}   # copies before
    first = _round(rt, bank, record, budget, min_uses, dry_run, progress, batch, t0, max_drop=max_drop)
    if dry_run or first.limit_ms is None:
        return first
    t = time.perf_counter()
    report(progress, "serve check", 0, 1)
    served = _serve_check(rt, bank, record, tiers_.Budget.parse(first.ttft_budget))
    report(progress, "serve check", 1, 1)
    timings = {**first.timings_s, "serve_check_s": round(time.perf_counter() - t, 2)}
    costs = served.pop("costs")
    if costs is None:
        return replace(first, served=served, timings_s=timings)
    closed = first.costs_ms.get("closed_ms") if costs.closed_ms is None else costs.closed_ms
    costs = tiers_.Costs(costs.t0_ms, costs.kv_ms, costs.src_ms, closed)
    again = _round(rt, bank, record, tiers_.Budget.parse(first.ttft_budget), min_uses, False, progress, batch, t0,
                   costs=costs, costs_from="served", baseline=baseline, max_drop=max_drop)
    return replace(again, promoted=first.promoted + again.promoted, demoted=first.demoted + again.demoted,
                   commits=first.commits + again.commits, served=served,
                   fidelity={**(first.fidelity or {}), **(again.fidelity or {})},
                   timings_s={**timings, **{f"{k[:-2]}_again_s": v for k, v in again.timings_s.items()}},
                   total_s=round(time.perf_counter() - t0, 2))


SERVE_PER_KIND = 5   # most-used examples of each kind served by the check after a promotion


def _serve_check(rt, bank: Bank, record: uses_.Uses, budget) -> dict:
    """``tiers.served`` on the bank as written, with the most-used examples that have a kv copy and
    the most-used that have not (their own prompts, so each is served its own kind)."""
    bank.refresh()
    entries = bank.entries()
    src = {e.example_hash: e for e in entries if e.kind == "source"}
    copied = {e.example_hash for e in entries if e.kind == "kv" and e.example_hash in src}
    by_use = sorted(src, key=lambda h: (-record.top.get(h, 0), h.hex()))
    kv = [h for h in by_use if h in copied][:SERVE_PER_KIND]
    kv = [kv[i % len(kv)] for i in range(max(3, len(kv)))] if kv else []   # one or two copies: served again, so
    picks = kv + [h for h in by_use if h not in copied][:SERVE_PER_KIND]  # each kind is timed at least twice
    with tempfile.TemporaryDirectory(prefix="ikv-promote-") as tmp:
        examples = _examples_of(bank, [src[h] for h in picks], Path(tmp))
        if len(examples) < 3:
            return {"prompts": 0, "costs": None}
        return tiers_.served(rt, bank.path, examples, budget, n=len(examples) - 1)


def _round(rt, bank: Bank, record: uses_.Uses, budget, min_uses, dry_run, progress, batch, t0,
           costs: "tiers_.Costs | None" = None, costs_from: str | None = None,
           baseline: set | None = None, max_drop: float | None = None) -> PromoteResult:
    """One plan-and-write (``costs``: price with these, not the bank's; ``baseline``: the examples
    that had kv copies before the first round, priced as "before")."""
    g, timings = bank.geo, {}
    if not g.sources:
        raise InduceKVError(f"{bank.path} holds kv entries only; promotion copies source entries to kv, so it needs "
                            "a bank created with --kinds tiered")
    bank.refresh()
    snap = bank.snapshot()
    stored = tiers_from(snap.catalog)
    if budget is None:
        budget = tiers_.Budget.parse(stored.get("ttft_budget"))
    row = {e.entry_id: i for i, e in enumerate(snap.entries)}
    src = {e.example_hash: e for e in snap.entries if e.kind == "source"}
    copies = {e.example_hash: e for e in snap.entries if e.kind == "kv" and e.example_hash in src
              and src[e.example_hash].task == e.task}
    kv_alone = {e.example_hash for e in snap.entries if e.kind == "kv" and e.example_hash not in copies}
    here = {e.example_hash for e in snap.entries}
    top = {h: n for h, n in record.top.items() if h in here}
    unknown = sum(n for h, n in record.top.items() if h not in here)

    copy_pages = sum(e.pages for e in copies.values())
    free_pages = g.pages - int(bank.usage()["pages_used"]) + copy_pages     # as if every copy went
    free_slots = g.slots - len(snap.entries) + len(copies)
    rank = sorted((h for h in src if top.get(h, 0) >= min_uses),
                  key=lambda h: (-top[h], h not in copies, h.hex()))

    given = costs
    costs = costs or tiers_.stored_costs(stored)
    layout = Layout(rt, *template_from(snap.catalog.get("template")))
    compaction = resolve_compaction(bank, None, None, None)
    key_scale, new_scales = bank.key_scales(), None
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ikv-promote-") as tmp:
        todo = [h for h in rank if h not in copies]
        examples = dict(zip(todo, _examples_of(bank, [src[h] for h in todo], Path(tmp))))
        if g.scheme in kvquant.SHARED_KEY_SCALE and key_scale is None and examples:
            key_scale = new_scales = fit_key_scales(rt, layout, list(examples.values()), g.scheme,
                                                    any_position=compaction.method == "genv")
        made = {}

        scorer, drop = Scorer(rt, layout, batch), {}

        def encode(hs: list) -> None:
            """Encode kv copies; ``drop``: each copy's answer log-likelihood (mean per token, on its own
            prompt) minus the full-precision entry's (its source re-encoded)."""
            hs = [h for h in hs if h not in made]
            if hs:
                exs = [examples[h] for h in hs]
                cands = encode_candidates(rt, g, layout, rt.key_encoder(), exs, progress,
                                          key_scale, compactor_for(rt, layout, compaction), None, batch)
                made.update(zip(hs, cands))
                imgs = [image_of(rt, ex) for ex in exs]
                full = scorer.logp_many(Ask(ex.prompt, ex.answers[0], lambda ex=ex, im=im: [layout.encode_entry(
                    ex.prompt, ex.answers[0], im)], im) for ex, im in zip(exs, imgs))
                drop.update({h: (c.base + c.gain) - f for h, c, f in zip(hs, cands, full)})

        # the most-used first, while pages and slots last (a kv copy's size is known once encoded)
        chosen, pages_left, slots_left = [], free_pages, free_slots
        for i, h in enumerate(rank):
            if slots_left <= 0:
                break
            if h in copies:
                need = copies[h].pages
            else:
                if h not in made:
                    encode([x for x in rank[i:i + max(1, batch)] if x not in copies])
                need = g.pages_for(made[h].tokens)
                if max_drop is not None and drop[h] < -max_drop:
                    continue   # its kv copy answers its own prompt clearly worse than the source does
            if need <= pages_left:
                chosen.append(h)
                pages_left -= need
                slots_left -= 1
        timings["encode_s"] = time.perf_counter() - t

        if budget is not None and costs is None and (made or copies):   # a bank without costs: time them here
            t = time.perf_counter()
            report(progress, "measure", 0, 1)
            cands = list(made.values())
            if len(cands) < 2:
                pool = [h for h in src if h not in made][:2]
                examples.update(zip(pool, _examples_of(bank, [src[h] for h in pool], Path(tmp))))
                encode(pool)
                cands = list(made.values())
            costs = tiers_.measure(rt, layout, cands, g, key_scale, rt.profile.k or 1)
            report(progress, "measure", 1, 1)
            timings["measure_s"] = time.perf_counter() - t
    limit = budget.limit_ms(costs.t0_ms) if budget is not None and costs is not None else None
    if limit is not None and top:   # no more copies than the budget needs, most used first
        for n in range(len(chosen) + 1):
            if _priced(top, kv_alone | set(chosen[:n]), costs, record.gated_out)[0] <= limit:
                chosen = chosen[:n]
                break
    keep = set(chosen)
    before, share_before = _priced(top, kv_alone | (set(copies) if baseline is None else baseline), costs,
                                   record.gated_out)
    after, share_after = _priced(top, kv_alone | keep, costs, record.gated_out)
    demote = [copies[h] for h in copies if h not in keep]
    add = [h for h in chosen if h not in copies]
    commits = 0
    if not dry_run and (demote or add or new_scales is not None):
        t = time.perf_counter()
        report(progress, "write", 0, 1)
        record_ = {"copies": len(chosen), "added": len(add), "removed": len(demote),
                   "ttft_budget": str(budget) if budget is not None else None,
                   "mean_ms": None if after is None else round(after, 2), "queries": record.queries}
        measured = costs if costs is not None and (given is not None or tiers_.stored_costs(stored) is None) else None
        commits = _write(bank, snap, demote, [(h, made[h], src[h], snap.keys[row[src[h].entry_id]]) for h in add],
                         new_scales, record_, measured, costs_from or "promote")
        report(progress, "write", 1, 1)
        timings["write_s"] = time.perf_counter() - t
    used_after = free_pages - sum(copies[h].pages if h in copies else g.pages_for(made[h].tokens) for h in chosen)
    return PromoteResult(
        promoted=len(add), demoted=len(demote), copies=len(chosen), sources=len(src), queries=record.queries,
        unknown=unknown, kv_share=round(share_after, 4), kv_share_before=round(share_before, 4),
        ttft_budget=str(budget) if budget is not None else None,
        costs_ms={k: round(v, 2) for k, v in asdict(costs).items() if v is not None} if costs is not None else None,
        mean_ms_before=None if before is None else round(before, 2),
        mean_ms_after=None if after is None else round(after, 2), limit_ms=None if limit is None else round(limit, 2),
        within=None if limit is None or after is None else bool(after <= limit), pages_free=int(used_after),
        commits=commits, dry_run=dry_run, timings_s={k: round(v, 2) for k, v in timings.items()},
        total_s=round(time.perf_counter() - t0, 2), fidelity={h.hex(): round(float(d), 4) for h, d in drop.items()})


def _write(bank: Bank, snap, demote: list, add: list, new_scales, record: dict, measured=None,
           costs_from: str = "promote") -> int:
    """Remove the ``demote`` copies, then add the new ones (``(hash, candidate, source entry, key)``),
    with their twin groups, gains and subject words; in one commit when the copies fit in what is
    free now, else the removals first. The bank's tiers record keeps ``record`` (what was done)
    and ``measured`` costs (when it had none; its latency budget is left as it is: a learn prices
    its source share with it). Returns the commits made."""
    g = bank.geo
    gone = {str(e.entry_id) for e in demote}
    need = sum(g.pages_for(c.tokens) for _, c, _, _ in add)
    u = bank.usage()
    phased = bool(demote) and (need > g.pages - u["pages_used"] or len(add) > g.slots - u["entries"])
    extra = snap.catalog.get("extra") or {}

    def drop(tx) -> None:
        for e in demote:
            tx.remove(e.slot)
        tx.set_extra(TWINS_KEY, {k: v for k, v in (extra.get(TWINS_KEY) or {}).items() if k not in gone})
        tx.set_extra(GAINS_KEY, {k: v for k, v in (extra.get(GAINS_KEY) or {}).items() if k not in gone})
        tasks, said = subj.unpack(extra.get(SUBJECTS_KEY))
        if tasks:
            tx.set_extra(SUBJECTS_KEY, subj.pack(tasks, {e: w for e, w in said.items() if str(e) not in gone}))

    commits = 0
    if phased:
        with bank.transaction() as tx:
            drop(tx)
        commits += 1
    with bank.transaction() as tx:
        if not phased:
            drop(tx)
        if new_scales is not None:
            tx.set_key_scales(new_scales)
        twins = {k: v for k, v in (extra.get(TWINS_KEY) or {}).items() if k not in gone}
        gains = {k: v for k, v in (extra.get(GAINS_KEY) or {}).items() if k not in gone}
        tasks, said = subj.unpack(extra.get(SUBJECTS_KEY))
        said = {e: w for e, w in said.items() if str(e) not in gone}
        groups = twins_from(snap.catalog)
        for h, c, s, key in add:
            got = tx.add(NewEntry(None, None, key, s.task, h, payload=c.payload, tokens=c.tokens))
            if got is None:
                raise BankError("the kv copies did not fit; this is a bug in the page accounting")
            group = groups.get(s.entry_id, s.entry_id)
            twins[str(s.entry_id)] = twins[str(got.entry_id)] = int(group)
            if str(s.entry_id) in gains:
                gains[str(got.entry_id)] = gains[str(s.entry_id)]
            if s.entry_id in said:
                said[got.entry_id] = said[s.entry_id]
        tx.set_extra(TWINS_KEY, twins)
        tx.set_extra(GAINS_KEY, gains)
        if tasks:
            tx.set_extra(SUBJECTS_KEY, subj.pack(tasks, said))
        tiers = dict(tiers_from(bank.catalog))
        tiers[PROMOTION_KEY] = record
        if measured is not None:
            tiers.update(costs_ms={k: round(v, 2) for k, v in asdict(measured).items() if v is not None},
                         costs_from=costs_from)
        tx.set_extra(TIERS_KEY, tiers)
    return commits + 1
