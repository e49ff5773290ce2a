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


def fact_bank(rt, path, facts, task: str, max_tokens: int = 64):
    """A 1 MiB fp16 bank at ``path`` holding every fact of ``facts`` as task ``task`` (``add_all``)."""
    from inducekv.memory.bank import Bank

    with Bank.create_for(path, 1 << 20, rt.manifest, scheme="fp16", force=True, max_tokens=max_tokens) as b:
        add_all(rt, b, facts, task)
    return path


def set_extra(path, key: str, value) -> None:
    """Overwrite one catalog extra of the bank at ``path`` (a gate record, say) in one commit."""
    from inducekv.memory.bank import Bank

    with Bank.open(path, writable=True) as b, b.transaction() as tx:
        tx.set_extra(key, value)
