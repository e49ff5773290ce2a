"""Phase 3 of a learn: what each old entry is worth to the tasks already in the bank.

Every old task keeps a few *anchors* (examples stored in the bank's catalog). Each
anchor's query key retrieves its ``k`` nearest old entries; an entry's retention value
is the sum, over the anchors that retrieve it, of how much it raises their answer's
mean log-likelihood (clipped at 0).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from inducekv.learn.progress import steps

from inducekv.learn.calibrate import cosine
from inducekv.learn.candidates import Scorer
from inducekv.runtime.memory import key_of

log = logging.getLogger(__name__)


def anchor_image(rt, anchor: dict):
    """An image anchor's image, None for text anchors, False when its file is gone (skipped:
    anchors keep the path of the task file's image, not its pixels)."""
    path = anchor.get("image")
    if path is None:
        return None
    if not Path(path).is_file():
        log.warning("anchor image %s is missing; that anchor is skipped", path)
        return False
    return rt.encode_image(path)


def retention(rt, keys, scorer: Scorer, anchors: list[dict], old_keys: np.ndarray, old_kv, query_map, k: int,
              progress=False) -> np.ndarray:
    """(N_old,) retention value of each old entry; ``old_kv(j)``: float K/V of old entry j,
    None when it is gone; ``query_map``: the calibration applied to anchor keys."""
    out = np.zeros(len(old_keys))
    if not len(old_keys):
        return out
    for a in steps(anchors, "retain", "anchor", progress):
        image = anchor_image(rt, a)
        if image is False:
            continue
        q = query_map(key_of(rt, keys, a["prompt"], image))
        base = scorer.logp(a["prompt"], a["answer"], [], image)
        for j in np.argsort(-cosine(q, old_keys))[:k]:
            kv = old_kv(int(j))
            if kv is None:
                continue
            out[j] += max(scorer.logp(a["prompt"], a["answer"], [kv], image) - base, 0.0)
    return out
