"""The plain chat prompt's shared start, prefilled once (a prefix cache for no-memory prompts).

Every chat prompt with the same system message begins with the same tokens:

    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n | prompt ... <|im_end|>\\n<|im_start|>assistant\\n
    '---------------- cached: K/V (L, H_kv, P, D) ----------' '----------- prefilled per call ------------'

``PlainPrefix`` keeps that start's K/V per system message, so a prompt answered without memory
(``use_memory=False``, or a memory query that retrieves nothing or passes no relevance gate)
prefills only its own tokens, as the memory layouts already do for their template's prefix.
The cut is checked on the prompt's own token ids: a prompt whose ids do not start with the
cached ones is prefilled whole. The K/V of a prefix depends only on its tokens, so the answer is
the one the whole prompt gives (prefilled in two chunks: equal up to float rounding).
"""
from __future__ import annotations

import threading

import numpy as np

from inducekv.runtime.session import KVCache

MAX_SYSTEMS = 8   # system messages whose prefix is kept (~1 MB each on the default model)


class PlainPrefix:
    def __init__(self, rt):
        self.rt = rt
        self._cached: dict[str, tuple[list[int], KVCache]] = {}
        self._lock = threading.Lock()

    def split(self, ids: list[int], system: str | None) -> tuple[list[int], KVCache, int] | None:
        """(the ids to prefill, the cached past, the first one's position) for a plain chat
        prompt's ``ids``, or None when no cached prefix applies."""
        got = self._get(system)
        if got is None:
            return None
        pre, cache = got
        n = len(pre)
        if len(ids) <= n or ids[:n] != pre:
            return None
        return ids[n:], cache, n

    def _get(self, system: str | None) -> tuple[list[int], KVCache] | None:
        key = system or ""
        if key in self._cached or len(self._cached) >= MAX_SYSTEMS:
            return self._cached.get(key)
        with self._lock:
            if key not in self._cached:
                self._cached[key] = self._prefill(system)
        return self._cached[key]

    def _prefill(self, system: str | None) -> tuple[list[int], KVCache] | None:
        """The tokens two different one-word prompts share, less the last (a tokenizer may join
        it with the prompt's first characters), and their K/V."""
        a = self.rt.encode_prompt("a", system=system)
        b = self.rt.encode_prompt("Z", system=system)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        n -= 1
        if n < 1:
            return None
        pre = a[:n]
        _, cache = self.rt.decoder.forward(pre, KVCache.empty(self.rt.manifest), positions=np.arange(n),
                                           logits_from=n - 1)
        return pre, cache
