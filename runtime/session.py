"""The decoder over a bundle: one onnxruntime session and a growing KV cache.

Past KV layout per layer (the bundle contract, ``core/contract.py``)::

    key, value: (1, H_kv, T, D) float32

Batches (``batch_feed``; the learn job scores and encodes several examples per pass):
row r's past fills the first ``past_lens[r]`` of ``P`` past slots, its ``S_r`` new tokens
the first ``S_r`` of ``S`` new slots; the attention mask hides the padding, so each row
attends to exactly what it would alone (positions are explicit)::

    past key, value: (B, H_kv, P, D)      mask: (B, P + S)      ids: (B, S) or embeds (B, S, hidden)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inducekv.devices.profile import DeviceProfile
from inducekv.core import contract
from inducekv.core.manifest import Manifest
from inducekv.core.errors import BundleError

log = logging.getLogger(__name__)

_OPT = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class KVCache:
    """Per-layer keys and values; each (1, H_kv, T, D) float32."""
    keys: list[np.ndarray]
    values: list[np.ndarray]

    @classmethod
    def empty(cls, m: Manifest) -> "KVCache":
        z = np.zeros((1, m.num_kv_heads, 0, m.head_dim), np.float32)
        return cls([z] * m.num_layers, [z] * m.num_layers)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


def _session(path: Path, profile: DeviceProfile, spinning: bool = True) -> ort.InferenceSession:
    """An onnxruntime session with the profile's threads. ``spinning=False`` for a graph that
    runs once right before the decoder (key pass, vision): onnxruntime's pool threads keep
    spinning for a while after a run, and on a small CPU they then steal the cores the
    decoder's prefill needs (2 cores, fp32, k=1: prefill 87 -> 46 ms, TTFT 126 -> 67 ms,
    README "Memory: accuracy, time to first token")."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = profile.intra_op_threads
    so.inter_op_num_threads = profile.inter_op_threads
    so.graph_optimization_level = _OPT[profile.graph_optimization]
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), so, providers=profile.providers())
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        raise BundleError(f"cannot load {path}: {str(e).splitlines()[0][:200]}; re-export the bundle") from None


def _embedder(bundle_dir: Path, manifest: Manifest):
    """The token-embedding lookup of a multimodal bundle (None for text bundles)."""
    if not manifest.image:
        return None
    from inducekv.runtime.vision import Embedder

    return Embedder(bundle_dir, manifest)


def _first_input(embed, ids, features) -> dict:
    """The first input of one sequence: ids (1, T) or embeds (1, T, hidden) (``batch_first``)."""
    return batch_first(embed, [ids], [features])


def batch_first(embed, ids: list, features: list | None = None) -> dict:
    """The first input of a right-padded batch: ids (B, S), or embeds (B, S, hidden) for a
    multimodal bundle (``features``: B arrays or None, each row's image tokens' rows)."""
    B, S = len(ids), max(len(x) for x in ids)
    feats = features or [None] * B
    if embed is None:
        if any(f is not None for f in feats):
            raise BundleError("image features given to a text-only bundle")
        first = np.zeros((B, S), np.int64)
        for r, x in enumerate(ids):
            first[r, :len(x)] = x
        return {contract.INPUT_IDS: first}                                      # (B, S)
    x0 = np.zeros((B, S, embed.table.shape[1]), np.float32)
    for r, (x, f) in enumerate(zip(ids, feats)):
        x0[r, :len(x)] = embed(x, f)[0]
    return {contract.INPUTS_EMBEDS: x0}                                         # (B, S, hidden)


def batch_feed(m: Manifest, embed, ids: list, past_k: list, past_v: list, past_lens: list[int],
               positions: list, features: list | None = None, bias: np.ndarray | None = None,
               with_bias: bool = True) -> dict:
    """The feed of a padded batch (module docstring): ``ids`` B token lists, ``past_k``/``past_v``
    per layer (B, H_kv, P, D), ``positions`` B arrays (S_r,), ``features`` B arrays or None
    (image rows), ``bias`` (B, L, P + S) or None (zeros)."""
    B, S, P = len(ids), max(len(x) for x in ids), past_k[0].shape[2]
    mask = np.zeros((B, P + S), np.int64)
    pos = np.zeros((B, S), np.int64)
    for r, x in enumerate(ids):
        mask[r, :past_lens[r]] = 1
        mask[r, P:P + len(x)] = 1
        p = np.asarray(positions[r], np.int64)
        pos[r, :len(x)] = p
        pos[r, len(x):] = (p[-1] if len(p) else 0) + 1 + np.arange(S - len(x))   # padding: any position
    feed = {**batch_first(embed, ids, features), contract.ATTENTION_MASK: mask, contract.POSITION_IDS: pos}
    for i in range(m.num_layers):
        feed[contract.past_key(i)] = past_k[i]
        feed[contract.past_value(i)] = past_v[i]
    if with_bias:
        feed[contract.ATTENTION_BIAS] = (np.zeros((B, m.num_layers, P + S), np.float32) if bias is None
                                         else np.ascontiguousarray(bias, np.float32))
    elif bias is not None and np.any(bias):
        raise BundleError("this bundle's decoder takes no attention bias (weighted memory injection); "
                          "re-export it with this inducekv version")
    return feed


def has_logits_from(sess: ort.InferenceSession) -> bool:
    """Whether a decoder or probe session takes ``contract.LOGITS_FROM`` (an input with a default)."""
    return any(i.name == contract.LOGITS_FROM for i in sess.get_overridable_initializers())


def shared_past(cache: "KVCache", B: int) -> tuple[list, list]:
    """One cache (1, H_kv, P, D) per layer as the past of all B rows of a batch."""
    return ([np.repeat(k, B, axis=0) for k in cache.keys], [np.repeat(v, B, axis=0) for v in cache.values])


def require_memory_support(manifest: Manifest) -> None:
    """Memory (learning into a bank, serving from one) needs the native graph's retrieval-key graph;
    an ``--graph optimum`` bundle (or one exported before key graphs) is refused in one line."""
    if manifest.retrieval_key:
        return
    if (manifest.extra or {}).get("graph") == "optimum":
        raise BundleError("memory needs the native graph, but this bundle was exported with --graph optimum "
                          "(no retrieval-key graph, no attention_bias input); re-export it without --graph optimum")
    raise BundleError("this bundle has no retrieval-key graph; re-export it with this inducekv version")


class KeyEncoder:
    """The retrieval-key pass: the first layers of the model over a prompt, mean-pooled."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, profile: DeviceProfile):
        require_memory_support(manifest)
        spec = manifest.retrieval_key or {}
        self.dim = int(spec.get("dim", 0))
        self.sess = _session(bundle_dir / spec.get("graph", contract.KEY_FILE), profile, spinning=False)
        self.embed = _embedder(bundle_dir, manifest)
        outs = [o.name for o in self.sess.get_outputs()]
        if outs != [contract.KEY_OUTPUT] or self.sess.get_outputs()[0].shape[-1] != self.dim:
            raise BundleError(f"key graph outputs {outs} do not match the manifest (key of {self.dim}); re-export the bundle")

    def __call__(self, ids: list[int], features: np.ndarray | None = None) -> np.ndarray:
        """Key (dim,) float32 of one token sequence (``features``: its image tokens' rows)."""
        T = len(ids)
        feed = {
            **_first_input(self.embed, ids, features),
            contract.ATTENTION_MASK: np.ones((1, T), np.int64),
            contract.POSITION_IDS: np.arange(T, dtype=np.int64)[None],
        }
        return self.sess.run([contract.KEY_OUTPUT], feed)[0][0]                   # (dim,)

    def batch(self, ids: list[list[int]], features: list | None = None) -> np.ndarray:
        """Keys (B, dim) of B token sequences in one pass (right-padded; the key graph's masked
        mean and causal attention leave each row's key as it would be alone)."""
        B, S = len(ids), max(len(x) for x in ids)
        mask = np.zeros((B, S), np.int64)
        for r, x in enumerate(ids):
            mask[r, :len(x)] = 1
        feed = {**batch_first(self.embed, ids, features), contract.ATTENTION_MASK: mask,
                contract.POSITION_IDS: np.tile(np.arange(S, dtype=np.int64), (B, 1))}
        return self.sess.run([contract.KEY_OUTPUT], feed)[0]                      # (B, dim)


class Decoder:
    """The decoder graph: prefill and decode steps over a ``KVCache``.

    ``probe``: load the bundle's probe graph instead (the decoder plus every layer's queries,
    ``contract.probe_outputs``): the same steps, and the learn job's probe passes run on this
    same session (``learn.compact.Probe``), so serving and learning share one copy of the
    weights in RAM instead of two (measured: decode ~2% slower, README "Learn speed")."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, profile: DeviceProfile, probe: bool = False):
        self.m = manifest
        graph = (manifest.probe or {}).get("graph") if probe else None
        self.probe = bool(graph) and (bundle_dir / graph).is_file()    # a bundle without one: the decoder
        self.sess = _session(bundle_dir / (graph if self.probe else contract.DECODER_FILE), profile)
        self.embed = _embedder(bundle_dir, manifest)
        self._check_io()
        L = manifest.num_layers
        self.rows_input = has_logits_from(self.sess)
        meta = self.sess.get_modelmeta().custom_metadata_map
        # present may alias past (GroupQueryAttention graphs): decode appends in place (steps.py)
        self.kv_shared = meta.get(contract.KV_BUFFER_KEY) == "shared" and self.has_bias and self.rows_input
        self.rotary_in_attention = meta.get(contract.ROTARY_KEY) == "attention"
        self.key_names = [contract.present_key(i) for i in range(L)]
        self.value_names = [contract.present_value(i) for i in range(L)]
        self.out_names = [contract.LOGITS] + [n for i in range(L) for n in (self.key_names[i], self.value_names[i])]

    def _bias(self, bias: np.ndarray | None, total: int) -> np.ndarray:
        """The (1, L, total) float32 bias input: zeros, or ``bias`` broadcast over layers."""
        L = self.m.num_layers
        if bias is None:
            return np.zeros((1, L, total), np.float32)
        b = np.asarray(bias, np.float32)
        if b.shape not in ((total,), (L, total)):
            raise ValueError(f"attention bias has shape {b.shape}; expected ({total},) or ({L}, {total})")
        return np.ascontiguousarray(np.broadcast_to(b, (L, total))[None])

    def _check_io(self):
        L = self.m.num_layers
        ins = [i.name for i in self.sess.get_inputs()]
        outs = [o.name for o in self.sess.get_outputs()]
        self.has_bias = ins == contract.decoder_inputs(L, self.embed is not None, bias=True)
        want = contract.probe_outputs(L) if self.probe else contract.decoder_outputs(L)
        if not (self.has_bias or ins == contract.decoder_inputs(L, self.embed is not None)) or outs != want:
            raise BundleError(
                f"decoder graph I/O does not match the manifest ({len(ins)} inputs for {L} layers); "
                "the bundle is mismatched, re-export it")
        shape = self.sess.get_inputs()[3].shape  # past_key_values.0.key
        if shape[1] != self.m.num_kv_heads or shape[3] != self.m.head_dim:
            raise BundleError(
                f"decoder past KV shape {shape} does not match manifest heads={self.m.num_kv_heads} "
                f"head_dim={self.m.head_dim}; re-export the bundle")

    def forward(self, ids: list[int], cache: KVCache, positions: np.ndarray | None = None,
                mask: np.ndarray | None = None, features: np.ndarray | None = None,
                bias: np.ndarray | None = None, logits_from: int = 0) -> tuple[np.ndarray, KVCache]:
        """Run ``ids`` after ``cache``; return (logits (T - logits_from, V), the grown cache).

        ``logits_from``: the first row whose logits are wanted (``len(ids) - 1``: the last
        only, which skips the LM head of the others on bundles whose graph takes it).

        ``positions`` (T,) defaults to cache.length + arange(T); ``mask`` (past+T,)
        defaults to all ones; ``features`` (n, hidden) replace the image tokens in ``ids``
        (multimodal bundles); ``bias`` (L, past+T) or (past+T,) is added to the attention
        scores of those key positions (per layer), zeros by default. A bundle exported
        before the bias input existed takes no bias: a non-zero one is refused.
        """
        T, P = len(ids), cache.length
        if positions is None:
            positions = np.arange(P, P + T, dtype=np.int64)
        if mask is None:
            mask = np.ones(P + T, dtype=np.int64)
        feed = {
            **_first_input(self.embed, ids, features),                       # (1, T) ids or (1, T, hidden)
            contract.ATTENTION_MASK: np.asarray(mask, dtype=np.int64)[None],  # (1, P+T)
            contract.POSITION_IDS: np.asarray(positions, dtype=np.int64)[None],  # (1, T)
        }
        for i in range(self.m.num_layers):
            feed[contract.past_key(i)] = cache.keys[i]
            feed[contract.past_value(i)] = cache.values[i]
        if self.has_bias:
            feed[contract.ATTENTION_BIAS] = self._bias(bias, P + T)                 # (1, L, P+T)
        elif bias is not None and np.any(bias):
            raise BundleError("this bundle's decoder takes no attention bias (weighted memory injection); "
                              "re-export it with this inducekv version")
        self._rows(feed, logits_from, T)
        out = self._run(self.out_names, feed)
        logits = out[0][0] if self.rows_input else out[0][0][logits_from:]   # (T - logits_from, V)
        return logits, KVCache(out[1::2], out[2::2])

    def _rows(self, feed: dict, logits_from: int, S: int) -> None:
        if not 0 <= logits_from < max(S, 1):
            raise ValueError(f"logits_from {logits_from} is outside the {S} new rows")
        if self.rows_input and logits_from:
            feed[contract.LOGITS_FROM] = np.array([logits_from], np.int64)

    def forward_batch(self, ids: list, past_k: list, past_v: list, past_lens: list[int], positions: list,
                      features: list | None = None, bias: np.ndarray | None = None,
                      logits: bool = True, logits_from: int = 0) -> tuple[np.ndarray | None, KVCache | None]:
        """B rows in one pass, padded (``batch_feed``). Returns logits (B, S - logits_from, V)
        when ``logits``, else the grown past (B, H_kv, P + S, D) per layer (row r's new tokens
        at P..P+S_r; the LM head then runs on the last padded row only)."""
        feed = batch_feed(self.m, self.embed, ids, past_k, past_v, past_lens, positions, features, bias,
                          with_bias=self.has_bias)
        S = max(len(x) for x in ids)
        self._rows(feed, logits_from if logits else S - 1, S)
        if logits:
            out = self._run_batch([contract.LOGITS], feed, B=len(ids), P=past_k[0].shape[2], S=S)[0]
            return (out if self.rows_input else out[:, logits_from:]), None
        out = self._run_batch(self.out_names[1:], feed, B=len(ids), P=past_k[0].shape[2], S=S)
        return None, KVCache(out[0::2], out[1::2])

    def _run_batch(self, names: list[str], feed: dict, B: int, P: int, S: int) -> list[np.ndarray]:
        """``sess.run``; on a GroupQueryAttention graph (``kv_shared``) a batch of B > 1 prompts
        (S > 1) runs one row at a time, outputs stacked as one pass's: after a past onnxruntime
        refuses it, and without one its rotary takes row 0's positions for every row."""
        if not (self.kv_shared and B > 1 and S > 1):
            return self._run(names, feed)
        rows = [self._run(names, {k: (v if k == contract.LOGITS_FROM else v[r:r + 1]) for k, v in feed.items()})
                for r in range(B)]
        return [np.concatenate(parts, axis=0) for parts in zip(*rows)]

    def _run(self, names: list[str], feed: dict) -> list[np.ndarray]:
        """``sess.run``. On a graph whose attention op applies RoPE (``rotary_in_attention``), a
        prompt with an empty past whose positions do not count up by one runs after one hidden
        zero slot (mask 0), since the op would rotate it by ``positions[0] + arange(S)`` there;
        the slot is cut from the presents again."""
        pos = feed[contract.POSITION_IDS]                                        # (B, S)
        if not (self.rotary_in_attention and feed[contract.past_key(0)].shape[2] == 0
                and pos.shape[1] > 1 and np.any(np.diff(pos, axis=1) != 1)):
            return self.sess.run(names, feed)
        feed = dict(feed)
        for name, v in feed.items():
            if name.startswith("past_key_values."):                            # (B, H_kv, 0, D) -> one slot
                feed[name] = np.zeros(v.shape[:2] + (1,) + v.shape[3:], v.dtype)
        mask = feed[contract.ATTENTION_MASK]
        feed[contract.ATTENTION_MASK] = np.concatenate([np.zeros_like(mask[:, :1]), mask], axis=1)
        if contract.ATTENTION_BIAS in feed:
            b = feed[contract.ATTENTION_BIAS]                                    # (B, L, S)
            feed[contract.ATTENTION_BIAS] = np.concatenate([np.zeros_like(b[:, :, :1]), b], axis=2)
        out = self.sess.run(names, feed)
        return [np.ascontiguousarray(o[:, :, 1:]) if n.startswith("present.") else o for n, o in zip(names, out)]
