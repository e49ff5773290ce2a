"""Oracle tests for KV payload quantization: byte sizes, round-trip error bounds, golden bytes."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from inducekv.kernels import kvquant


def _ks(scheme, k):
    """The bank's shared key scales for schemes that use them (fitted on these keys), else None."""
    return kvquant.fit_key_scale([k], scheme) if scheme in kvquant.SHARED_KEY_SCALE else None


def _kv(rng, L=2, H=3, T=5, D=64, outlier=True):
    k = rng.standard_normal((L, H, T, D)).astype(np.float32)
    v = rng.standard_normal((L, H, T, D)).astype(np.float32)
    if outlier:  # keys in real models have a few large channels
        k[:, :, :, 3] *= 40.0
    return k, v


@pytest.mark.parametrize("scheme", kvquant.DENSE)
def test_round_trip_within_bound(scheme, rng):
    k, v = _kv(rng)
    ks = _ks(scheme, k)
    buf = kvquant.pack(k, v, scheme, ks)
    assert len(buf) == kvquant.payload_nbytes(scheme, *k.shape)
    k2, v2 = kvquant.unpack(buf, scheme, *k.shape, key_scale=ks)
    assert k2.shape == k.shape and v2.shape == v.shape and k2.dtype == np.float32
    kb, vb = kvquant.error_bound(scheme, k, v, ks)
    assert (np.abs(k2 - k) <= kb).all()
    assert (np.abs(v2 - v) <= vb).all()


@pytest.mark.parametrize("scheme", kvquant.DENSE)
def test_unpack_into_views_matches_unpack(scheme, rng):
    k, v = _kv(rng)
    ks = _ks(scheme, k)
    buf = kvquant.pack(k, v, scheme, ks)
    big = np.zeros((2, 3, 9, 64), np.float32)  # entries land in a slice of a bigger past-KV buffer
    bigv = np.zeros_like(big)
    kvquant.unpack_into(buf, scheme, big[:, :, 2:7], bigv[:, :, 2:7], ks)
    k2, v2 = kvquant.unpack(buf, scheme, *k.shape, key_scale=ks)
    assert np.array_equal(big[:, :, 2:7], k2) and np.array_equal(bigv[:, :, 2:7], v2)
    assert not big[:, :, :2].any() and not big[:, :, 7:].any()


def test_per_channel_keys_keep_small_channels_precise(rng):
    """The point of KIVI: an outlier channel must not blow up the error of the others."""
    k, v = _kv(rng, outlier=True)
    k2, _ = kvquant.unpack(kvquant.pack(k, v, "int8"), "int8", *k.shape)
    small = np.delete(np.arange(k.shape[-1]), 3)
    rel = np.abs(k2 - k)[..., small].max() / np.abs(k[..., small]).max()
    assert rel < 1 / 127  # half a step of the channel's own scale


@pytest.mark.parametrize(
    "scheme, expected",
    [
        # L=30, H=3, D=64 (SmolLM2-135M), 10 tokens: fp32 would be 460,800 bytes
        ("fp16", 230_400),
        ("int8", 115_200 + 11_520 + 1_800),  # codes + per-channel K scales + per-token V scales
        ("int4", 57_600 + 11_520 + 3_600),  # codes + per-channel K scales + 2 V groups a token
    ],
)
def test_payload_nbytes_default_model(scheme, expected):
    assert kvquant.payload_nbytes(scheme, 30, 3, 10, 64) == expected


def test_golden_bytes_int8():
    """Pins the on-disk byte order: codes K, codes V, K scales, V scales."""
    k = np.array([1.0, -2.0, 0.5, 4.0], dtype=np.float32).reshape(1, 1, 2, 2)
    v = np.array([3.0, -6.0, 0.0, 0.0], dtype=np.float32).reshape(1, 1, 2, 2)
    buf = kvquant.pack(k, v, "int8")
    codes_k = np.frombuffer(buf[:4], np.int8).tolist()
    codes_v = np.frombuffer(buf[4:8], np.int8).tolist()
    ks = np.frombuffer(buf[8:12], np.float16)
    vs = np.frombuffer(buf[12:16], np.float16)
    assert codes_k == [127, -64, 64, 127]  # channel maxima 1.0 and 4.0
    assert codes_v == [64, -127, 0, 0]  # token 1 is all zero: scale 0, codes 0
    assert ks.tolist() == [np.float16(1 / 127), np.float16(4 / 127)]
    assert vs[1] == 0
    assert len(buf) == 16


def test_golden_bytes_int4_nibbles():
    k = np.array([7.0, -7.0], dtype=np.float32).reshape(1, 1, 1, 2)
    buf = kvquant.pack(k, k, "int4")
    # codes +7 and -7, stored +8: 15 (low nibble) and 1 (high nibble)
    assert buf[0] == 0x1F
    k2, _ = kvquant.unpack(buf, "int4", 1, 1, 1, 2)
    np.testing.assert_allclose(k2, k, rtol=1e-3)


def test_zero_and_constant_blocks(rng):
    k = np.zeros((1, 1, 3, 32), np.float32)
    v = np.full((1, 1, 3, 32), 2.5, np.float32)
    for scheme in kvquant.DENSE:
        ks = _ks(scheme, k)
        k2, v2 = kvquant.unpack(kvquant.pack(k, v, scheme, ks), scheme, 1, 1, 3, 32, key_scale=ks)
        assert (k2 == 0).all()
        np.testing.assert_allclose(v2, v, rtol=2e-3)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: kvquant.pack(np.zeros((1, 1, 1, 4)), np.zeros((1, 1, 1, 4)), "int3"), "unknown KV quantization scheme"),
        (lambda: kvquant.pack(np.zeros((1, 1, 4)), np.zeros((1, 1, 4)), "int8"), "(L, H_kv, T, D)"),
        (lambda: kvquant.pack(np.full((1, 1, 1, 4), np.nan), np.zeros((1, 1, 1, 4)), "int8"), "NaN"),
        (lambda: kvquant.pack(np.zeros((1, 1, 1, 3)), np.zeros((1, 1, 1, 3)), "int4"), "odd"),
        (lambda: kvquant.unpack(b"\0" * 7, "int8", 1, 1, 1, 4), "needs"),
        (lambda: kvquant.payload_nbytes("int8", 1, 1, 0, 4), "tokens must be a positive integer"),
        (lambda: kvquant.pack(np.zeros((1, 1, 1, 4)), np.zeros((1, 1, 1, 4)), "k4v8"), "shared key scales"),
        (lambda: kvquant.pack(np.zeros((1, 1, 1, 4)), np.zeros((1, 1, 1, 4)), "k8v8", np.ones((1, 1, 3), np.float16)),
         "shape"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(kvquant.DENSE),
    L=st.integers(1, 3),
    H=st.integers(1, 3),
    T=st.integers(1, 9),
    D=st.sampled_from([2, 8, 32, 64, 96]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31),
)
def test_round_trip_property(scheme, L, H, T, D, scale, seed):
    g = np.random.default_rng(seed)
    k = (g.standard_normal((L, H, T, D)) * scale).astype(np.float32)
    v = (g.standard_normal((L, H, T, D)) * scale).astype(np.float32)
    ks = _ks(scheme, k)
    buf = kvquant.pack(k, v, scheme, ks)
    assert len(buf) == kvquant.payload_nbytes(scheme, L, H, T, D)
    k2, v2 = kvquant.unpack(buf, scheme, L, H, T, D, key_scale=ks)
    kb, vb = kvquant.error_bound(scheme, k, v, ks)
    assert (np.abs(k2 - k) <= kb).all() and (np.abs(v2 - v) <= vb).all()


def test_shared_key_scale_clips_keys_beyond_the_fitted_range(rng):
    k, v = _kv(rng, D=32, outlier=False)
    ks = kvquant.fit_key_scale([k], "k8v8")
    big = k.copy()
    big[0, 0, 0, 0] = 1000.0   # far beyond what the scales were fitted on
    k2, _ = kvquant.unpack(kvquant.pack(big, v, "k8v8", ks), "k8v8", *k.shape, key_scale=ks)
    assert k2[0, 0, 0, 0] == pytest.approx(127 * float(ks[0, 0, 0]), rel=1e-3)   # clipped to the largest code
    kb, _ = kvquant.error_bound("k8v8", big, v, ks)
    assert (np.abs(k2 - big) <= kb).all()


def test_shared_schemes_are_smaller_per_entry():
    per_entry = {s: kvquant.payload_nbytes(s, 30, 3, 6, 64) for s in ("int8", "k8v8", "k4v8", "k4v4")}
    assert per_entry["int8"] - per_entry["k8v8"] == 30 * 3 * 64 * 2   # no per-entry key scales
    assert per_entry["k8v8"] > per_entry["k4v8"] > per_entry["k4v4"]
