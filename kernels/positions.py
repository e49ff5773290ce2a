"""Position helpers for injected KV: RoPE re-rotation of stored keys.

Keys leave the decoder already rotated for their positions (rotate-half RoPE, the
convention of HF Llama and of ONNX ``RotaryEmbedding`` with ``interleaved=0``).
Rotating by angle θ·p and then by θ·δ is rotating by θ·(p + δ), so an entry
computed at positions ``p0..p0+T-1`` moves to ``p0+δ..`` by one more rotation of its
keys; values carry no position.

A model whose layers use different RoPE bases (Gemma 3: local vs global layers) lists
them in its manifest's ``rope["layer_theta"]``; ``layer_thetas`` reads them, and the
re-rotation helpers take either one base or one per layer (axis 0 of ``keys``).
"""
from __future__ import annotations

import functools

import numpy as np


def inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """(D/2,) float64 rotary frequencies."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def layer_thetas(rope: dict, num_layers: int) -> tuple[float, ...]:
    """The RoPE base of each layer from a manifest's ``rope`` dict (one shared ``theta`` unless
    ``layer_theta`` lists one per layer)."""
    per = rope.get("layer_theta")
    if per is None:
        return (float(rope["theta"]),) * num_layers
    if len(per) != num_layers:
        raise ValueError(f"rope layer_theta lists {len(per)} bases for {num_layers} layers")
    return tuple(float(t) for t in per)


def _per_layer(keys: np.ndarray, theta) -> list[tuple[np.ndarray, float]] | None:
    """[(keys[i], theta[i])] when ``theta`` is a sequence (one base per layer on axis 0), else None."""
    if np.ndim(theta) == 0:
        return None
    if len(theta) != keys.shape[0]:
        raise ValueError(f"{len(theta)} RoPE bases for {keys.shape[0]} layers")
    return list(zip(keys, theta))


def rerotate(keys: np.ndarray, delta: int, theta) -> np.ndarray:
    """Keys (..., T, D) rotated by ``delta`` more positions (delta may be negative); ``theta``: one
    base, or one per layer for keys (L, ..., T, D)."""
    if delta == 0:
        return keys
    if (layers := _per_layer(keys, theta)) is not None:
        return np.stack([rerotate(k, delta, t) for k, t in layers])
    D = keys.shape[-1]
    ang = delta * inv_freq(theta, D)                                   # (D/2,)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    k1, k2 = keys[..., : D // 2], keys[..., D // 2:]                   # (..., T, D/2) each
    return np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _inv_freqs(thetas: tuple, head_dim: int) -> np.ndarray:
    """(len(thetas), D/2) float64 rotary frequencies, one row per base."""
    return np.stack([inv_freq(t, head_dim) for t in thetas])


def rerotate_(keys: np.ndarray, delta: int, theta) -> None:
    """In-place ``rerotate`` of a float32 view (..., T, D) (``theta``: one base or one per layer;
    all layers are turned at once: one angle per layer and channel pair)."""
    if delta == 0:
        return
    D = keys.shape[-1]
    if np.ndim(theta) == 0:
        ang = delta * _inv_freqs((float(theta),), D)[0]                             # (D/2,)
    else:
        if len(theta) != keys.shape[0]:
            raise ValueError(f"{len(theta)} RoPE bases for {keys.shape[0]} layers")
        ang = (delta * _inv_freqs(tuple(float(t) for t in theta), D)).reshape(
            (len(theta),) + (1,) * (keys.ndim - 2) + (D // 2,))                        # (L, 1.., D/2)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    k1, k2 = keys[..., : D // 2], keys[..., D // 2:]                   # views (..., T, D/2)
    k1_old = k1 * sin
    k1 *= cos
    k1 -= k2 * sin
    k2 *= cos
    k2 += k1_old


def rerotate_tokens(keys: np.ndarray, deltas, theta) -> np.ndarray:
    """Keys (..., T, D), token t rotated by ``deltas[t]`` more positions: moves tokens kept
    from positions ``src`` to positions ``dst`` with ``deltas = dst - src`` (``theta``: one base,
    or one per layer for keys (L, ..., T, D))."""
    if (layers := _per_layer(keys, theta)) is not None:
        return np.stack([rerotate_tokens(k, deltas, t) for k, t in layers])
    d = np.asarray(deltas, np.float64)
    D = keys.shape[-1]
    if d.shape != (keys.shape[-2],):
        raise ValueError(f"deltas has shape {d.shape}; expected ({keys.shape[-2]},)")
    ang = d[:, None] * inv_freq(theta, D)[None, :]                     # (T, D/2)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    k1, k2 = keys[..., : D // 2], keys[..., D // 2:]                   # (..., T, D/2) each
    return np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1).astype(np.float32)
