"""Shared checks of the exported graphs against transformers and against their own mask."""
from __future__ import annotations

import numpy as np


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of ``ids``: exactly ``n`` new token ids."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def biased_and_masked(rt, ids: list[int], slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of ``ids`` with a -1e9 attention bias on ``slot`` in every layer, the same with
    ``slot`` masked instead, and that bias (L, len(ids))."""
    from inducekv.runtime.session import KVCache

    empty = KVCache.empty(rt.manifest)
    bias = np.zeros((rt.manifest.num_layers, len(ids)), np.float32)
    bias[:, slot] = -1e9
    mask = np.ones(len(ids), np.int64)
    mask[slot] = 0
    biased, _ = rt.decoder.forward(ids, empty, bias=bias)
    masked, _ = rt.decoder.forward(ids, empty, mask=mask)
    return biased, masked, bias
