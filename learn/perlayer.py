"""Per-layer compaction of entries (``ikv-learn --compact perlayer --keep F``, the default).

Each layer keeps its own ``ceil(F * T)`` of the entry's ``T`` tokens (at least the answer
span), at their original positions, and gets one attention-bias scalar that gives the
kept tokens the attention mass the whole entry had. Nothing moves: keys keep their RoPE
positions, the entry still spans ``T`` positions when injected, and the tokens a layer
did not keep are masked through the decoder's ``attention_bias`` input
(``kvquant.expand_into``). Stored as a sparse scheme (``k4v4s``: the dense codes of the
kept slots plus a slot map, ``kvquant`` docstring).

Importance (no rule about any word; works for image entries too): one probe pass over
the entry (``probe.onnx``: the decoder plus every layer's post-RoPE queries) gives, per
layer, the attention probability that the entry's **window rows** (the row before the
answer through the entry's last token; the last quarter when the template has no answer)
pay to each entry token, summed over heads and rows::

    imp[l, t] = sum_{h, r in window} softmax_t(q[l, h, r] . k[l, t] * scale)        (L, T)
    keep[l]   = answer span + top imp[l] up to c = max(ceil(F * T), |span|)
    bias[l]   = log( sum_{h,r} sum_{t < T} e[l,h,r,t] / sum_{h,r} sum_{t in keep[l]} e[l,h,r,t] )

with ``scale`` the model's own attention scale (``Manifest.score_scale``: 1/sqrt(D), or
Gemma 3's query_pre_attn_scalar ** -0.5) and ``e = exp(logit - the row's largest entry
logit)`` over the entry's tokens: the window rows' attention to
the entry as a whole is what it was before compaction (the prefix and the query see the
same split). Measured on dev questions (README, "Compact entries"): keep 0.5 holds the
full entry's accuracy at half its bytes; without the bias scalar it loses ~5 points.
"""
from __future__ import annotations

import math

import numpy as np

from inducekv.learn.compact import Probe, answer_span


def window_rows(T: int, span: tuple[int, int]) -> np.ndarray:
    """Entry rows whose attention scores importance: the row before the answer to the end."""
    a0, a1 = span
    start = max(a0 - 1, 0) if a1 > a0 else max(T - max(T // 4, 1), 0)
    return np.arange(start, T)


def entry_logits(queries: np.ndarray, keys: np.ndarray, rows: np.ndarray, first: int,
                 scale: float | None = None) -> np.ndarray:
    """(L, H, R, first + T) attention logits of entry ``rows`` (indices into the entry, at
    pass positions ``first + row``) over the prefix and the entry, -inf where causal masking
    hides a key. queries (L, T, H*D); keys (L, H_kv, first + T, D); ``scale``: the model's
    q.k scale (``Manifest.score_scale``), 1/sqrt(D) when None."""
    L, Hkv, N, D = keys.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    H = queries.shape[2] // D
    out = np.empty((L, H, len(rows), N), np.float64)
    hidden = np.arange(N)[None, :] > (first + rows)[:, None]                         # (R, N)
    for l in range(L):
        q = queries[l][rows].reshape(len(rows), H, D).transpose(1, 0, 2).astype(np.float64)   # (H, R, D)
        k = np.repeat(keys[l], H // Hkv, axis=0).astype(np.float64)                   # (H, N, D)
        out[l] = np.where(hidden[None], -np.inf, (q @ k.transpose(0, 2, 1)) * scale)
    return out


def choose(logits: np.ndarray, first: int, span: tuple[int, int], keep: float) -> tuple[np.ndarray, np.ndarray]:
    """Slot map (L, c) sorted entry-token indices and the per-layer mass bias (L,) from the
    window rows' logits (L, H, R, first + T): each layer keeps the answer span and the entry
    tokens it attends to most."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))                       # (L, H, R, N)
    p = (e / e.sum(axis=-1, keepdims=True))[..., first:]                         # the entry's T columns
    ent = logits[..., first:]
    e = np.exp(ent - ent.max(axis=-1, keepdims=True))                            # each row's max over the entry: 1
    L, _, _, T = e.shape
    a0, a1 = span
    c = min(T, max(math.ceil(keep * T), a1 - a0, 1))
    imp = p.sum(axis=(1, 2))                                                     # (L, T)
    imp[:, a0:a1] = np.inf                                                       # the answer span always stays
    slots = np.sort(np.argsort(-imp, axis=1, kind="stable")[:, :c], axis=1)      # (L, c)
    mass = e.sum(axis=(1, 2))                                                    # (L, T)
    bias = np.log(mass.sum(axis=1) / np.take_along_axis(mass, slots, axis=1).sum(axis=1))   # (L,) >= 0
    return slots, bias


class PerLayer:
    """``perlayer`` compaction for one runtime and layout: ``encode`` runs one probe pass per entry."""

    encodes = True   # learn.candidates: call encode() instead of encoding the entry first

    def __init__(self, rt, layout, keep: float):
        self.rt, self.layout, self.keep = rt, layout, keep
        self.probe = Probe(rt, "perlayer")

    def encode(self, prompt: str, answer: str, image=None) -> tuple[np.ndarray, np.ndarray, dict]:
        """The entry's kept K, V (L, H_kv, c, D) and its slot map (``kvquant.pack`` extras)."""
        return self.encode_many([(prompt, answer, image)])[0]

    def encode_many(self, items: list[tuple]) -> list[tuple[np.ndarray, np.ndarray, dict]]:
        """``encode`` for several (prompt, answer, image) in one probe pass."""
        lay = self.layout
        ids = [lay.entry_ids(p, a, im) for p, a, im in items]
        runs = self.probe.run_batch(ids, lay.prefix_cache, [np.arange(lay.p0, lay.p0 + len(x)) for x in ids],
                                    [im.features if im is not None else None for _, _, im in items])
        return [self._keep(p, a, im, *run) for (p, a, im), run in zip(items, runs)]

    def _keep(self, prompt: str, answer: str, image, q, keys, values) -> tuple[np.ndarray, np.ndarray, dict]:
        lay = self.layout
        p0, T = lay.p0, q.shape[1]
        span = answer_span(self.rt, lay, prompt, answer, image)
        slots, bias = choose(entry_logits(q, keys, window_rows(T, span), p0, self.rt.manifest.score_scale),
                             p0, span, self.keep)
        rows = np.arange(keys.shape[0])[:, None]
        k = keys[:, :, p0:][rows, :, slots].transpose(0, 2, 1, 3)                 # (L, H_kv, c, D)
        v = values[:, :, p0:][rows, :, slots].transpose(0, 2, 1, 3)
        return np.ascontiguousarray(k), np.ascontiguousarray(v), {"slots": slots, "slot_bias": bias, "span": T}
