"""Test helpers over the learn API."""
from __future__ import annotations

from inducekv.learn import plan, write


def add_all(rt, bank, examples, task: str, template: str | None = None, policy: str | None = None) -> list[int]:
    """Write every example of ``examples`` that fits into ``bank`` (no selection, no anchors, no
    swap reserve) through the learn layer; returns the slots written."""
    p = plan(rt, bank, examples, task, strategy="all", reserve=0.0, n_anchors=0, template=template, policy=policy)
    ids = write(bank, p)
    slot_of = bank.slot_of()
    return [slot_of[i] for i in ids]
