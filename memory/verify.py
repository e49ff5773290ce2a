"""Full consistency check of a bank file (``ikv-bank verify``)."""
from __future__ import annotations

import zlib

import numpy as np

from inducekv.memory import format as fmt
from inducekv.memory.bank import Bank
from inducekv.memory.source import unpack_source
from inducekv.core.errors import BankError


def verify(path, *, payloads: bool = True) -> dict:
    """Check header, both superblocks, every current record and (optionally) every payload.

    Returns ``{"ok": bool, "problems": [str], "gen": int | None, "entries": int}``;
    never raises for a bad file (the problems say what is wrong).
    """
    report = {"ok": False, "problems": [], "gen": None, "entries": 0, "superblocks": [None, None]}
    try:
        bank = Bank.open(path)
    except BankError as e:
        report["problems"].append(str(e))
        return report
    with bank:
        g, p = bank.geo, report["problems"]
        for copy in (0, 1):
            sb = fmt.Superblock.parse(bank.region("superblock", copy), g)
            report["superblocks"][copy] = None if sb is None else sb.gen
        snap = bank.snapshot()
        report["gen"] = snap.gen
        owner = np.full(g.pages, -1, np.int64)
        seen_ids = set()
        tasks = {int(k) for k in snap.catalog["tasks"]}
        for r in bank.records():
            s, t, n, np_, eid = r.slot, r.tokens, r.nbytes, r.n_pages, r.entry_id
            if r.kind not in fmt.KINDS or (r.kind == fmt.KIND_SOURCE and not g.sources):
                p.append(f"slot {s}: entry kind {r.kind} is unknown to this bank")
                continue
            if r.kind == fmt.KIND_SOURCE:
                if not (1 <= t <= fmt.MAX_ENTRY_TOKENS) or np_ != g.source_pages(n):
                    p.append(f"slot {s}: source entry tokens={t}, nbytes={n}, pages={np_} are inconsistent")
                    continue
            elif not (1 <= t <= g.max_tokens) or n != g.payload_nbytes(t) or np_ != g.pages_for(t):
                p.append(f"slot {s}: tokens={t}, nbytes={n}, pages={np_} are inconsistent")
                continue
            if r.pages.max(initial=0) >= g.pages:
                p.append(f"slot {s}: page number out of range")
                continue
            clash = owner[r.pages][owner[r.pages] >= 0]
            if len(clash):
                p.append(f"slot {s}: shares pages with slot {int(clash[0])}")
            owner[r.pages] = s
            if eid in seen_ids or eid >= snap.next_entry_id:
                p.append(f"slot {s}: entry id {eid} is duplicated or beyond the bank's counter")
            seen_ids.add(eid)
            if r.task_id not in tasks:
                p.append(f"slot {s}: task id {r.task_id} is not in the catalog")
            if payloads:
                raw = bank.inline_bytes(s, n) if (r.kind == fmt.KIND_SOURCE and np_ == 0) else bank.stored_bytes(r.pages, n)
                if zlib.crc32(raw) != r.payload_crc:
                    p.append(f"slot {s}: payload checksum mismatch (entry {eid})")
                elif r.kind == fmt.KIND_SOURCE:
                    try:
                        unpack_source(raw)
                    except BankError as e:
                        p.append(f"slot {s}: {e} (entry {eid})")
        try:
            bank.calibration()
        except BankError as e:
            p.append(str(e))
        try:
            if snap.entries and g.scales_bytes and bank.key_scales() is None:
                p.append(f"the bank holds {g.scheme} entries but no key scales to decode them")
        except BankError as e:
            p.append(str(e))
        report["entries"] = len(snap.entries)
    report["ok"] = not report["problems"]
    return report

