"""KV payload quantization for memory entries.

Layout of keys/values everywhere: ``(L, H_kv, T, D)`` float32, i.e. layer, kv head,
token, channel. ``unpack`` returns exactly that, ready to slice per layer into the
decoder's ``past_key_values.{i}.*`` inputs of shape ``(1, H_kv, T, D)``.

Schemes (all byte math lives in ``layout``; ``payload_nbytes`` sums it):

=========  ==========================================================  ===============
scheme     keys                                                        values
=========  ==========================================================  ===============
``fp16``   fp16                                                        fp16
``int8``   int8, one fp16 scale per channel (over T)   [KIVI]          int8, one fp16
                                                                       scale per token
                                                                       (over D)
``int4``   int4, one fp16 scale per channel (over T)                   int4, one fp16
                                                                       scale per group
                                                                       of ``G`` channels
=========  ==========================================================  ===============

Keys have outlier *channels* (RoPE dimensions with large norms), values have no
channel structure: hence per-channel scales for keys and per-token/group scales for
values (KIVI, arXiv 2402.02750). All integer codes are symmetric (zero maps to zero):
int8 codes in [-127, 127], int4 codes in [-7, 7] stored offset by 8 in nibbles, two
per byte, low nibble first. Scales are rounded to fp16 *before* quantizing, so the
stored scale is exactly the one the codes were computed with.

Payload byte order: the sections of ``layout(...)`` in order, each C-contiguous.
"""
from __future__ import annotations

import numpy as np

SCHEMES = ("fp16", "int8", "int4")
_BITS = {16: "fp16", 8: "int8", 4: "int4"}


def scheme_for_bits(bits: int) -> str:
    """The scheme of a device profile's ``kv_bits`` (16, 8 or 4)."""
    if bits not in _BITS:
        raise ValueError(f"kv_bits must be one of {sorted(_BITS)}, got {bits!r}")
    return _BITS[bits]
INT4_GROUP = 32  # channels per value scale for int4 (whole head when D is not a multiple)

_F16_MAX = float(np.finfo(np.float16).max)


def _int4_group(head_dim: int) -> int:
    return INT4_GROUP if head_dim % INT4_GROUP == 0 else head_dim


def layout(scheme: str, num_layers: int, kv_heads: int, tokens: int, head_dim: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """The payload's sections as ``(name, numpy dtype, shape)``, in byte order."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown KV quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    for name, v in (("num_layers", num_layers), ("kv_heads", kv_heads), ("tokens", tokens), ("head_dim", head_dim)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    L, H, T, D = int(num_layers), int(kv_heads), int(tokens), int(head_dim)
    if scheme == "fp16":
        return [("k", "float16", (L, H, T, D)), ("v", "float16", (L, H, T, D))]
    if scheme == "int8":
        return [
            ("k", "int8", (L, H, T, D)),
            ("v", "int8", (L, H, T, D)),
            ("k_scale", "float16", (L, H, D)),  # per channel
            ("v_scale", "float16", (L, H, T)),  # per token
        ]
    if D % 2:
        raise ValueError(f"int4 packs two channels per byte; head_dim {D} is odd")
    G = _int4_group(D)
    return [
        ("k", "uint8", (L, H, T, D // 2)),
        ("v", "uint8", (L, H, T, D // 2)),
        ("k_scale", "float16", (L, H, D)),  # per channel
        ("v_scale", "float16", (L, H, T, D // G)),  # per group of G channels
    ]


def payload_nbytes(scheme: str, num_layers: int, kv_heads: int, tokens: int, head_dim: int) -> int:
    """Exact size in bytes of ``pack(...)`` for this shape."""
    return sum(int(np.prod(shape)) * np.dtype(dt).itemsize for _, dt, shape in layout(scheme, num_layers, kv_heads, tokens, head_dim))


def _scale(amax: np.ndarray, qmax: int) -> np.ndarray:
    """fp16 scales for symmetric codes in [-qmax, qmax]; 0 where the block is all zero."""
    return np.minimum(amax / qmax, _F16_MAX).astype(np.float16)


def _codes(x: np.ndarray, scale16: np.ndarray, qmax: int) -> np.ndarray:
    s = scale16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(x / np.where(s > 0, s, 1.0)), 0.0)
    return np.clip(q, -qmax, qmax)


def _check_kv(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(keys, dtype=np.float32)
    v = np.asarray(values, dtype=np.float32)
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"keys and values must both be (L, H_kv, T, D) arrays; got {k.shape} and {v.shape}")
    if not (np.isfinite(k).all() and np.isfinite(v).all()):
        raise ValueError("keys/values contain NaN or inf; refusing to store a corrupt entry")
    return k, v


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    u = (q.astype(np.int16) + 8).astype(np.uint8)  # (..., D) in [1, 15]
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)  # (..., D/2)


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    out = np.empty(b.shape[:-1] + (b.shape[-1] * 2,), dtype=np.float32)  # (..., D)
    out[..., 0::2] = (b & 0x0F).astype(np.float32) - 8.0
    out[..., 1::2] = (b >> 4).astype(np.float32) - 8.0
    return out


def pack(keys: np.ndarray, values: np.ndarray, scheme: str) -> bytes:
    """Quantize ``keys``/``values`` (L, H_kv, T, D) into one payload blob."""
    k, v = _check_kv(keys, values)
    L, H, T, D = k.shape
    sections = layout(scheme, L, H, T, D)  # validates scheme and shape
    if scheme == "fp16":
        if max(np.abs(k).max(initial=0), np.abs(v).max(initial=0)) > _F16_MAX:
            raise ValueError("keys/values exceed the fp16 range; use int8 or int4")
        parts = {"k": k.astype(np.float16), "v": v.astype(np.float16)}
    elif scheme == "int8":
        ks = _scale(np.abs(k).max(axis=2), 127)  # (L, H, D)
        vs = _scale(np.abs(v).max(axis=3), 127)  # (L, H, T)
        parts = {
            "k": _codes(k, ks[:, :, None, :], 127).astype(np.int8),
            "v": _codes(v, vs[..., None], 127).astype(np.int8),
            "k_scale": ks,
            "v_scale": vs,
        }
    else:
        G = _int4_group(D)
        ks = _scale(np.abs(k).max(axis=2), 7)  # (L, H, D)
        vg = v.reshape(L, H, T, D // G, G)  # (L, H, T, D/G, G)
        vs = _scale(np.abs(vg).max(axis=4), 7)  # (L, H, T, D/G)
        vq = _codes(vg, vs[..., None], 7).reshape(L, H, T, D)
        parts = {
            "k": _pack_nibbles(_codes(k, ks[:, :, None, :], 7)),
            "v": _pack_nibbles(vq),
            "k_scale": ks,
            "v_scale": vs,
        }
    return b"".join(np.ascontiguousarray(parts[name], dtype=dt).tobytes() for name, dt, _ in sections)


def _sections(buf, scheme: str, L: int, H: int, T: int, D: int) -> dict[str, np.ndarray]:
    sections = layout(scheme, L, H, T, D)
    mv = memoryview(buf).cast("B")
    need = sum(int(np.prod(s)) * np.dtype(dt).itemsize for _, dt, s in sections)
    if mv.nbytes != need:
        raise ValueError(f"payload is {mv.nbytes} bytes; {scheme} for (L={L}, H={H}, T={T}, D={D}) needs {need}")
    out, off = {}, 0
    for name, dt, shape in sections:
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        out[name] = np.frombuffer(mv[off:off + n], dtype=dt).reshape(shape)
        off += n
    return out


def unpack(buf, scheme: str, num_layers: int, kv_heads: int, tokens: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Dequantize a payload back to float32 ``(keys, values)``, each (L, H_kv, T, D)."""
    p = _sections(buf, scheme, num_layers, kv_heads, tokens, head_dim)
    if scheme == "fp16":
        return p["k"].astype(np.float32), p["v"].astype(np.float32)
    if scheme == "int8":
        k = p["k"].astype(np.float32) * p["k_scale"].astype(np.float32)[:, :, None, :]
        v = p["v"].astype(np.float32) * p["v_scale"].astype(np.float32)[..., None]
        return k, v
    L, H, T, D = num_layers, kv_heads, tokens, head_dim
    G = _int4_group(D)
    k = _unpack_nibbles(p["k"]) * p["k_scale"].astype(np.float32)[:, :, None, :]
    v = _unpack_nibbles(p["v"]).reshape(L, H, T, D // G, G) * p["v_scale"].astype(np.float32)[..., None]
    return k, v.reshape(L, H, T, D)


def unpack_into(buf, scheme: str, out_k: np.ndarray, out_v: np.ndarray) -> None:
    """Dequantize straight into float32 views ``out_k``/``out_v`` of shape (L, H_kv, T, D)
    (e.g. slices of the decoder's past-KV buffers): no intermediate float copies."""
    L, H, T, D = out_k.shape
    p = _sections(buf, scheme, L, H, T, D)
    if scheme == "fp16":
        out_k[...] = p["k"]
        out_v[...] = p["v"]
    elif scheme == "int8":
        np.multiply(p["k"], p["k_scale"].astype(np.float32)[:, :, None, :], out=out_k)
        np.multiply(p["v"], p["v_scale"].astype(np.float32)[..., None], out=out_v)
    else:
        k, v = unpack(buf, scheme, L, H, T, D)
        out_k[...] = k
        out_v[...] = v


def error_bound(scheme: str, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Worst-case elementwise |dequant(quant(x)) - x| allowed by the scheme (for tests).

    Half a quantization step per block, plus the fp16 rounding of the scale itself
    (which can move a clipped element at most ``qmax * |Δscale|``).
    """
    k, v = _check_kv(keys, values)
    L, H, T, D = k.shape
    if scheme == "fp16":
        return np.abs(k) * 2.0**-11 + 2.0**-24, np.abs(v) * 2.0**-11 + 2.0**-24
    qmax = 127 if scheme == "int8" else 7
    kstep = np.abs(k).max(axis=2, keepdims=True) / qmax  # (L, H, 1, D)
    if scheme == "int8":
        vstep = np.abs(v).max(axis=3, keepdims=True) / qmax  # (L, H, T, 1)
    else:
        G = _int4_group(D)
        vg = np.abs(v).reshape(L, H, T, D // G, G)
        vstep = np.repeat(vg.max(axis=4) / qmax, G, axis=3)  # (L, H, T, D)
    # half a step with the fp16-rounded scale, plus clipping when the scale rounded down,
    # plus the absolute error of subnormal fp16 scales
    bound = lambda step: step * (0.5 * (1 + 2.0**-11) + qmax * 2.0**-11) + qmax * 2.0**-24
    return np.broadcast_to(bound(kstep), k.shape), np.broadcast_to(bound(vstep), v.shape)
