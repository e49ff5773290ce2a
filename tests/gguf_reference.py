"""A plain numpy forward pass of a Llama-family GGUF, read with the `gguf` package only.

Independent of the exporter (no transformers, no torch, no ONNX): the config comes
straight from the GGUF metadata and the weights from its tensors, so a mapping
mistake in the export path (a dropped ``rope_theta``, a wrong eps, a transposed
weight) shows up as a logit mismatch.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that its
rotary embedding can rotate adjacent pairs (2i, 2i+1) (GPT-J style) instead of
HF's halves (i, i + D/2). We keep the weights as stored and use the interleaved
RoPE; the q.k products are the same as HF's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def _meta(reader: GGUFReader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF has no metadata field {key!r}")
    return field.contents()


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


class GGUFLlama:
    """Llama decoder from a GGUF file; every weight dequantized to float32 (out, in)."""

    def __init__(self, path: str | Path):
        reader = GGUFReader(str(path))
        arch = _meta(reader, "general.architecture")
        if arch != "llama":
            raise ValueError(f"the numpy reference knows only llama GGUFs, not {arch!r}")
        self.layers = int(_meta(reader, "llama.block_count"))
        self.hidden = int(_meta(reader, "llama.embedding_length"))
        self.heads = int(_meta(reader, "llama.attention.head_count"))
        self.kv_heads = int(_meta(reader, "llama.attention.head_count_kv"))
        self.head_dim = self.hidden // self.heads
        self.eps = float(_meta(reader, "llama.attention.layer_norm_rms_epsilon"))
        self.rope_theta = float(_meta(reader, "llama.rope.freq_base"))
        self.w = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors}
        self.w.setdefault("output.weight", self.w["token_embd.weight"])  # tied embeddings
        self.vocab = self.w["token_embd.weight"].shape[0]
        i = np.arange(self.head_dim // 2)
        self.inv_freq = self.rope_theta ** (-2.0 * i / self.head_dim)       # (D/2,)

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Interleaved RoPE on x (H, T, D): pairs (2i, 2i+1) rotate by pos * inv_freq[i]."""
        ang = pos[:, None] * self.inv_freq[None]                           # (T, D/2)
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        x0, x1 = x[..., 0::2], x[..., 1::2]                                  # (H, T, D/2)
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def _attention(self, x: np.ndarray, b: str, pos: np.ndarray) -> np.ndarray:
        T, H, Hkv, D = x.shape[0], self.heads, self.kv_heads, self.head_dim
        q = (x @ self.w[b + "attn_q.weight"].T).reshape(T, H, D).transpose(1, 0, 2)      # (H, T, D)
        k = (x @ self.w[b + "attn_k.weight"].T).reshape(T, Hkv, D).transpose(1, 0, 2)    # (Hkv, T, D)
        v = (x @ self.w[b + "attn_v.weight"].T).reshape(T, Hkv, D).transpose(1, 0, 2)    # (Hkv, T, D)
        q, k = self._rope(q, pos), self._rope(k, pos)
        rep = H // Hkv                                                        # q head h reads kv head h // rep
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)          # (H, T, D)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(D)                            # (H, T, T)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = (p @ v).transpose(1, 0, 2).reshape(T, H * D)                     # (T, hidden)
        return o @ self.w[b + "attn_output.weight"].T

    def _mlp(self, x: np.ndarray, b: str) -> np.ndarray:
        g = x @ self.w[b + "ffn_gate.weight"].T                              # (T, ffn)
        u = x @ self.w[b + "ffn_up.weight"].T
        return (g / (1.0 + np.exp(-g)) * u) @ self.w[b + "ffn_down.weight"].T

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        """Final-normed hidden states (T, hidden) of ``ids`` at positions 0..T-1."""
        x = self.w["token_embd.weight"][np.asarray(ids)]                    # (T, hidden)
        pos = np.arange(len(ids), dtype=np.float64)
        for i in range(self.layers):
            b = f"blk.{i}."
            x = x + self._attention(_rms_norm(x, self.w[b + "attn_norm.weight"], self.eps), b, pos)
            x = x + self._mlp(_rms_norm(x, self.w[b + "ffn_norm.weight"], self.eps), b)
        return _rms_norm(x, self.w["output_norm.weight"], self.eps)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits (T, V) for every position."""
        return self.hidden_states(ids) @ self.w["output.weight"].T
