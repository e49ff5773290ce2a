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

Schemes with **shared key scales** keep no key scales in the payload: one fp16 scale
per channel, ``(L, H_kv, D)``, is fitted once per bank (``fit_key_scale``, stored by the
bank) and every entry's keys are coded against it (clipped at ``qmax`` steps):

=========  ===========================================  ==========================
``k8v8``   int8 codes, bank-wide per-channel scales     int8, fp16 scale per token
``k4v8``   int4 codes, bank-wide per-channel scales     int8, fp16 scale per token
``k4v4``   int4 codes, bank-wide per-channel scales     int4, fp16 scale per group
=========  ===========================================  ==========================

Payload byte order: the sections of ``layout(...)`` in order, each C-contiguous.
"""
from __future__ import annotations

import numpy as np

SCHEMES = ("fp16", "int8", "int4", "k8v8", "k4v8", "k4v4")
SHARED_KEY_SCALE = ("k8v8", "k4v8", "k4v4")     # schemes whose key scales are the bank's, not the entry's
_PARTS = {"int8": (8, 8), "int4": (4, 4), "k8v8": (8, 8), "k4v8": (4, 8), "k4v4": (4, 4)}  # (key bits, value bits)
KEY_SCALE_MARGIN = 1.25   # fit_key_scale: headroom over the largest key seen per channel
_BITS = {16: "fp16", 8: "k8v8", 4: "k4v4"}   # shared key scales: same accuracy as per-entry, fewer bytes


def scheme_for_bits(bits: int) -> str:
    """The scheme of a device profile's ``kv_bits`` (16, 8 or 4): the shared-key-scale ones."""
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
    kb, vb = _PARTS[scheme]
    if (kb == 4 or vb == 4) and D % 2:
        raise ValueError(f"int4 packs two channels per byte; head_dim {D} is odd")
    out = [("k", "int8", (L, H, T, D)) if kb == 8 else ("k", "uint8", (L, H, T, D // 2)),
           ("v", "int8", (L, H, T, D)) if vb == 8 else ("v", "uint8", (L, H, T, D // 2))]
    if scheme not in SHARED_KEY_SCALE:
        out.append(("k_scale", "float16", (L, H, D)))                       # per channel
    out.append(("v_scale", "float16", (L, H, T)) if vb == 8 else
               ("v_scale", "float16", (L, H, T, D // _int4_group(D))))      # per token / per group of G channels
    return out


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


def _check_key_scale(scheme: str, key_scale, L: int, H: int, D: int) -> np.ndarray | None:
    if scheme not in SHARED_KEY_SCALE:
        return None
    if key_scale is None:
        raise ValueError(f"scheme {scheme} codes keys against the bank's shared key scales; none were given")
    ks = np.asarray(key_scale)
    if ks.shape != (L, H, D) or ks.dtype != np.float16 or not np.isfinite(ks).all() or (ks < 0).any():
        raise ValueError(f"shared key scales must be finite non-negative float16 of shape {(L, H, D)}, "
                         f"got {ks.dtype} {ks.shape}")
    return ks


def fit_key_scale(keys: list[np.ndarray], scheme: str, margin: float = KEY_SCALE_MARGIN) -> np.ndarray:
    """Bank-wide per-channel key scales (L, H_kv, D) float16 for ``scheme`` from sample
    entries' keys (each (L, H_kv, T, D)): the largest |key| per channel times ``margin``."""
    amax = np.max([np.abs(np.asarray(k, np.float32)).max(axis=2) for k in keys], axis=0)   # (L, H, D)
    return _scale(amax * margin, 127 if _PARTS[scheme][0] == 8 else 7)


def pack(keys: np.ndarray, values: np.ndarray, scheme: str, key_scale: np.ndarray | None = None) -> bytes:
    """Quantize ``keys``/``values`` (L, H_kv, T, D) into one payload blob; ``key_scale``
    (L, H_kv, D) float16: the bank's shared key scales (``SHARED_KEY_SCALE`` schemes only)."""
    k, v = _check_kv(keys, values)
    L, H, T, D = k.shape
    sections = layout(scheme, L, H, T, D)  # validates scheme and shape
    if scheme == "fp16":
        if max(np.abs(k).max(initial=0), np.abs(v).max(initial=0)) > _F16_MAX:
            raise ValueError("keys/values exceed the fp16 range; use int8 or int4")
        parts = {"k": k.astype(np.float16), "v": v.astype(np.float16)}
    else:
        kb, vb = _PARTS[scheme]
        kq = 127 if kb == 8 else 7
        ks = _check_key_scale(scheme, key_scale, L, H, D)
        parts = {}
        if ks is None:
            ks = parts["k_scale"] = _scale(np.abs(k).max(axis=2), kq)                # (L, H, D)
        kc = _codes(k, ks[:, :, None, :], kq)
        parts["k"] = kc.astype(np.int8) if kb == 8 else _pack_nibbles(kc)
        if vb == 8:
            vs = _scale(np.abs(v).max(axis=3), 127)                                  # (L, H, T)
            parts["v"] = _codes(v, vs[..., None], 127).astype(np.int8)
        else:
            G = _int4_group(D)
            vg = v.reshape(L, H, T, D // G, G)                                       # (L, H, T, D/G, G)
            vs = _scale(np.abs(vg).max(axis=4), 7)                                   # (L, H, T, D/G)
            parts["v"] = _pack_nibbles(_codes(vg, vs[..., None], 7).reshape(L, H, T, D))
        parts["v_scale"] = vs
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


def unpack(buf, scheme: str, num_layers: int, kv_heads: int, tokens: int, head_dim: int,
           key_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dequantize a payload back to float32 ``(keys, values)``, each (L, H_kv, T, D)."""
    L, H, T, D = num_layers, kv_heads, tokens, head_dim
    k = np.empty((L, H, T, D), np.float32)
    v = np.empty((L, H, T, D), np.float32)
    unpack_into(buf, scheme, k, v, key_scale)
    return k, v


def unpack_into(buf, scheme: str, out_k: np.ndarray, out_v: np.ndarray, key_scale: np.ndarray | None = None) -> None:
    """Dequantize straight into float32 views ``out_k``/``out_v`` of shape (L, H_kv, T, D)
    (e.g. slices of the decoder's past-KV buffers): no intermediate float copies for int8."""
    L, H, T, D = out_k.shape
    p = _sections(buf, scheme, L, H, T, D)
    if scheme == "fp16":
        out_k[...] = p["k"]
        out_v[...] = p["v"]
        return
    kb, vb = _PARTS[scheme]
    ks = _check_key_scale(scheme, key_scale, L, H, D)
    ks = (p["k_scale"] if ks is None else ks).astype(np.float32)[:, :, None, :]     # (L, H, 1, D)
    if kb == 8:
        np.multiply(p["k"], ks, out=out_k)
    else:
        np.multiply(_unpack_nibbles(p["k"]), ks, out=out_k)
    if vb == 8:
        np.multiply(p["v"], p["v_scale"].astype(np.float32)[..., None], out=out_v)
    else:
        G = _int4_group(D)
        vg = _unpack_nibbles(p["v"]).reshape(L, H, T, D // G, G) * p["v_scale"].astype(np.float32)[..., None]
        out_v[...] = vg.reshape(L, H, T, D)


def error_bound(scheme: str, keys: np.ndarray, values: np.ndarray,
                key_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Worst-case elementwise |dequant(quant(x)) - x| allowed by the scheme (for tests).

    Half a quantization step per block, plus the fp16 rounding of the scale itself
    (which can move a clipped element at most ``qmax * |Δscale|``). With shared key
    scales the step is the given scale's, and keys beyond ``qmax`` steps are clipped
    (the bound then includes the clipped excess).
    """
    k, v = _check_kv(keys, values)
    L, H, T, D = k.shape
    if scheme == "fp16":
        return np.abs(k) * 2.0**-11 + 2.0**-24, np.abs(v) * 2.0**-11 + 2.0**-24
    kb, vb = _PARTS[scheme]
    kq, vq = (127 if kb == 8 else 7), (127 if vb == 8 else 7)
    # half a step with the fp16-rounded scale, plus clipping when the scale rounded down,
    # plus the absolute error of subnormal fp16 scales
    bound = lambda step, q: step * (0.5 * (1 + 2.0**-11) + q * 2.0**-11) + q * 2.0**-24
    ks = _check_key_scale(scheme, key_scale, L, H, D)
    if ks is None:
        kbound = np.broadcast_to(bound(np.abs(k).max(axis=2, keepdims=True) / kq, kq), k.shape)  # (L, H, T, D)
    else:
        step = ks.astype(np.float32)[:, :, None, :]                                               # (L, H, 1, D)
        kbound = 0.5 * step + np.maximum(np.abs(k) - kq * step, 0) + 2.0**-24
    if vb == 8:
        vstep = np.abs(v).max(axis=3, keepdims=True) / vq  # (L, H, T, 1)
    else:
        G = _int4_group(D)
        vg = np.abs(v).reshape(L, H, T, D // G, G)
        vstep = np.repeat(vg.max(axis=4) / vq, G, axis=3)  # (L, H, T, D)
    return np.broadcast_to(kbound, k.shape), np.broadcast_to(bound(vstep, vq), v.shape)
