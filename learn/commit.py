"""Phase 5 of a learn: the plan written to the bank, in one commit or two.

A transaction can only write new entries into pages that are free before it: until it
commits, the old state (which a kill must leave intact) still owns the pages of the
entries it evicts. So when the new entries need more than is free, the write is two
commits::

    commit 1 (evict):  remove the evicted entries, their gains and twin groups; mark the bank
                       ``learn_pending = {task, evicted, adding}``; store layout and
                       shared key scales if the plan brings them
    commit 2 (add):    the new entries, the task's anchors, gains, twin groups,
                       calibration, weighting, relevance gate; clear ``learn_pending``

and a kill leaves the bank in one of three states, each of which verifies:

    before           the bank as it was (killed before commit 1 finished)
    evicted          the old entries minus the evictions, ``learn_pending`` set
                     (killed between the commits): serves the kept entries; learn the
                     task again to fill the freed space
    after            the plan fully written

When the new entries fit in the free space (or nothing is evicted) it is one commit,
and a kill leaves *before* or *after* only. This is what lets a new task use the whole
cap: selection no longer has to keep a quarter of the bank free for the next learn.
"""
from __future__ import annotations

import time

from inducekv.core.errors import BankError
from inducekv.learn.compact import COMPACT_KEY
from inducekv.learn.defaults import GAINS_KEY
from inducekv.memory.bank import Bank
from inducekv.memory.format import PENDING_KEY, QUESTIONS_KEY, SUBJECTS_KEY, TWINS_KEY
from inducekv.learn.tiers import source_entry
from inducekv.runtime import questions as qgate
from inducekv.runtime import subjects as subj
from inducekv.runtime.memory import (INJECTION_KEY, RELEVANCE_KEY, TIERS_KEY, VALUE_GATES_KEY, Injection, relevance_from,
                                     value_gates_from)


def fits_now(bank: Bank, entry_tokens: list[int], source_bytes: list[int] = ()) -> bool:
    """Whether kv entries of these token counts and source entries of these byte counts fit in
    the pages and slots free before a commit."""
    g, u = bank.geo, bank.usage()
    pages = sum(g.pages_for(t) for t in entry_tokens) + sum(g.source_pages(n) for n in source_bytes)
    return pages <= g.pages - u["pages_used"] and len(entry_tokens) + len(source_bytes) <= g.slots - u["entries"]


def write(bank: Bank, p) -> list[int]:
    """Write the plan ``p`` (``learn.plan.Plan``); returns the new entries' ids in ``p.add`` order.

    Refuses a plan made against another generation of the bank (another writer committed
    in between): plan again."""
    bank.refresh()
    if bank.gen != p.bank_gen:
        raise BankError(f"{bank.path} changed since this plan was made (generation {p.bank_gen} -> {bank.gen}); "
                        "plan again")
    t = time.perf_counter()
    tokens = [p.candidates[ci].tokens for ci in p.add]
    src_bytes = [len(p.candidates[ci].source_bytes()) for ci in getattr(p, "sources", ())]
    phased = bool(p.evict) and not fits_now(bank, tokens, src_bytes)
    p.commits = 2 if phased else 1
    if phased:
        with bank.transaction() as tx:
            _metadata(tx, p)
            for s in p.evict:
                tx.remove(s)
            tx.set_extra(GAINS_KEY, dict(p.gains))
            tx.set_extra(TWINS_KEY, dict(p.twins))
            _subjects(tx, p, [])
            tx.set_extra(PENDING_KEY, {"task": p.task, "evicted": len(p.evict), "adding": len(p.add) + len(src_bytes)})
    with bank.transaction() as tx:
        if not phased:
            _metadata(tx, p)
            for s in p.evict:
                tx.remove(s)
        ids = _add(tx, p)
        tx.drop_extra(PENDING_KEY)  # also the mark of an earlier learn that was stopped between its commits
    p.timings["write_s"] = time.perf_counter() - t
    return ids


def _metadata(tx, p) -> None:
    """What the new entries are coded against: the layout, shared key scales, compaction record."""
    if p.template is not None:
        tx.set_template(p.template)
    if p.key_scales is not None:
        tx.set_key_scales(p.key_scales)
    if p.store_compaction:
        tx.set_extra(COMPACT_KEY, p.compaction.as_dict())


def _add(tx, p) -> list[int]:
    gains, ids = dict(p.gains), []
    for ci in p.add:
        c = p.candidates[ci]
        added = tx.add(c.entry(p.task))
        if added is None:
            raise BankError("the selected entries did not fit; this is a bug in the byte accounting")
        gains[str(added.entry_id)] = round(c.gain if c.value is None else c.value, 4)
        ids.append(added.entry_id)
    for ci in getattr(p, "sources", ()):   # a bank with source entries: the example itself (learn/tiers.py)
        c = p.candidates[ci]
        added = tx.add(source_entry(c, p.task, p.source_tokens[ci]))
        if added is None:
            raise BankError("the selected source entries did not fit; this is a bug in the slot accounting")
        gains[str(added.entry_id)] = round(c.gain if c.value is None else c.value, 4)
        ids.append(added.entry_id)
    if getattr(p, "tiers", None) is not None:
        tx.set_extra(TIERS_KEY, p.tiers.catalog())
    tx.set_anchors(p.task, p.anchors)
    tx.set_extra(GAINS_KEY, gains)
    tx.set_extra(TWINS_KEY, {**p.twins, **_new_twins(p, ids)})
    _subjects(tx, p, ids)
    if p.calibration.accepted:
        tx.set_calibration(*p.calibration.arrays)
    if p.injection.accepted:   # the bank-wide weighting (its gates: those of tasks without their own)
        now = Injection.from_catalog(tx.bank.catalog, tx.bank.geo.num_layers)
        tx.set_extra(INJECTION_KEY, Injection(p.injection.tau, now.gates).as_dict())
    if p.value_gates.accepted:   # this task's entries' value gates
        vg = {t: list(v) for t, v in value_gates_from(tx.bank.catalog, tx.bank.geo.num_layers).items()}
        tx.set_extra(VALUE_GATES_KEY, {**vg, p.task: list(p.value_gates.gates)})
    gates = {t: m for t, m in relevance_from(tx.bank.catalog).items() if t != p.task}
    if p.gate.margin is not None:
        gates[p.task] = p.gate.margin
    tx.set_extra(RELEVANCE_KEY, gates)
    now = (tx.bank.catalog.get("extra") or {}).get(QUESTIONS_KEY) or {}
    asked = dict(now.get("tasks") or {}) if now.get("version") == qgate.VERSION else {}   # (another version: refitted)
    asked.pop(p.task, None)
    if getattr(p.gate, "questions", None):
        asked[p.task] = p.gate.questions
    if asked:
        tx.set_extra(QUESTIONS_KEY, {"version": qgate.VERSION, "tasks": asked})
    else:
        tx.drop_extra(QUESTIONS_KEY)
    return ids


def _subjects(tx, p, ids: list[int]) -> None:
    """The subject gate's record (``runtime/subjects.py``): the kept old entries', and this
    task's new entries' when its gate is on (``ids``: the new entries' ids as ``_add`` wrote them)."""
    rec = getattr(p, "subjects", None) or {}
    tasks, entries = subj.unpack(rec)
    words = getattr(p, "subject_words", None)
    if words is not None:   # on: this task's kept old entries keep their words too
        tasks.add(p.task)
        entries.update(getattr(p, "subjects_own", None) or {})
        made = list(p.add) + list(getattr(p, "sources", ()))   # the order ``_add`` wrote them in
        entries.update({eid: words[ci] for ci, eid in zip(made, ids)})
    if tasks:
        tx.set_extra(SUBJECTS_KEY, subj.pack(tasks, entries))
    else:
        tx.drop_extra(SUBJECTS_KEY)


def pending(bank: Bank) -> dict | None:
    """The interrupted learn a bank was left in the middle of (``{task, evicted, adding}``), or None."""
    got = (bank.catalog.get("extra") or {}).get(PENDING_KEY)
    return got if isinstance(got, dict) else None


def _new_twins(p, ids: list[int]) -> dict[str, int]:
    """Entry id -> twin group (its group's lowest new entry id) for the new entries that have
    a twin among them (``learn.value.twin_groups``)."""
    if p.twin_group is None:
        return {}
    members: dict[int, list[int]] = {}
    for ci, eid in zip(p.add, ids):
        members.setdefault(p.twin_group[ci], []).append(eid)
    return {str(e): min(m) for m in members.values() if len(m) > 1 for e in m}
