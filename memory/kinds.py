"""Entry kinds a bank holds (format 3, issue 19): the layout of a new bank for each.

    kinds    record                                    slots / pages                 keys
    kv       K/V in pages (format version 2 layout)    sized for kv entries          f32
    source   the example's bytes, inline (256 B)       ~all of the cap in slots      f16
             or in one-token pages (an image)          (pages hold images)
    tiered   either                                    a chosen share in slots       f16
                                                       (``learn.tiers`` sizes it)

The catalog's ``extra.tiers`` (``TIERS_KEY``) records a bank's kinds, and for tiered banks its
latency budget and the costs it plans with (written by ``ikv-learn``).
"""
from __future__ import annotations

from inducekv.core.errors import BankError

KINDS = ("kv", "tiered", "source")
SOURCE_SLOT_SHARE = 0.95   # a source bank's share of the cap in slots (the pages hold images)
MIN_SLOT_SHARE = 0.02
PAGE_TOKENS = {"tiered": 2, "source": 1}   # tiered: a page per 2 tokens (shorter page lists, smaller records)
SOURCE_MAX_TOKENS = 16   # a source bank's "longest kv entry": its page list (16 one-token pages, ~98 KB) bounds an image
INLINE_BYTES = 256    # a record's inline area: a one-line fact's prompt and answer fit (~60-150 bytes)
KEY_DTYPE = "f16"     # banks with source entries keep f16 retrieval keys (half the record)


def bank_kind_layout(kinds: str, slot_share: float | None = None) -> dict:
    """``Bank.create`` options of a new bank for ``--kinds`` (kv: none, the version-2 layout);
    ``slot_share``: the bank's share of the cap in slots (``learn.tiers.new_bank_share``; default: nearly all)."""
    if kinds not in KINDS:
        raise BankError(f"unknown entry kinds {kinds!r}; choose one of {', '.join(KINDS)}")
    if kinds == "kv":
        return {}
    share = SOURCE_SLOT_SHARE if slot_share is None else slot_share
    out = {"key_dtype": KEY_DTYPE, "inline_bytes": INLINE_BYTES, "slot_share": share, "page_tokens": PAGE_TOKENS[kinds]}
    if kinds == "source":   # no kv entries: one-token pages (an image wastes less of its last one), short page lists
        out["max_tokens"] = SOURCE_MAX_TOKENS
    return out


def tiers_catalog(kinds: str, ttft_budget: str | None = None, costs_ms: dict | None = None) -> dict:
    """The catalog's ``extra.tiers`` of a new bank with source entries."""
    return {"kinds": kinds, **({"ttft_budget": ttft_budget, "costs_ms": costs_ms} if ttft_budget or costs_ms else {})}
