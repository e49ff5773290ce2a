"""--compact perlayer: sparse payloads (slot maps), the per-layer choice, masked injection, bank records."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from inducekv.core.errors import InduceKVError
from inducekv.kernels import kvquant
from inducekv.learn import learn_task, plan
from inducekv.learn.candidates import Scorer, fit_key_scales, unpack
from inducekv.learn.cli import cli
from inducekv.learn.compact import Compaction
from inducekv.learn.perlayer import PerLayer, choose, window_rows
from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
from inducekv.runtime.memory import TEMPLATES, Layout, entry_bias

FACTS = [{"prompt": "Capital of Vexland?", "answer": "Morrow"}, {"prompt": "Colour of a zibble?", "answer": "teal"},
         {"prompt": "Who built the Orrery?", "answer": "Ada Quill"}]


def _sparse(rng, L=3, H=2, S=9, D=8, T=4):
    k = rng.standard_normal((L, H, S, D)).astype(np.float32)
    v = rng.standard_normal((L, H, S, D)).astype(np.float32)
    slots = np.stack([np.sort(rng.choice(S, T, replace=False)) for _ in range(L)])
    rows = np.arange(L)[:, None]
    return k, v, slots, k[rows, :, slots].transpose(0, 2, 1, 3), v[rows, :, slots].transpose(0, 2, 1, 3)


@pytest.mark.parametrize("scheme", sorted(kvquant.SPARSE))
def test_sparse_payload_expands_to_its_positions(rng, scheme):
    k, v, slots, kc, vc = _sparse(rng)
    L, H, S, D = k.shape
    ks = kvquant.fit_key_scale([k], scheme) if scheme in kvquant.SHARED_KEY_SCALE else None
    buf = kvquant.pack(kc, vc, scheme, ks, slots=slots, slot_bias=np.array([0.0, 0.5, 1.25]), span=S)
    dense = kvquant.payload_nbytes(kvquant.SPARSE[scheme], L, H, 4, D)
    assert len(buf) == kvquant.payload_nbytes(scheme, L, H, 4, D) == dense + L * 4 + 2 * L + 2
    assert buf[:dense] == kvquant.pack(kc, vc, kvquant.SPARSE[scheme], ks)      # the dense codes, then the slot map
    ek, ev, bias = kvquant.expand(buf, scheme, L, H, 4, D, ks)
    assert ek.shape == ev.shape == (L, H, S, D) and bias.shape == (L, S)
    bk, bv = kvquant.error_bound(kvquant.SPARSE[scheme], kc, vc, ks)
    for l in range(L):
        hidden = np.setdiff1d(np.arange(S), slots[l])
        assert np.all(ek[l][:, hidden] == 0) and np.all(ev[l][:, hidden] == 0)
        assert np.all(bias[l, hidden] == kvquant.MASKED)
        np.testing.assert_array_equal(bias[l, slots[l]], np.float16([0.0, 0.5, 1.25][l]))
        assert np.all(np.abs(ek[l][:, slots[l]] - kc[l]) <= bk[l] + 1e-6)
        assert np.all(np.abs(ev[l][:, slots[l]] - vc[l]) <= bv[l] + 1e-6)


@pytest.mark.parametrize("bad", ["repeat", "order", "beyond", "short_span"])
def test_bad_slot_maps_are_refused_when_packed_and_when_read(rng, bad):
    k, v, slots, kc, vc = _sparse(rng)
    ks = kvquant.fit_key_scale([k], "k4v4s")
    good = kvquant.pack(kc, vc, "k4v4s", ks, slots=slots, slot_bias=np.zeros(3), span=9)
    s, span = slots.copy(), 9
    if bad == "repeat":
        s[0, 1] = s[0, 0]
    elif bad == "order":
        s[1] = s[1][::-1]
    elif bad == "beyond":
        s[2, -1] = 9
    else:
        span = 3
    with pytest.raises(ValueError, match="slot"):
        kvquant.pack(kc, vc, "k4v4s", ks, slots=s, slot_bias=np.zeros(3), span=span)
    corrupt = bytearray(good)                                  # the same map written into a stored payload
    off = kvquant.payload_nbytes("k4v4", 3, 2, 4, 8)
    corrupt[off:off + 12] = s.astype(np.uint8).tobytes()
    corrupt[-2:] = np.array([span], np.uint16).tobytes()
    with pytest.raises(ValueError, match="slot"):
        kvquant.expand(bytes(corrupt), "k4v4s", 3, 2, 4, 8, ks)
    with pytest.raises(ValueError, match="slot map"):
        kvquant.pack(kc, vc, "k4v4s", ks)
    with pytest.raises(ValueError, match="no slot map"):
        kvquant.pack(kc, vc, "k4v4", ks, slots=slots, slot_bias=np.zeros(3), span=9)


def test_choose_keeps_the_span_and_the_most_attended_tokens_per_layer():
    T, first = 6, 2
    logits = np.full((2, 1, 1, first + T), -5.0)
    logits[0, 0, 0, first + np.array([1, 4])] = 3.0     # layer 0 attends to tokens 1 and 4
    logits[1, 0, 0, first + np.array([0, 2])] = 3.0     # layer 1 to tokens 0 and 2
    slots, bias = choose(logits, first, (5, 6), keep=0.5)
    assert slots.tolist() == [[1, 4, 5], [0, 2, 5]]
    e = np.exp(logits[..., first:] - logits[..., first:].max(-1, keepdims=True)).sum(axis=(1, 2))
    np.testing.assert_allclose(bias, np.log(e.sum(1) / np.take_along_axis(e, slots, 1).sum(1)))
    full, zero = choose(logits, first, (5, 6), keep=1.0)
    assert full.tolist() == [list(range(T))] * 2 and np.all(zero == 0)
    assert window_rows(10, (6, 8)).tolist() == [5, 6, 7, 8, 9] and window_rows(8, (0, 0)).tolist() == [6, 7]


def test_perlayer_keeps_the_chosen_slots_bit_exact(rt, layout):
    """The kept K/V are the full entry's at the chosen tokens (same positions, no re-rotation)."""
    pl = PerLayer(rt, layout, 0.5)
    f = FACTS[2]
    k, v = layout.encode_entry(f["prompt"], f["answer"])
    kc, vc, extra = pl.encode(f["prompt"], f["answer"])
    slots, T = extra["slots"], extra["span"]
    assert T == k.shape[2] and slots.shape == (k.shape[0], int(np.ceil(0.5 * T)))
    rows = np.arange(k.shape[0])[:, None]
    np.testing.assert_allclose(kc, k[rows, :, slots].transpose(0, 2, 1, 3), atol=1e-5)
    np.testing.assert_allclose(vc, v[rows, :, slots].transpose(0, 2, 1, 3), atol=1e-5)
    assert np.all(extra["slot_bias"] >= 0)


def test_keep_all_reproduces_the_dense_entry(rt, layout, tmp_path):
    """keep=1.0: every layer keeps every token with bias 0; injected through the mask, the
    logits are the dense entry's (same codes)."""
    ks = fit_key_scales(rt, layout, FACTS, "k8v8")
    f = FACTS[0]
    kc, vc, extra = PerLayer(rt, layout, 1.0).encode(f["prompt"], f["answer"])
    assert np.all(extra["slot_bias"] == 0)
    geo_s = Bank.create_for(tmp_path / "s.ikv", 400_000, rt.manifest, scheme="k8v8s", max_tokens=96)
    geo_d = Bank.create_for(tmp_path / "d.ikv", 400_000, rt.manifest, scheme="k8v8", max_tokens=96)
    sparse = unpack(geo_s.geo, kvquant.pack(kc, vc, "k8v8s", ks, **extra), kc.shape[2], ks)
    dense = unpack(geo_d.geo, kvquant.pack(kc, vc, "k8v8", ks), kc.shape[2], ks)
    geo_s.close(), geo_d.close()
    sc = Scorer(rt, layout)
    a, b = sc.logp(f["prompt"], f["answer"], [sparse]), sc.logp(f["prompt"], f["answer"], [dense])
    assert a == pytest.approx(b, abs=1e-5)
    half = unpack(geo_s.geo, kvquant.pack(*PerLayer(rt, layout, 0.3).encode(f["prompt"], f["answer"])[:2], "k8v8s",
                                          ks, **PerLayer(rt, layout, 0.3).encode(f["prompt"], f["answer"])[2]),
                  int(np.ceil(0.3 * kc.shape[2])), ks)
    assert sc.logp(f["prompt"], f["answer"], [half]) != pytest.approx(b, abs=1e-5)   # masking does change it


def test_entry_bias_combines_weights_and_masks():
    m = np.array([[0.5, kvquant.MASKED], [0.0, 0.25]], np.float32)
    b = entry_bias(2, [3, 2], np.array([0.25, 0.75]), [None, m])
    assert b.shape == (2, 7)
    np.testing.assert_allclose(b[:, :2], 0)
    np.testing.assert_allclose(b[:, 2:5], np.log(0.25), rtol=1e-6)
    np.testing.assert_allclose(b[:, 5:], m + np.log(0.75), rtol=1e-6)
    assert entry_bias(2, [3], None, [None]) is None


def test_learn_task_defaults_to_perlayer_and_serves_it(rt, tmp_path):
    res = learn_task(rt, tmp_path / "b.ikv", FACTS, name="facts", budget=600_000, n_anchors=1,
                     strategy="full")   # every fact kept (the tiny model's held-out gains are noise)
    with Bank.open(tmp_path / "b.ikv") as b:
        assert b.geo.scheme == "k4v4s" and b.catalog["extra"]["compact"] == {"method": "perlayer", "slots": None,
                                                                             "keep": 0.5}
        lay = Layout(rt, TEMPLATES["facts"], "rerotate")
        T = sorted(len(lay.entry_ids(**f)) for f in FACTS)
        assert res.added == 3 and sorted(e.tokens for e in b.entries()) == [int(np.ceil(0.5 * t)) for t in T]
        full = Bank.create_for(tmp_path / "f.ikv", 600_000, rt.manifest, scheme="k4v4", max_tokens=96)
        assert b.geo.payload_nbytes(int(np.ceil(0.5 * T[0]))) < 0.6 * full.geo.payload_nbytes(T[0])
        full.close()
    r = Runtime.open(rt.bundle_dir, memory=tmp_path / "b.ikv").generate(FACTS[0]["prompt"], max_new_tokens=3, k=2)
    assert r.entries and r.entries[0]["task"] == "facts"
    with Bank.open(tmp_path / "b.ikv", writable=True) as b:     # the bank keeps its method; another is refused
        with pytest.raises(InduceKVError, match="one bank holds one compaction|needs a bank created for it"):
            plan(rt, b, FACTS, "more", compact="none")
        with pytest.raises(InduceKVError, match="--slots applies to --compact genv"):
            plan(rt, b, FACTS, "more", slots=4)
        assert plan(rt, b, FACTS, "more", strategy="all", reserve=0.0, n_anchors=0).compaction == \
            Compaction("perlayer", None, 0.5)


def test_cli_perlayer_options_and_errors(device_bundle, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    base = ["--bundle", str(device_bundle), "--task", str(task), "--quiet"]
    r = CliRunner()
    out = r.invoke(cli, base + ["--memory", str(tmp_path / "a.ikv"), "--budget", "600KB", "--keep", "0.3", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["compact"] == {"method": "perlayer", "slots": None, "keep": 0.3}
    out = r.invoke(cli, base + ["--memory", str(tmp_path / "n.ikv"), "--budget", "600KB", "--compact", "none", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["compact"]["method"] == "none"
    with Bank.open(tmp_path / "n.ikv") as b:
        assert b.geo.scheme == "k4v4"

    def fails(args, words):
        o = r.invoke(cli, base + args)
        assert o.exit_code != 0 and words in o.output, o.output

    fails(["--memory", str(tmp_path / "n.ikv"), "--compact", "perlayer"], "one bank holds one compaction")
    fails(["--memory", str(tmp_path / "a.ikv"), "--compact", "none"], "one bank holds one compaction")
    fails(["--memory", str(tmp_path / "x.ikv"), "--budget", "600KB", "--compact", "genv", "--keep", "0.5"],
          "--keep applies to --compact perlayer")
    fails(["--memory", str(tmp_path / "x.ikv"), "--budget", "600KB", "--keep", "0"], "0")
    fails(["--memory", str(tmp_path / "x.ikv"), "--budget", "600KB", "--scheme", "int8", "--compact", "perlayer"],
          "no per-layer variant")
    assert not (tmp_path / "x.ikv").exists()


def test_empty_dense_bank_refuses_perlayer(rt, tmp_path):
    with Bank.create_for(tmp_path / "d.ikv", 600_000, rt.manifest, scheme="k4v4", max_tokens=96) as b:
        with pytest.raises(InduceKVError, match="needs a bank created for it"):
            plan(rt, b, FACTS, "t", compact="perlayer")


def test_profile_carries_the_compaction_defaults(device_bundle, tmp_path):
    from inducekv.devices.profile import load_profile

    for name, extra, scheme, rec in (("none", 'compact = "none"', "k4v4", None),
                                     ("k3", "keep = 0.3", "k4v4s", {"method": "perlayer", "slots": None, "keep": 0.3})):
        prof = tmp_path / f"{name}.toml"
        prof.write_text(f'name = "{name}"\nkv_bits = 4\n{extra}\n')
        rt = Runtime.open(device_bundle, device=load_profile(prof))
        learn_task(rt, tmp_path / f"{name}.ikv", FACTS, name="facts", budget=600_000, n_anchors=1)
        with Bank.open(tmp_path / f"{name}.ikv") as b:
            assert b.geo.scheme == scheme and b.catalog["extra"].get("compact") == rec
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\ncompact = "genv"\n')
    with pytest.raises(InduceKVError, match="compact must be perlayer or none"):
        load_profile(bad)


def test_unstorable_perlayer_entry_is_one_line(rt, tmp_path, monkeypatch):
    real = PerLayer.encode_many

    def broken(self, items):
        out = real(self, items)
        out[0][0][0, 0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(PerLayer, "encode_many", broken)
    with pytest.raises(InduceKVError, match="cannot be stored as k4v4s.*NaN"):
        learn_task(rt, tmp_path / "b.ikv", FACTS, name="facts", budget=600_000, n_anchors=1)
    assert not (tmp_path / "b.ikv").exists() or Bank.open(tmp_path / "b.ikv").usage()["entries"] == 0


@pytest.mark.parametrize("policy", ["rerotate", "parallel"])
def test_sparse_entries_served_unexpanded_equal_expanded(rt, policy):
    """The runtime places a sparse entry's kept slots only (``assemble_masked``): the query's
    logits are those of the entries expanded to their spans with the dropped tokens masked,
    with weights and gates, two entries of different spans (the second's position depends
    on the first's span)."""
    lay = Layout(rt, TEMPLATES["facts"], policy)
    ks = fit_key_scales(rt, lay, FACTS, "k8v8")
    pl = PerLayer(rt, lay, 0.4)
    bufs = []
    for f in FACTS[1:]:
        kc, vc, extra = pl.encode(f["prompt"], f["answer"])
        bufs.append((kvquant.pack(kc, vc, "k8v8s", ks, **extra), kc.shape[2]))
    L = rt.manifest.num_layers
    gates, w = np.linspace(0.8, 1.3, L), np.array([0.3, 0.7])
    q = lay.query_ids(FACTS[0]["prompt"])

    def logits(cache, pos, lengths, masks):
        bias = entry_bias(lay.p0, lengths, w, masks)
        bias = np.concatenate([bias, np.zeros((L, len(q)), np.float32)], axis=1)
        return rt.decoder.forward(q, cache, positions=np.arange(pos, pos + len(q)), bias=bias)[0]

    cache, pos, masks = lay.assemble_masked(bufs, "k8v8s", gates=gates, key_scale=ks)
    assert cache.length == lay.p0 + sum(t for _, t in bufs)        # slots only, not spans
    got = logits(cache, pos, [m.shape[1] for m in masks], masks)
    full = [kvquant.expand(b, "k8v8s", L, rt.manifest.num_kv_heads, t, rt.manifest.head_dim, ks) for b, t in bufs]
    cache2, pos2 = lay.assemble([(k, v) for k, v, _ in full], gates)
    assert pos2 == pos and cache2.length > cache.length
    want = logits(cache2, pos2, [k.shape[2] for k, _, _ in full], [m for _, _, m in full])
    np.testing.assert_allclose(got, want, atol=2e-4)
