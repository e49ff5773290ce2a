"""Memory on the device: prompt layout around injected entries, entry encoding, retrieval.

Entries are written by the learn layer (``inducekv.learn``); this module only reads them.

The prompt with memory (README, "Memory")::

    [shared prefix: chat start + system text]        computed once, cached
    [entry 1 K/V] ... [entry k K/V]                   retrieved, dequantized, each encoded on its own
    [query: end of system turn, user turn, assistant start]

An entry's K/V is computed once, when it is written: its rendered text
(``Template.entry``) run through the decoder *after the shared prefix*, at positions
``P0..P0+T-1`` (P0 = prefix length). So entries never carry their own attention sink,
and one entry injected where it was computed reproduces a joint prefill exactly.

Position policies (where k entries sit):
- ``rerotate``: consecutive, entry j at ``P0 + sum(T_<j)``; keys re-rotated in numpy.
- ``parallel``: all at ``P0..``, the query after the longest (parallel context windows).

Threads: one ``Memory`` serves any number of threads. Each thread assembles its past KV
in its own buffers (``Layout``), and the bank state a query sees (refresh after a writer's
commit, index sync, search, payload reads, weighting, key scales) is read under one lock
(``Memory.lookup``), so every query is answered from one committed state: the one before
a concurrent commit or the one after it. The key pass, dequantization and decoding run
outside the lock.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from inducekv.kernels import kvquant
from inducekv.kernels.positions import layer_thetas, rerotate_
from inducekv.memory.bank import Bank
from inducekv.memory.format import RELEVANCE_KEY, VALUE_GATES_KEY   # catalog extras (memory/format.py)
from inducekv.memory import uses as uses_
from inducekv.memory.format import TWINS_KEY       # catalog extra: entry id -> twin group
from inducekv.memory.format import QUESTIONS_KEY   # catalog extra: per image task, its question keys (runtime/questions.py)
from inducekv.memory.format import TIERS_KEY       # catalog extra: kinds of entries, latency budget (learn/tiers.py)
from inducekv.memory.format import SUBJECTS_KEY    # catalog extra: per text task, its entries' subject words (runtime/subjects.py)
from inducekv.memory.index import open_index
from inducekv.memory.source import unpack_source
from inducekv.core.errors import InduceKVError
from inducekv.runtime import questions as qgate
from inducekv.runtime import subjects
from inducekv.runtime.session import shared_past, KVCache, KeyEncoder, require_memory_support
from inducekv.runtime.vision import with_image

POLICIES = ("rerotate", "parallel")
TEXT_KEYS = 256   # prompts whose text keys a Memory remembers (the question gate's)
_ENTRIES, _USER = "\x00IKV-ENTRIES\x00", "\x00IKV-USER\x00"


@dataclass(frozen=True)
class Template:
    name: str
    system: str   # system text before the entries
    entry: str    # one entry, a format string over {prompt} and {answer}


TEMPLATES = {
    t.name: t
    for t in (
        # measured on SmolLM2-135M (benchmarks/memory_eval.py): a statement the model can copy works best
        Template("facts", "Answer using the facts below.\n", "Fact: {prompt} The answer is {answer}.\n"),
        Template("notes", "You are a helpful assistant. Use these notes to answer.\n", "{prompt} {answer}\n"),
        Template("qa", "You are a helpful assistant. Answer like these examples.\n", "Q: {prompt}\nA: {answer}\n"),
    )
}
DEFAULT_TEMPLATE, DEFAULT_POLICY = "facts", "rerotate"


def template_from(spec: dict | None) -> tuple[Template, str]:
    """The bank's stored layout ``{"template": {...}, "policy": str}`` or the defaults."""
    spec = spec or {}
    t = spec.get("template") or asdict(TEMPLATES[DEFAULT_TEMPLATE])
    policy = spec.get("policy", DEFAULT_POLICY)
    if not isinstance(t, dict) or not all(isinstance(t.get(f), str) for f in ("name", "system", "entry")):
        raise InduceKVError("the bank's prompt template is malformed; rewrite it with ikv-learn")
    if policy not in POLICIES:
        raise InduceKVError(f"unknown position policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return Template(t["name"], t["system"], t["entry"]), policy


INJECTION_KEY = "injection"   # catalog extra: the fitted Injection (ikv-learn's calibration)
MIN_WEIGHT = 1e-3             # weighted entries below this share of attention are not injected


def relevance_from(catalog: dict) -> dict[str, float]:
    """The bank's relevance gate: per task, the least margin (``gate_margin``: the top-1 retrieval
    score minus that of the best entry that is not its twin)
    a query needs for that task's top-1 entry to be injected; below it the query is answered
    without memory (fitted by ``ikv-learn``, ``learn/gate.py``; a task without one is never gated)."""
    raw = (catalog.get("extra") or {}).get(RELEVANCE_KEY) or {}
    if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) and np.isfinite(v) and 0 <= v <= 2
                                            for v in raw.values()):
        raise InduceKVError("the bank's relevance gate is malformed; relearn a task to refit it")
    return {str(k): float(v) for k, v in raw.items()}


def value_gates_from(catalog: dict, num_layers: int) -> dict[str, tuple[float, ...]]:
    """Per task, the gates (one per layer) on its entries' injected values, fitted by ``ikv-learn``
    on that task's examples (``learn/calibrate.py``); a task without any uses the bank-wide
    ``Injection.gates`` (None: unscaled)."""
    raw = (catalog.get("extra") or {}).get(VALUE_GATES_KEY) or {}
    if not isinstance(raw, dict) or not all(
            isinstance(g, list) and len(g) == num_layers
            and all(isinstance(x, (int, float)) and np.isfinite(x) and 0 <= x <= 4 for x in g) for g in raw.values()):
        raise InduceKVError("the bank's value gates are malformed; relearn a task to refit them")
    return {str(k): tuple(float(x) for x in g) for k, g in raw.items()}


def twins_from(catalog: dict) -> dict[int, int]:
    """Entry id -> twin group (entries a learn found to answer each other's questions:
    duplicates of one fact); an entry not listed is a group of its own."""
    raw = (catalog.get("extra") or {}).get(TWINS_KEY) or {}
    try:
        out = {int(k): int(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise InduceKVError("the bank's twin groups are malformed; relearn a task to refit them") from None
    return out


def tiers_from(catalog: dict) -> dict:
    """The bank's tier settings (``ikv-learn --kinds tiered``): ``max_source``, the most source
    entries re-encoded for one query (the latency budget), and what it was derived from."""
    raw = (catalog.get("extra") or {}).get(TIERS_KEY) or {}
    m = raw.get("max_source") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or (m is not None and not (isinstance(m, int) and 0 <= m <= 4096)):
        raise InduceKVError("the bank's tier settings are malformed; relearn a task to rewrite them")
    return raw


READ_TRIES = 4   # searches of one lookup when a writer commits while its entries are read (then the new state)
TWIN_LOOK = 8   # entries past the top-1 searched for the first one that is not its twin (the gate's margin)


def gate_margin(ids, scores, twins: dict[int, int]) -> float:
    """How far the top-1 entry stands out: its score minus that of the best entry that is
    not its twin (no such entry among those searched: minus the last one's)."""
    group = lambda e: twins.get(int(e), -1 - int(e))
    for e, s in zip(ids[1:], scores[1:]):
        if group(e) != group(ids[0]):
            return float(scores[0] - s)
    return float(scores[0] - scores[-1])


@dataclass(frozen=True)
class Injection:
    """How k retrieved entries are weighted when injected: entry j's slots get the additive
    attention bias ``log(alpha_j)``, ``alpha = softmax(score / tau)`` over the k retrieval
    scores, and layer l's injected values are scaled by ``gates[l]``. Fitted on device by ``ikv-learn``
    (kept only when it lowers the answer loss of the task's examples) and stored in the bank's
    catalog: tau bank-wide, gates per task (``value_gates_from``; ``gates`` here: tasks without their own)."""
    tau: float | None = None                 # None: no bias (every entry at full weight: k=1 behaviour)
    gates: tuple[float, ...] | None = None   # None: values unscaled

    def weights(self, scores) -> np.ndarray | None:
        """alpha (k,) from retrieval scores, or None when entries are not weighted."""
        if self.tau is None or len(scores) < 2:
            return None
        z = np.asarray(scores, np.float64) / self.tau
        e = np.exp(z - z.max())
        return e / e.sum()

    def plan(self, scores) -> tuple[list[int], np.ndarray | None]:
        """Which of k retrieved entries (scores best first) to inject, in injection order, and
        their weights: entries whose weight is below ``MIN_WEIGHT`` are left out (they would get
        no attention, only cost prefill and push the query away), and the best entry goes
        last, nearest the query (measured: k=4 oracle 0.40 best-last vs 0.27 best-first)."""
        w = self.weights(scores)
        keep = list(range(len(scores))) if w is None else [i for i in range(len(scores)) if w[i] >= MIN_WEIGHT]
        order = keep[::-1]
        if w is None:
            return order, None
        kept = w[order]
        return order, kept / kept.sum()

    def as_dict(self) -> dict:
        return {"tau": self.tau, "gates": list(self.gates) if self.gates is not None else None}

    @classmethod
    def from_catalog(cls, catalog: dict, num_layers: int) -> "Injection":
        raw = (catalog.get("extra") or {}).get(INJECTION_KEY) or {}
        tau, gates = raw.get("tau"), raw.get("gates")
        ok = (tau is None or (isinstance(tau, (int, float)) and tau > 0)) and (
            gates is None or (isinstance(gates, list) and len(gates) == num_layers
                              and all(isinstance(g, (int, float)) and 0 <= g <= 4 for g in gates)))
        if not ok:
            raise InduceKVError("the bank's injection calibration is malformed; relearn a task to refit it")
        return cls(float(tau) if tau is not None else None, tuple(float(g) for g in gates) if gates else None)


def entry_bias(p0: int, lengths: list[int], weights: np.ndarray | None,
               masks: list[np.ndarray | None] | None = None) -> np.ndarray | None:
    """Additive attention bias over the prefix and injected entries: 0 on the prefix,
    log(alpha_j) on entry j's slots; None when unweighted and unmasked. ``masks``: per entry
    None or the (L, T_j) bias of a sparse entry (``kvquant.expand_into``), added per layer;
    with any mask the result is (L, p0 + sum(lengths)), else (p0 + sum(lengths),)."""
    logw = [0.0] * len(lengths) if weights is None else [np.log(max(float(w), 1e-30)) for w in weights]
    if masks is None or all(m is None for m in masks):
        if weights is None:
            return None
        return np.concatenate([np.zeros(p0, np.float32)] + [np.full(T, w, np.float32) for T, w in zip(lengths, logw)])
    L = next(m for m in masks if m is not None).shape[0]
    parts = [np.zeros((L, p0), np.float32)]
    for T, w, m in zip(lengths, logw, masks):
        parts.append((np.zeros((L, T), np.float32) if m is None else np.asarray(m, np.float32)) + np.float32(w))
    return np.concatenate(parts, axis=1)                                          # (L, p0 + ΣT)


def render_entry(template: Template, prompt: str, answer: str) -> str:
    return template.entry.replace("{prompt}", prompt).replace("{answer}", answer)


class Layout:
    """Token layout of one template over one runtime, with the shared prefix KV cached."""

    def __init__(self, rt, template: Template, policy: str, system: str | None = None):
        if policy not in POLICIES:
            raise InduceKVError(f"unknown position policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.rt, self.template, self.policy = rt, template, policy
        sys_text = (system + "\n") if system else template.system
        text = rt.tokenizer.render([{"role": "system", "content": sys_text + _ENTRIES},
                                    {"role": "user", "content": _USER}])
        if text.count(_ENTRIES) != 1 or text.count(_USER) != 1:
            raise InduceKVError("the bundle's chat template drops the system or user text; memory needs both")
        prefix, rest = text.split(_ENTRIES)
        self._mid, self._tail = rest.split(_USER)
        self.prefix_ids = rt.tokenizer.encode(prefix)
        self._local = threading.local()   # .store: this thread's past-KV buffers (see _buffers)
        _, self.prefix_cache = rt.decoder.forward(self.prefix_ids, KVCache.empty(rt.manifest),
                                                  logits_from=len(self.prefix_ids) - 1)

    def _buffers(self, total: int) -> tuple[np.ndarray, np.ndarray]:
        """Past-KV buffers (L, 1, H_kv, total, D), reused across the queries of one thread: fresh
        20+ MB arrays cost ~10 ms of page faults. Each thread has its own pair, so an assembled
        cache is valid until that thread's next assemble (the decoder's prefill copies it)."""
        m = self.rt.manifest
        shape = (m.num_layers, 1, m.num_kv_heads, total, m.head_dim)
        n = int(np.prod(shape))
        store = getattr(self._local, "store", None)
        if store is None or store[0].size < n:
            store = self._local.store = (np.empty(n, np.float32), np.empty(n, np.float32))
        return store[0][:n].reshape(shape), store[1][:n].reshape(shape)

    @property
    def p0(self) -> int:
        return len(self.prefix_ids)

    def query_ids(self, prompt: str, image=None) -> list[int]:
        """The query after the entries; ``image`` (``vision.ImageInput``) goes into the user turn."""
        return self.rt.tokenizer.encode(self._mid + with_image(prompt, image, self.rt.manifest) + self._tail, bos=False)

    def entry_ids(self, prompt: str, answer: str, image=None) -> list[int]:
        """One entry's tokens: the image's placeholders (if any), then the rendered template."""
        return self.rt.tokenizer.encode((image.text if image is not None else "")
                                        + render_entry(self.template, prompt, answer), bos=False)

    def encode_entry(self, prompt: str, answer: str, image=None) -> tuple[np.ndarray, np.ndarray]:
        """K/V (L, H_kv, T, D) of one rendered entry, computed after the shared prefix; an
        image-bearing entry's payload holds its image tokens' K/V too."""
        ids = self.entry_ids(prompt, answer, image)
        _, cache = self.rt.decoder.forward(ids, self.prefix_cache, features=_features(image), logits_from=len(ids) - 1)
        P0 = self.p0
        k = np.stack([x[0, :, P0:] for x in cache.keys])                     # (L, H_kv, T, D)
        v = np.stack([x[0, :, P0:] for x in cache.values])
        return k, v

    def encode_entries(self, items: list[tuple]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``encode_entry`` for several (prompt, answer, image) in one padded decoder pass."""
        ids = [self.entry_ids(p, a, im) for p, a, im in items]
        B, P0 = len(ids), self.p0
        past_k, past_v = shared_past(self.prefix_cache, B)
        _, cache = self.rt.decoder.forward_batch(ids, past_k, past_v, [P0] * B,
                                                 [np.arange(P0, P0 + len(x)) for x in ids],
                                                 [_features(im) for _, _, im in items], logits=False)
        return [(np.stack([x[r, :, P0:P0 + len(t)] for x in cache.keys]),       # (L, H_kv, T_r, D)
                 np.stack([x[r, :, P0:P0 + len(t)] for x in cache.values])) for r, t in enumerate(ids)]

    def assemble(self, entries: list[tuple], gates=None) -> tuple[KVCache, int]:
        """Past KV = prefix + float entries (L, H_kv, T, D) by the policy; returns it and the
        query's first position. An entry is ``(k, v)`` or ``(k, v, mask)`` (a sparse entry
        expanded to its span; its mask goes to ``entry_bias``). ``gates`` (L,): per-layer
        factors on the entries' values."""
        def fill(j, out_k, out_v):
            out_k[...] = entries[j][0]
            out_v[...] = entries[j][1]

        return self._assemble([e[0].shape[2] for e in entries], fill, gates)

    def assemble_payloads(self, payloads: list[tuple[bytes, int]], scheme: str, gates=None,
                          key_scale: np.ndarray | None = None) -> tuple[KVCache, int]:
        """Like ``assemble`` for quantized ``(payload, tokens)`` of a dense scheme: dequantized
        straight into place (``key_scale``: the bank's shared key scales, for the schemes that
        have them). Sparse schemes need their masks: use ``assemble_masked``."""
        if scheme in kvquant.SPARSE:
            raise InduceKVError(f"{scheme} entries carry per-layer masks; use Layout.assemble_masked")
        cache, pos, _ = self.assemble_masked(payloads, scheme, gates, key_scale)
        return cache, pos

    def assemble_masked(self, payloads: list[tuple[bytes, int]], scheme: str, gates=None,
                        key_scale: np.ndarray | None = None) -> tuple[KVCache, int, list | None]:
        """``assemble_payloads`` for any scheme: also returns, for a sparse scheme, each entry's
        (L, T) bias for ``entry_bias`` (None for dense schemes).

        A sparse entry is not expanded: each layer's past holds only the T slots it kept, in
        the same T past positions for every layer (the layers kept different tokens, but
        attention does not care where a key sits in the past: its RoPE rotation carries its
        position). Positions still advance by the entry's span, so the query sits where it
        would after the full entry; the entry's bias is ``slot_bias[l]`` on its T slots. The
        same attention as the expanded entry with its dropped tokens masked (tested), with
        half the past and no zero-filling."""
        return self.assemble_mixed(payloads, scheme, gates, key_scale)

    def assemble_mixed(self, items: list[tuple], scheme: str, gates=None,
                       key_scale: np.ndarray | None = None) -> tuple[KVCache, int, list | None]:
        """``assemble_masked`` where an item is either ``(payload, tokens)`` of the bank's scheme
        or float ``(k, v)`` (L, H_kv, T, D) of a freshly encoded source entry (dense: its mask
        is None). Returns the cache, the query's first position and the per-entry (L, T) biases
        (None when no entry is sparse)."""
        m = self.rt.manifest
        L, H, D = m.num_layers, m.num_kv_heads, m.head_dim
        sparse = scheme in kvquant.SPARSE
        lengths, spans, masks = [], [], []
        for it in items:
            if isinstance(it[0], np.ndarray):                                   # float (k, v)
                lengths.append(it[0].shape[2])
                spans.append(it[0].shape[2])
                masks.append(None)
            elif sparse:
                _, b, span = kvquant.slot_map(it[0], scheme, L, H, it[1], D)    # (slots, slot_bias, span)
                lengths.append(it[1])
                spans.append(span)
                masks.append(np.repeat(b[:, None], it[1], axis=1))             # (L, T)
            else:
                lengths.append(it[1])
                spans.append(it[1])
                masks.append(None)

        def fill(j, out_k, out_v):
            it = items[j]
            if isinstance(it[0], np.ndarray):
                out_k[...], out_v[...] = it[0], it[1]
            else:
                kvquant.unpack_into(it[0], scheme, out_k, out_v, key_scale)

        cache, pos = self._assemble(lengths, fill, gates, spans=spans)
        return cache, pos, (masks if any(mk is not None for mk in masks) else None)

    def encode_source(self, buf: bytes) -> tuple[np.ndarray, np.ndarray]:
        """K/V (L, H_kv, T, D) of a ``source`` entry's bytes (``memory/source.py``), encoded
        now exactly as a kv entry was when it was learned."""
        src = unpack_source(buf)
        image = self.rt.encode_image(src.image) if src.image is not None else None
        return self.encode_entry(src.prompt, src.answer, image)

    def source_ids(self, buf: bytes) -> tuple[list[int], np.ndarray | None]:
        """A ``source`` entry's tokens and its image's feature rows (or None), to prefill in
        one pass with the query: right after the shared prefix, with nothing injected before
        it, that is the same K/V ``encode_source`` computes (causal attention), without a
        second decoder call."""
        src = unpack_source(buf)
        image = self.rt.encode_image(src.image) if src.image is not None else None
        return self.entry_ids(src.prompt, src.answer, image), _features(image)

    def _assemble(self, lengths: list[int], fill, gates=None, spans: list[int] | None = None) -> tuple[KVCache, int]:
        """Past = prefix + entries of ``lengths`` past slots; ``spans``: the positions each
        entry takes (default: its length; a sparse entry's span, ``assemble_masked``)."""
        if not lengths:
            return self.prefix_cache, self.p0
        spans = lengths if spans is None else spans
        m = self.rt.manifest
        P0, theta = self.p0, layer_thetas(m.rope, m.num_layers)
        total = P0 + sum(lengths)
        ks, vs = self._buffers(total)                                             # (L, 1, H_kv, P0+ΣT, D) each
        for i in range(m.num_layers):
            ks[i, :, :, :P0] = self.prefix_cache.keys[i]
            vs[i, :, :, :P0] = self.prefix_cache.values[i]
        at, shift = P0, 0
        for j, T in enumerate(lengths):
            out_k, out_v = ks[:, 0, :, at:at + T], vs[:, 0, :, at:at + T]                 # (L, H_kv, T, D) views
            fill(j, out_k, out_v)
            if self.policy == "rerotate":
                rerotate_(out_k, shift, theta)
            at += T
            shift += spans[j]
        if gates is not None:
            vs[:, 0, :, P0:at] *= np.asarray(gates, np.float32)[:, None, None, None]   # (L, 1, 1, 1)
        nxt = P0 + (sum(spans) if self.policy == "rerotate" else max(spans))
        return KVCache(list(ks), list(vs)), nxt


@dataclass(frozen=True)
class Lookup:
    """What one query reads from a bank, all from the same committed state (``Memory.lookup``)."""
    found: list               # [(info dict, verified payload bytes)], best first
    injection: Injection      # the bank's weighting at that state, with the top-1 entry's task's value gates
    key_scale: np.ndarray | None  # the bank's shared key scales (L, H_kv, D) float16, or None
    gated: int = 0            # retrieved entries left out by the gates (relevance, subject, question)


class Memory:
    """A bank opened for serving: key pass, calibration, search, read, layout (thread-safe)."""

    def __init__(self, rt, bank: Bank):
        require_memory_support(rt.manifest)
        self.rt, self.bank = rt, bank
        self.keys = rt.key_encoder()
        if self.keys.dim != bank.geo.key_dim:
            raise InduceKVError(f"bank keys are {bank.geo.key_dim}-d but this bundle makes {self.keys.dim}-d keys")
        self.index = open_index(bank)
        self._layouts: dict = {}
        self._lock = threading.Lock()          # the bank state and the index (see the module docstring)
        self._layouts_lock = threading.Lock()  # building a layout (one prefix prefill each)
        self._reference = None                 # the question gate's reference keys, on first need
        self._text_keys: dict = {}             # prompt -> its text key (``text_key``)
        self._text_lock = threading.Lock()
        self._subjects = (None, (set(), {}))   # (the catalog it was read from, subjects.unpack of it)
        self._stale = False                    # an entry the search found was gone when read (caller holds the lock)
        self.use_counts = uses_.Counter()      # what each query injected (``memory/uses.py``; promotion on use)

    def uses(self) -> "uses_.Uses":
        """How often this process served each of the bank's examples so far (not yet saved)."""
        return self.use_counts.peek()

    def save_uses(self, path) -> "uses_.Uses":
        """Add the counts since the last save to the uses record ``path`` (created when absent,
        written atomically), for ``ikv-learn --promote``; returns the record's new totals."""
        got = self.use_counts.take()
        try:
            return uses_.add_to(path, got)
        except BaseException:
            self.use_counts.give_back(got)
            raise

    def close(self) -> None:
        self.bank.close()

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def injection(self) -> Injection:
        """The bank's fitted injection weighting (re-read after each commit a writer makes)."""
        return Injection.from_catalog(self.bank.catalog, self.bank.geo.num_layers)

    def layout(self, system: str | None = None) -> Layout:
        template, policy = template_from(self.bank.catalog.get("template"))
        key = (template, policy, system)
        got = self._layouts.get(key)
        if got is None:
            with self._layouts_lock:
                got = self._layouts.get(key)
                if got is None:
                    got = self._layouts[key] = Layout(self.rt, template, policy, system)
        return got

    def reference(self) -> np.ndarray:
        """The question gate's reference keys (``questions.REFERENCE``), computed on first need."""
        if self._reference is None:
            self._reference = qgate.unit(self.keys.batch([self.rt.tokenizer.encode(t) for t in qgate.REFERENCE]))
        return self._reference

    def text_key(self, prompt: str) -> np.ndarray:
        """The key of the prompt text alone (the question gate's), remembered for the last
        ``TEXT_KEYS`` prompts: an app asks the same few questions of many images."""
        got = self._text_keys.get(prompt)
        if got is None:
            got = self.query_key(prompt)
            with self._text_lock:
                self._text_keys[prompt] = got
                while len(self._text_keys) > TEXT_KEYS:
                    del self._text_keys[next(iter(self._text_keys))]   # the oldest
        return got

    def query_key(self, prompt: str, image=None) -> np.ndarray:
        return key_of(self.rt, self.keys, prompt, image)

    def retrieve(self, prompt: str, k: int, timings=None, margin: float | None = None,
                 image=None) -> list[tuple[dict, bytes]]:
        """Top-k entries for ``prompt``: ``[(info, verified payload)]``, best first (``lookup``)."""
        return self.lookup(prompt, k, timings, margin, image).found

    def lookup(self, prompt: str, k: int, timings=None, margin: float | None = None, image=None) -> Lookup:
        """Top-k entries for ``prompt`` with the weighting and key scales to inject them by, all
        read from one committed state of the bank (a writer's commits are followed first).

        ``margin`` makes k adaptive: only entries scoring within ``margin`` of the best
        one are kept (a lone clear winner comes alone; near-ties come together)."""
        t0 = time.perf_counter()
        key = self.query_key(prompt, image) if k > 0 else None   # the key pass needs no bank state
        # the question gate's text key (runtime/questions.py): the key itself for a text query; an
        # image query's bare question costs one more short key pass, only in a bank with such gates
        by_question = k > 0 and QUESTIONS_KEY in (self.bank.catalog.get("extra") or {})
        if by_question:
            self.reference()   # (computed once, outside the lock)
        text_key = key if image is None else (self.text_key(prompt) if by_question else None)
        with self._lock:
            if self.bank.refresh():  # a writer committed: follow it
                self.index.sync(self.bank)
            q = self.bank.calibrate(key) if k > 0 else None
            t1 = time.perf_counter()
            out, gated = [], 0
            for _ in range(READ_TRIES if k > 0 else 0):
                self._stale = False
                out, gated = self._search(q, k, margin, lambda: text_key if text_key is not None else
                                          self.text_key(prompt), prompt)
                if not self._stale or not self.bank.refresh():
                    break
                self.index.sync(self.bank)   # a writer committed while the entries were read: read that state
                q = self.bank.calibrate(key)
            inj = self.injection()
            if out:   # the value gates of the top-1 entry's task, if it has its own
                own = value_gates_from(self.bank.catalog, self.bank.geo.num_layers).get(out[0][0]["task"])
                inj = inj if own is None else Injection(inj.tau, own)
            found = Lookup(out, inj, self.bank.key_scales() if out else None, gated)
        if k > 0:
            self.use_counts.record([bytes.fromhex(info["example"]) for info, _ in out], not out and gated > 0)
        if timings is not None and k > 0:
            timings.key_ms, timings.retrieval_ms = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
        return found

    def subjects(self) -> tuple[set[str], dict[int, set[str]]]:
        """The bank's subject gate (``subjects.unpack``), read again after a commit (caller holds the lock)."""
        cat = self.bank.catalog
        if self._subjects[0] is not cat:
            self._subjects = (cat, subjects.unpack((cat.get("extra") or {}).get(SUBJECTS_KEY)))
        return self._subjects[1]

    def _task_of(self, slot_of: dict, eid: int) -> str | None:
        return self.bank.entry(slot_of[eid]).task if eid in slot_of else None

    def _search(self, q: np.ndarray, k: int, margin: float | None, text_key,
                prompt: str = "") -> tuple[list[tuple[dict, bytes]], int]:
        """Search with the calibrated query key and read the payloads, unless a gate of the top-1
        entry's task closes: the relevance gate (the top-1 entry does not stand out enough from
        the best entry that is not its twin, ``gate_margin``), the subject gate of a text task
        (``prompt`` names none of the top-1 entry's subject words, ``subjects.names``) or the
        question gate of an image task (``questions.is_open`` on ``text_key()``, the query's
        text key); then nothing. At k > 1 the entries after the first are also left out when
        they are of a subject-gated task and the prompt names none of their subject words.
        Returns the entries and how many the gates left out (the caller holds the lock)."""
        floor = relevance_from(self.bank.catalog)
        asked = qgate.questions_from(self.bank.catalog, self.bank.geo.key_dim)
        twins = twins_from(self.bank.catalog) if floor else {}
        ids, scores = self.index.search(q, max(k, 2) + (TWIN_LOOK if twins else 0))
        slot_of = self.bank.slot_of()
        top = self._task_of(slot_of, int(ids[0])) if len(ids) else None
        if floor and len(ids) >= 2 and top is not None:
            if gate_margin(ids, scores, twins) < floor.get(top, 0.0):
                return [], min(k, len(ids))
        by_subject, said = self.subjects()
        if top in by_subject and not subjects.names(subjects.words(prompt), said.get(int(ids[0]))):
            return [], min(k, len(ids))
        if top in asked and not qgate.is_open(text_key(), top, asked, self.reference()):
            return [], min(k, len(ids))
        if self.bank.geo.sources and len(ids) > 1:
            ids, scores = self._one_per_example(ids, scores, slot_of)
        ids, scores = ids[:k], scores[:k]
        if margin is not None and len(scores):
            keep = scores >= scores[0] - margin
            ids, scores = ids[keep], scores[keep]
        if by_subject and len(ids) > 1:   # k > 1: no fact entry of a gated task about another subject either
            words = subjects.words(prompt)
            keep = np.array([i == 0 or self._task_of(slot_of, int(e)) not in by_subject
                             or subjects.names(words, said.get(int(e))) for i, e in enumerate(ids)], bool)
            ids, scores, dropped = ids[keep], scores[keep], int((~keep).sum())
        else:
            dropped = 0
        cap = tiers_from(self.bank.catalog).get("max_source")
        out, n_source, max_source = [], 0, k if cap is None else cap
        for eid, score in zip(ids.tolist(), scores.tolist()):
            got = self.bank.read_payload(slot_of[eid], eid) if eid in slot_of else None
            if got is None:
                self._stale = True
                continue  # swapped out since the index was synced (``lookup`` reads again)
            buf, info = got
            if info.kind == "source":
                if n_source >= max_source:
                    continue   # the latency budget re-encodes no more per query
                n_source += 1
            out.append(({"id": info.entry_id, "task": info.task, "score": float(score), "tokens": info.tokens,
                         "kind": info.kind, "example": info.example_hash.hex()}, buf))
        return out, dropped

    def _one_per_example(self, ids: np.ndarray, scores: np.ndarray, slot_of: dict) -> tuple[np.ndarray, np.ndarray]:
        """One entry per example among the searched ones: a source entry promoted on use keeps its
        kv copy (same example, same key: ``learn.promote``); the kv one is served, at the better
        rank of the two (the caller holds the lock)."""
        keep, where = [], {}   # [(id, score)]; example hash -> index in keep
        for eid, s in zip(ids.tolist(), scores.tolist()):
            if eid not in slot_of:
                keep.append((eid, s))
                continue
            e = self.bank.entry(slot_of[eid])
            if e.example_hash in where:
                j = where[e.example_hash]
                if e.kind == "kv" and self.bank.entry(slot_of[keep[j][0]]).kind != "kv":
                    keep[j] = (eid, keep[j][1])
                continue
            where[e.example_hash] = len(keep)
            keep.append((eid, s))
        if len(keep) == len(ids):
            return ids, scores
        return np.array([e for e, _ in keep], ids.dtype), np.array([s for _, s in keep], scores.dtype)


def _features(image):
    return image.features if image is not None else None


def key_of(rt, keys: KeyEncoder, prompt: str, image=None) -> np.ndarray:
    """The frozen retrieval key of a prompt (and its image: the key pass sees both)."""
    text = with_image(prompt, image, rt.manifest)
    return keys(rt.tokenizer.encode(text), _features(image))


def image_of(rt, ex):
    """An example's image (path in a task file or dict) encoded, or None."""
    path = ex.get("image") if isinstance(ex, dict) else getattr(ex, "image", None)
    return rt.encode_image(path) if path is not None else None
