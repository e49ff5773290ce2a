"""Position helpers for injected KV: RoPE re-rotation of stored keys.

Keys leave the decoder already rotated for their positions (rotate-half RoPE, the
convention of HF Llama and of ONNX ``RotaryEmbedding`` with ``interleaved=0``).
Rotating by angle θ·p and then by θ·δ is rotating by θ·(p + δ), so an entry
computed at positions ``p0..p0+T-1`` moves to ``p0+δ..`` by one more rotation of its
keys; values carry no position.
"""
from __future__ import annotations

import numpy as np


def inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """(D/2,) float64 rotary frequencies."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def rerotate(keys: np.ndarray, delta: int, theta: float) -> np.ndarray:
    """Keys (..., T, D) rotated by ``delta`` more positions (delta may be negative)."""
    if delta == 0:
        return keys
    D = keys.shape[-1]
    ang = delta * inv_freq(theta, D)                                   # (D/2,)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    k1, k2 = keys[..., : D // 2], keys[..., D // 2:]                   # (..., T, D/2) each
    return np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1).astype(np.float32)


def rerotate_(keys: np.ndarray, delta: int, theta: float) -> None:
    """In-place ``rerotate`` of a float32 view (..., T, D)."""
    if delta == 0:
        return
    D = keys.shape[-1]
    ang = delta * inv_freq(theta, D)                                   # (D/2,)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    k1, k2 = keys[..., : D // 2], keys[..., D // 2:]                   # views (..., T, D/2)
    k1_old = k1 * sin
    k1 *= cos
    k1 -= k2 * sin
    k2 *= cos
    k2 += k1_old


def rerotate_tokens(keys: np.ndarray, deltas, theta: float) -> np.ndarray:
    """Keys (..., T, D), token t rotated by ``deltas[t]`` more positions: moves tokens kept
    from positions ``src`` to positions ``dst`` with ``deltas = dst - src``."""
    d = np.asarray(deltas, np.float64)
    D = keys.shape[-1]
    if d.shape != (keys.shape[-2],):
        raise ValueError(f"deltas has shape {d.shape}; expected ({keys.shape[-2]},)")
    ang = d[:, None] * inv_freq(theta, D)[None, :]                     # (T, D/2)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    k1, k2 = keys[..., : D // 2], keys[..., D // 2:]                   # (..., T, D/2) each
    return np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1).astype(np.float32)
