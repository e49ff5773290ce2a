"""Entry compaction at learn time: the method record, its checks, and ``genv``.

Methods (one per bank, catalog extra ``compact``):

- ``perlayer`` (the default where the bundle has a probe graph and an attention-bias
  input): each layer keeps its own share ``--keep`` of the tokens, in place, masked
  through the bias (``learn/perlayer.py``); stored as a sparse scheme (``k4v4s``).
- ``genv`` (``--compact genv --slots N``), below.
- ``none``: full entries.

A full entry stores the K/V of every token of its rendered text (~19 tokens for a one-line
fact). ``genv`` keeps ``N`` of them:

1. the **answer span**: the tokens of the answer inside the entry, found by tokenizing the
   template render (character offsets of ``{answer}``; no rule about any word), always kept;
2. the rest of the ``N`` slots go to the tokens of highest **genv importance**: the model
   answers the entry's own prompt with the full entry injected (greedy, at most ``MAX_NEW``
   tokens, first line), then the probe graph (``probe.onnx``: the decoder plus each
   layer's post-RoPE queries) runs over the prompt and that answer; a token's importance is
   the attention probability the rows predicting the answer tokens pay to it, times its
   value norm, summed over layers, heads and rows.

Kept tokens are placed at consecutive positions after the shared prefix, in their order in
the entry (keys re-rotated, ``kernels.positions.rerotate_tokens``; values carry no
position), so a compact entry is an ordinary entry of N tokens: the runtime serves it
unchanged. One bank holds one method and slot budget (catalog extra ``compact``). Measured
on the default model (README, "Compact entries"): 1.7x fewer k4v4 bytes per entry, but most
of the accuracy lost on the test files' phrasings, so ``none`` stays the default.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inducekv.core import contract
from inducekv.core.errors import BankError, InduceKVError
from inducekv.kernels.positions import layer_thetas, rerotate_tokens
from inducekv.kernels import kvquant
from inducekv.learn.defaults import COMPACT_KEEP as DEFAULT_KEEP, COMPACT_METHODS as METHODS, COMPACT_SLOTS as DEFAULT_SLOTS
from inducekv.runtime.memory import Layout
from inducekv.runtime.session import KVCache, _first_input, _session, batch_feed, has_logits_from, shared_past

COMPACT_KEY = "compact"   # catalog extra: {"method": str, "slots": int | None}
MAX_NEW = 12              # greedy answer tokens whose attention scores the entry


@dataclass(frozen=True)
class Compaction:
    method: str = "none"
    slots: int | None = None     # genv: tokens kept per entry
    keep: float | None = None    # perlayer: share of the tokens each layer keeps

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def as_dict(self) -> dict:
        return {"method": self.method, "slots": self.slots, **({"keep": self.keep} if self.keep is not None else {})}

    def describe(self) -> str:
        if self.method == "perlayer":
            return f"--compact perlayer --keep {self.keep:g}"
        return "--compact none" if not self.enabled else f"--compact {self.method} --slots {self.slots}"

    @classmethod
    def from_catalog(cls, catalog: dict, scheme: str | None = None) -> "Compaction":
        """The bank's record; a sparse-scheme bank without one (no learn yet) is ``perlayer``."""
        raw = (catalog.get("extra") or {}).get(COMPACT_KEY)
        if raw is None:
            return cls("perlayer", None, DEFAULT_KEEP) if scheme in kvquant.SPARSE else cls()
        method, slots, keep = ((raw.get("method"), raw.get("slots"), raw.get("keep")) if isinstance(raw, dict)
                               else (None, None, None))
        ok = method in METHODS and (
            method == "none" or (method == "genv" and isinstance(slots, int) and slots >= 1)
            or (method == "perlayer" and isinstance(keep, (int, float)) and 0 < keep <= 1))
        if not ok:
            raise BankError(f"the bank's compaction record {raw!r} is malformed")
        return cls(method, slots if method == "genv" else None, float(keep) if method == "perlayer" else None)


def _check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise InduceKVError(f"--keep must be a share of the tokens in (0, 1], got {keep!r}")
    return float(keep)


def resolve(bank, method: str | None, slots: int | None, keep: float | None = None) -> Compaction:
    """The compaction of a learn into ``bank``: ``method``/``slots``/``keep`` as asked (None:
    the bank's), refused when the bank holds entries made another way or its scheme cannot
    store it (``perlayer`` needs a sparse scheme, the others a dense one)."""
    sparse = bank.geo.scheme in kvquant.SPARSE
    stored = Compaction.from_catalog(bank.catalog, bank.geo.scheme)
    method = method if method is not None else stored.method
    if method not in METHODS:
        raise InduceKVError(f"unknown compaction {method!r}; choose one of {', '.join(METHODS)}")
    if slots is not None and method != "genv":
        raise InduceKVError("--slots applies to --compact genv (perlayer takes --keep)")
    if keep is not None and method != "perlayer":
        raise InduceKVError("--keep applies to --compact perlayer")
    if method == "none":
        want = Compaction()
    elif method == "perlayer":
        want = Compaction("perlayer", None, _check_keep(keep if keep is not None else
                                                        (stored.keep if stored.method == "perlayer" else DEFAULT_KEEP)))
    else:
        if slots is None:
            slots = stored.slots if stored.method == method and stored.slots else DEFAULT_SLOTS
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise InduceKVError(f"--slots must be a positive number of tokens, got {slots!r}")
        want = Compaction(method, slots)
    if want != stored and len(bank.slots()):
        raise BankError(f"{bank.path} holds entries made with {stored.describe()}; this learn asks for "
                        f"{want.describe()}: one bank holds one compaction, use a new bank")
    if (want.method == "perlayer") != sparse:
        have = f"{bank.geo.scheme} entries" + (" (per-layer slot maps)" if sparse else "")
        raise BankError(f"{bank.path} stores {have}; {want.describe()} needs a bank created for it: use a new bank")
    return want


def answer_span(rt, layout: Layout, prompt: str, answer: str, image=None) -> tuple[int, int]:
    """[a0, a1): the entry tokens that overlap the answer's characters in the template render
    (empty when the template has no ``{answer}``)."""
    head = (image.text if image is not None else "")
    entry = layout.template.entry
    if "{answer}" not in entry:
        return 0, 0
    before = entry[: entry.index("{answer}")].replace("{prompt}", prompt)
    text = head + before + entry[entry.index("{answer}"):].replace("{prompt}", prompt).replace("{answer}", answer)
    c0, c1 = len(head) + len(before), len(head) + len(before) + len(answer)
    enc = rt.tokenizer.tok.encode(text, add_special_tokens=False)
    if list(enc.ids) != list(layout.entry_ids(prompt, answer, image)):
        raise InduceKVError("the entry's tokens cannot be located in its template render; use --compact none")
    hit = [t for t, (s, e) in enumerate(enc.offsets) if s < c1 and e > c0]
    return (hit[0], hit[-1] + 1) if hit else (0, 0)


def select(importance: np.ndarray, span: tuple[int, int], slots: int) -> np.ndarray:
    """Sorted token indices kept: the answer span, then the most important others up to
    ``slots`` in all (the span alone when it is longer)."""
    keep = set(range(*span))
    for t in np.argsort(-np.asarray(importance, np.float64), kind="stable"):
        if len(keep) >= slots:
            break
        keep.add(int(t))
    return np.array(sorted(keep), np.int64)


def compact_kv(k: np.ndarray, v: np.ndarray, keep: np.ndarray, theta) -> tuple[np.ndarray, np.ndarray]:
    """The kept tokens of an entry (L, H_kv, T, D) at consecutive positions: token ``keep[j]``
    moves to slot j (its key re-rotated by ``j - keep[j]``)."""
    keep = np.asarray(keep, np.int64)
    return (rerotate_tokens(k[:, :, keep], np.arange(len(keep)) - keep, theta),
            np.ascontiguousarray(v[:, :, keep]))


def genv_mass(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, rows: np.ndarray, first: int,
              n_entry: int, offset: int, scale: float | None = None) -> np.ndarray:
    """(n_entry,) importance of keys ``first..first+n_entry-1``: attention probability paid by
    query ``rows`` (indices into the pass; row r sits at key position ``offset + r``), times
    the key's value norm, summed over layers, heads and rows.
    queries (L, S, H*D); keys, values (L, H_kv, N, D); ``scale``: the model's q.k scale
    (``Manifest.score_scale``), 1/sqrt(D) when None."""
    L, Hkv, N, D = keys.shape
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    H = queries.shape[2] // D
    rows = np.asarray(rows, np.int64)
    causal = np.arange(N)[None, :] <= (offset + rows)[:, None]                      # (R, N)
    tot = np.zeros(n_entry, np.float64)
    for l in range(L):
        q = queries[l][rows].reshape(len(rows), H, D).transpose(1, 0, 2).astype(np.float64)   # (H, R, D)
        kl = np.repeat(keys[l], H // Hkv, axis=0).astype(np.float64)                # (H, N, D)
        s = (q @ kl.transpose(0, 2, 1)) * scale                                      # (H, R, N)
        s = np.where(causal[None], s, -np.inf)
        s -= s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        vn = np.linalg.norm(np.repeat(values[l], H // Hkv, axis=0)[:, first:first + n_entry], axis=-1)  # (H, T)
        tot += (p[:, :, first:first + n_entry] * vn[:, None, :]).sum(axis=(0, 1))
    return tot


def require_probe(rt, method: str = "genv") -> str:
    """The bundle's probe graph file name; a one-line error for a bundle without one."""
    name = (rt.manifest.probe or {}).get("graph")
    if not name or not (rt.bundle_dir / name).is_file():
        raise InduceKVError(f"this bundle has no probe graph ({contract.PROBE_FILE}), which --compact {method} "
                            "needs; re-export it with this inducekv version (ikv-export ... --force)")
    return name


def check_request(rt, method: str | None, slots: int | None, bank_exists: bool, keep: float | None = None) -> None:
    """The checks of ``resolve`` that need no bank, run before a bank is created."""
    if slots is not None and method != "genv" and (method is not None or not bank_exists):
        raise InduceKVError("--slots applies to --compact genv (perlayer takes --keep)")
    if keep is not None and method not in ("perlayer", None):
        raise InduceKVError("--keep applies to --compact perlayer")
    if keep is not None:
        _check_keep(keep)
    if method is not None and method != "none":
        require_probe(rt, method)
        if method == "perlayer" and not rt.decoder.has_bias:
            raise InduceKVError("--compact perlayer masks tokens through the decoder's attention-bias input, which "
                                "this bundle lacks; re-export it with this inducekv version (ikv-export ... --force)")


def supports_perlayer(rt) -> bool:
    """Whether the bundle can make and serve perlayer entries (probe graph + bias input)."""
    name = (rt.manifest.probe or {}).get("graph")
    return bool(name) and (rt.bundle_dir / name).is_file() and rt.decoder.has_bias


def new_bank_scheme(rt, scheme: str, method: str | None) -> str:
    """The scheme a new bank gets: the sparse variant of ``scheme`` when the learn compacts
    per layer (asked, or by default where the bundle supports it and the scheme has one)."""
    if method == "perlayer" or (method is None and supports_perlayer(rt)):
        if scheme in kvquant.SPARSE.values():
            return kvquant.sparse_of(scheme)
        if method == "perlayer":
            raise InduceKVError(f"--compact perlayer stores fp16/k8v8/k4v8/k4v4 codes; scheme {scheme} has no "
                                "per-layer variant")
    return scheme


def compactor_for(rt, layout: Layout, compaction: Compaction):
    """The object that encodes (``perlayer``) or cuts (``genv``) each new entry; None for ``none``."""
    if compaction.method == "perlayer":
        from inducekv.learn.perlayer import PerLayer

        return PerLayer(rt, layout, compaction.keep)
    return Compactor(rt, layout, compaction) if compaction.enabled else None


class Probe:
    """The bundle's probe graph: a decoder pass that also returns every layer's queries."""

    def __init__(self, rt, method: str = "genv"):
        m = rt.manifest
        name = require_probe(rt, method)
        # a runtime opened with learn=True already serves from the probe graph: one session, one copy
        self.rt = rt
        self.sess = rt.decoder.sess if getattr(rt.decoder, "probe", False) else _session(rt.bundle_dir / name, rt.profile)
        L = m.num_layers
        ins = [i.name for i in self.sess.get_inputs()]
        outs = [o.name for o in self.sess.get_outputs()]
        if ins != contract.decoder_inputs(L, rt.decoder.embed is not None, bias=True) \
                or outs != contract.probe_outputs(L):
            raise InduceKVError(f"{name} does not match the bundle contract; re-export the bundle")
        self.names = outs[1:]
        self.rows_input = has_logits_from(self.sess)   # no logits are read: the LM head runs on one row

    def run(self, ids: list[int], cache: KVCache, positions, features=None):
        """Queries (L, S, H*D) and the grown keys, values (L, H_kv, past+S, D)."""
        m, P, S = self.rt.manifest, cache.length, len(ids)
        L = m.num_layers
        feed = {**_first_input(self.rt.decoder.embed, ids, features),
                contract.ATTENTION_MASK: np.ones((1, P + S), np.int64),
                contract.POSITION_IDS: np.asarray(positions, np.int64)[None],
                contract.ATTENTION_BIAS: np.zeros((1, L, P + S), np.float32),
                **({contract.LOGITS_FROM: np.array([S - 1], np.int64)} if self.rows_input and S > 1 else {})}
        for i in range(L):
            feed[contract.past_key(i)] = cache.keys[i]
            feed[contract.past_value(i)] = cache.values[i]
        out = self.sess.run(self.names, feed)
        keys = np.stack([x[0] for x in out[0:2 * L:2]])
        values = np.stack([x[0] for x in out[1:2 * L:2]])
        queries = np.stack([x[0] for x in out[2 * L:]])
        return queries, keys, values

    def run_batch(self, ids: list[list[int]], cache: KVCache, positions: list, features: list | None = None):
        """``run`` for B entries after the same ``cache``, in one padded pass: a list of
        (queries (L, S_r, H*D), keys, values (L, H_kv, past+S_r, D)) per row."""
        m, P, B = self.rt.manifest, cache.length, len(ids)
        L = m.num_layers
        past_k, past_v = shared_past(cache, B)
        feed = batch_feed(m, self.rt.decoder.embed, ids, past_k, past_v, [P] * B, positions, features)
        S = max(len(x) for x in ids)
        if self.rows_input and S > 1:
            feed[contract.LOGITS_FROM] = np.array([S - 1], np.int64)
        out = self.sess.run(self.names, feed)
        keys, values, queries = np.stack(out[0:2 * L:2]), np.stack(out[1:2 * L:2]), np.stack(out[2 * L:])
        return [(queries[:, r, :len(x)], keys[:, r, :, :P + len(x)], values[:, r, :, :P + len(x)])
                for r, x in enumerate(ids)]                   # (L, B, S, H*D), (L, B, H_kv, P+S, D) sliced


class Compactor:
    """``genv`` compaction of entries for one runtime and layout (holds the probe session)."""

    def __init__(self, rt, layout: Layout, compaction: Compaction):
        if compaction.method != "genv":
            raise InduceKVError(f"no compactor for {compaction.method!r}")
        self.rt, self.layout, self.slots = rt, layout, compaction.slots
        self.probe = Probe(rt, compaction.method)
        self.theta = layer_thetas(rt.manifest.rope, rt.manifest.num_layers)

    def answer(self, prompt: str, k: np.ndarray, v: np.ndarray, image=None) -> list[int]:
        """The model's own greedy answer (token ids, first line) to ``prompt`` with the entry injected."""
        rt, feats = self.rt, (image.features if image is not None else None)
        cache, pos = self.layout.assemble([(k, v)])
        q = self.layout.query_ids(prompt, image)
        logits, cache = rt.decoder.forward(q, cache, positions=np.arange(pos, pos + len(q)), features=feats,
                                           logits_from=len(q) - 1)
        out: list[int] = []
        for _ in range(MAX_NEW):
            nxt = int(np.argmax(logits[-1]))
            if nxt in rt.eos_ids:
                break
            out.append(nxt)
            if "\n" in rt.tokenizer.decode(out).lstrip() or len(out) == MAX_NEW:
                break
            at = pos + len(q) + len(out) - 1
            logits, cache = rt.decoder.forward([nxt], cache, positions=np.array([at]))
        return out

    def importance(self, prompt: str, k: np.ndarray, v: np.ndarray, image=None) -> np.ndarray:
        """(T,) genv importance of the entry's tokens."""
        out = self.answer(prompt, k, v, image)
        cache, pos = self.layout.assemble([(k, v)])
        q = self.layout.query_ids(prompt, image)
        ids = q + out
        queries, keys, values = self.probe.run(ids, cache, np.arange(pos, pos + len(ids)),
                                               image.features if image is not None else None)
        rows = np.arange(len(q) - 1, len(ids) - 1) if out else np.array([len(q) - 1])  # rows predicting the answer
        return genv_mass(queries, keys, values, rows, self.layout.p0, k.shape[2], offset=pos,
                         scale=self.rt.manifest.score_scale)

    def __call__(self, prompt: str, answer: str, k: np.ndarray, v: np.ndarray, image=None):
        """(kept K, kept V, kept token indices) of the entry ``k``/``v`` (L, H_kv, T, D)."""
        if k.shape[2] <= self.slots:
            return k, v, np.arange(k.shape[2])
        span = answer_span(self.rt, self.layout, prompt, answer, image)
        keep = select(self.importance(prompt, k, v, image), span, self.slots)
        ck, cv = compact_kv(k, v, keep, self.theta)
        return ck, cv, keep
