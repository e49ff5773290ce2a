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

**Sparse** variants (``f16s``, ``k8v8s``, ``k4v8s``, ``k4v4s``: per-layer slot maps, written by
``ikv-learn --compact perlayer``) store, per layer, only ``T`` of an entry's ``span``
tokens (each layer its own), coded as the dense scheme, plus a slot map::

    slots      uint8 (L, T)   token index (< span) of each stored slot, strictly increasing per layer
    slot_bias  fp16  (L,)     additive attention bias on layer l's stored slots
    span       uint16 (1,)    the entry's length in positions (its tokens before compaction)

``expand_into`` scatters them back to their positions in a ``(L, H_kv, span, D)`` buffer
(zeros elsewhere) and returns the ``(L, span)`` attention bias that masks the rest.

Payload byte order: the sections of ``layout(...)`` in order, each C-contiguous.
"""
from __future__ import annotations

import numpy as np

SPARSE = {"f16s": "fp16", "k8v8s": "k8v8", "k4v8s": "k4v8", "k4v4s": "k4v4"}   # per-layer slot maps -> dense scheme
SCHEMES = ("fp16", "int8", "int4", "k8v8", "k4v8", "k4v4") + tuple(SPARSE)
DENSE = tuple(s for s in SCHEMES if s not in SPARSE)
SHARED_KEY_SCALE = ("k8v8", "k4v8", "k4v4", "k8v8s", "k4v8s", "k4v4s")   # key scales are the bank's, not the entry's
MASKED = -1e9          # expand_into: attention bias of a position a layer does not store
MAX_SPAN = 256         # slot indices are uint8
_PARTS = {"int8": (8, 8), "int4": (4, 4), "k8v8": (8, 8), "k4v8": (4, 8), "k4v4": (4, 4)}  # (key bits, value bits)
_PARTS.update({s: _PARTS[d] for s, d in SPARSE.items() if d in _PARTS})
KEY_SCALE_MARGIN = 1.25   # fit_key_scale: headroom over the largest key seen per channel
_BITS = {16: "fp16", 8: "k8v8", 4: "k4v4"}   # shared key scales: same accuracy as per-entry, fewer bytes


def sparse_of(scheme: str) -> str:
    """The per-layer-slot-map variant of a shared-key-scale ``scheme`` (itself when sparse)."""
    if scheme in SPARSE:
        return scheme
    for s, d in SPARSE.items():
        if d == scheme:
            return s
    raise ValueError(f"scheme {scheme!r} has no sparse variant; use one of {', '.join(SPARSE.values())}")


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
    if scheme in SPARSE:
        return layout(SPARSE[scheme], L, H, T, D) + [("slots", "uint8", (L, T)), ("slot_bias", "float16", (L,)),
                                                     ("span", "uint16", (1,))]
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
    """Codes (..., D/2) uint8, two a byte (low nibble first, code + 8) -> (..., D) float32.
    Interleaved in int8 first, then one conversion (5x faster than two strided float writes)."""
    u = np.empty(b.shape + (2,), np.int8)                                  # (..., D/2, 2)
    np.bitwise_and(b, 0x0F, out=u[..., 0], casting="unsafe")
    np.right_shift(b, 4, out=u[..., 1], casting="unsafe")
    u -= 8
    return u.reshape(b.shape[:-1] + (b.shape[-1] * 2,)).astype(np.float32)  # (..., D)


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


def _check_slots(slots: np.ndarray, span: int, L: int, T: int) -> None:
    if slots.shape != (L, T) or not (1 <= span <= MAX_SPAN) or T > span:
        raise ValueError(f"slot map of shape {slots.shape} and span {span} does not fit {L} layers of {T} slots")
    if (slots[:, 0] < 0).any() or (slots[:, -1] >= span).any() or (T > 1 and (np.diff(slots, axis=1) <= 0).any()):
        raise ValueError("slot indices must increase strictly within each layer and stay below the span")


def pack(keys: np.ndarray, values: np.ndarray, scheme: str, key_scale: np.ndarray | None = None,
         slots: np.ndarray | None = None, slot_bias: np.ndarray | None = None, span: int | None = None) -> bytes:
    """Quantize ``keys``/``values`` (L, H_kv, T, D) into one payload blob; ``key_scale``
    (L, H_kv, D) float16: the bank's shared key scales (``SHARED_KEY_SCALE`` schemes only).
    Sparse schemes also take the slot map: ``slots`` (L, T) token indices, ``slot_bias`` (L,),
    ``span`` (the entry's length in positions)."""
    k, v = _check_kv(keys, values)
    L, H, T, D = k.shape
    sections = layout(scheme, L, H, T, D)  # validates scheme and shape
    if scheme in SPARSE:
        if slots is None or slot_bias is None or span is None:
            raise ValueError(f"scheme {scheme} stores a slot map; pass slots, slot_bias and span")
        sl, sb = np.asarray(slots, np.int64), np.asarray(slot_bias, np.float32)
        _check_slots(sl, int(span), L, T)
        if sb.shape != (L,) or not np.isfinite(sb).all() or np.abs(sb).max(initial=0) > _F16_MAX:
            raise ValueError(f"slot_bias must be {L} finite values")
        side = {"slots": sl.astype(np.uint8), "slot_bias": sb.astype(np.float16), "span": np.array([span], np.uint16)}
        dense = pack(k, v, SPARSE[scheme], key_scale)
        return dense + b"".join(np.ascontiguousarray(side[name], dtype=dt).tobytes()
                                for name, dt, _ in sections[len(layout(SPARSE[scheme], L, H, T, D)):])
    elif slots is not None or slot_bias is not None or span is not None:
        raise ValueError(f"scheme {scheme} stores no slot map")
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
    scheme = SPARSE.get(scheme, scheme)
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
        codes = _unpack_nibbles(p["v"]).reshape(L, H, T, D // G, G)
        scale = p["v_scale"].astype(np.float32)[..., None]                  # (L, H, T, D/G, 1)
        grouped = out_v.reshape(L, H, T, D // G, G)       # a view when only the last axis splits
        if np.may_share_memory(grouped, out_v):
            np.multiply(codes, scale, out=grouped)
        else:
            out_v[...] = (codes * scale).reshape(L, H, T, D)


def slot_map(buf, scheme: str, L: int, H: int, T: int, D: int) -> tuple[np.ndarray, np.ndarray, int]:
    """A sparse payload's ``(slots (L, T) int64, slot_bias (L,) float32, span)``, validated
    (payloads are untrusted input)."""
    if scheme not in SPARSE:
        raise ValueError(f"scheme {scheme} stores no slot map")
    p = _sections(buf, scheme, L, H, T, D)
    slots, bias, span = p["slots"].astype(np.int64), p["slot_bias"].astype(np.float32), int(p["span"][0])
    _check_slots(slots, span, L, T)
    if not np.isfinite(bias).all():
        raise ValueError("slot_bias is not finite")
    return slots, bias, span


def span_of(buf, scheme: str, L: int, H: int, T: int, D: int) -> int:
    """Positions the entry takes when injected: ``span`` for sparse payloads, else ``T``."""
    return slot_map(buf, scheme, L, H, T, D)[2] if scheme in SPARSE else T


def expand_into(buf, scheme: str, out_k: np.ndarray, out_v: np.ndarray, tokens: int,
                key_scale: np.ndarray | None = None) -> np.ndarray:
    """A sparse payload of ``tokens`` slots per layer dequantized into its positions of
    ``out_k``/``out_v`` (L, H_kv, span, D), zeros elsewhere; returns the (L, span) float32
    attention bias: ``slot_bias[l]`` on layer l's stored slots, ``MASKED`` on the others."""
    L, H, S, D = out_k.shape
    slots, sbias, span = slot_map(buf, scheme, L, H, tokens, D)
    if span != S:
        raise ValueError(f"payload spans {span} positions; the buffer holds {S}")
    k = np.empty((L, H, tokens, D), np.float32)
    v = np.empty((L, H, tokens, D), np.float32)
    unpack_into(buf, scheme, k, v, key_scale)
    out_k[...] = 0
    out_v[...] = 0
    rows = np.arange(L)[:, None]                                            # (L, 1) with slots (L, T)
    out_k[rows, :, slots] = k.transpose(0, 2, 1, 3)                         # (L, T, H, D)
    out_v[rows, :, slots] = v.transpose(0, 2, 1, 3)
    bias = np.full((L, S), MASKED, np.float32)
    bias[rows, slots] = sbias[:, None]
    return bias


def expand(buf, scheme: str, L: int, H: int, T: int, D: int,
           key_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(keys, values, bias)`` of a sparse payload: (L, H_kv, span, D) x2 and (L, span)."""
    span = span_of(buf, scheme, L, H, T, D)
    k = np.empty((L, H, span, D), np.float32)
    v = np.empty((L, H, span, D), np.float32)
    return k, v, expand_into(buf, scheme, k, v, T, key_scale)


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
