"""Decode steps with the KV cache in preallocated buffers, appended in place.

For decoder graphs whose metadata says ``contract.KV_BUFFER_KEY`` = ``"shared"``
(``export/fuse.py``: GroupQueryAttention). Per layer, one buffer serves as both the past
input and the present output (onnxruntime IO binding)::

    buffer (1, H_kv, capacity, D) float32
        [0, length)            the cache so far (prefix, entries, the prefilled prompt)
        length                 written by the next step, in place
    attention_mask (1, length + 1) ones;  attention_bias (1, L, length + 1)

A step reads back only its logits (1, 1, V). The plain path
(``Decoder.forward``) instead gets a new present (1, H_kv, P + S, D) per layer every step:
onnxruntime copies the whole cache into it and Python converts 2L arrays, which at 135M
parameters is a visible share of a decode step (README "Decode speed").
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from inducekv.core import contract
from inducekv.runtime.session import _first_input


class InPlaceSteps:
    """Runs over one growing sequence; ``capacity`` bounds its length (past included)."""

    def __init__(self, dec, cache, capacity: int):
        m, L = dec.m, dec.m.num_layers
        P = cache.length
        if capacity <= P:
            raise ValueError(f"capacity {capacity} leaves no room after {P} cached slots")
        self.dec, self.length, self.capacity = dec, P, capacity
        io = dec.sess.io_binding()
        shape = (1, m.num_kv_heads, capacity, m.head_dim)
        self._keep = []   # the numpy buffers behind the bound OrtValues
        for i in range(L):
            for past, present, src in ((contract.past_key(i), contract.present_key(i), cache.keys[i]),
                                       (contract.past_value(i), contract.present_value(i), cache.values[i])):
                buf = np.empty(shape, np.float32)
                buf[:, :, :P] = src
                ov = ort.OrtValue.ortvalue_from_numpy(buf)
                io.bind_ortvalue_input(past, ov)
                io.bind_ortvalue_output(present, ov)
                self._keep.append((buf, ov))
        V = dec.sess.get_outputs()[0].shape[-1]
        self._logits = np.empty((1, 1, V if isinstance(V, int) else m.vocab_size), np.float32)
        io.bind_ortvalue_output(contract.LOGITS, ort.OrtValue.ortvalue_from_numpy(self._logits))
        for name in dec.out_names[1 + 2 * L:]:      # the probe graph's queries: computed, not read
            io.bind_output(name, "cpu")
        self._mask = np.ones((1, capacity), np.int64)
        self.io = io

    def run(self, ids: list[int], positions: np.ndarray, features: np.ndarray | None = None,
            bias: np.ndarray | None = None) -> np.ndarray:
        """Append ``ids`` (S,) at ``positions`` (S,); return the last row's logits (V,), a view
        valid until the next run. ``bias`` (L, length + S) or (length + S,), as ``Decoder.forward``.
        One token at a time: IO binding cannot set ``logits_from`` (an initializer onnxruntime
        lets ``run`` override, not ``bind_input``), so the logits buffer holds one row; prefill
        runs on ``Decoder.forward`` and its cache seeds the buffers."""
        S = len(ids)
        if S != 1:
            raise ValueError(f"in-place runs take one token, got {S}")
        T = self.length + S
        if T > self.capacity:
            raise ValueError(f"{T} slots exceed the buffers' capacity {self.capacity}")
        io, dec = self.io, self.dec
        for name, arr in _first_input(dec.embed, ids, features).items():   # (1, S) ids or (1, S, hidden)
            io.bind_cpu_input(name, arr)
        io.bind_cpu_input(contract.ATTENTION_MASK, self._mask[:, :T])                   # (1, T)
        io.bind_cpu_input(contract.POSITION_IDS, np.asarray(positions, np.int64).reshape(1, S))
        io.bind_cpu_input(contract.ATTENTION_BIAS, dec._bias(bias, T))                 # (1, L, T)
        dec.sess.run_with_iobinding(io)
        self.length = T
        return self._logits[0, -1]
