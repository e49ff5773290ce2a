"""Oracle: the native graph of Qwen2, Qwen3 and Gemma 3 (text) vs transformers, on tiny random
checkpoints (``archutil``); memory injection parity and Gemma 3's sliding-window mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from archutil import WINDOW, load, save
from parityutil import biased_and_masked, hf_greedy
from conftest import tiny_tokenizer
from inducekv.core import contract
from inducekv.core.manifest import read_manifest
from inducekv.kernels.positions import layer_thetas, rerotate
from inducekv.runtime import Runtime
from inducekv.runtime.memory import TEMPLATES, Layout
from inducekv.runtime.session import KeyEncoder, KVCache

ARCHS = ["qwen2", "qwen3", "gemma3", "gemma3-softcap"]
PROMPT = "What is the capital of Vexland?"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{arch: (hf dir, fp32 bundle, export report)}, exported once per module."""
    from inducekv.export.build import export_bundle

    root, out = tmp_path_factory.mktemp("arch"), {}
    for arch in ARCHS:
        d = save(arch, root / arch, tiny_tokenizer())
        _, report = export_bundle(str(d), root / f"{arch}-bundle", progress=False)
        out[arch] = (d, root / f"{arch}-bundle", report)
    return out


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_export_check_and_greedy_tokens_match_transformers(built, arch):
    d, bundle, report = built[arch]
    assert report["max_abs_logit_diff"] < 1e-4 and report["argmax_agreement"] == 1.0
    m = read_manifest(bundle, verify_hashes=True)
    assert m.architecture == ("gemma3_text" if arch.startswith("gemma3") else arch) and m.extra["graph"] == "native"
    rt, hf = Runtime.open(bundle), load(arch, d)
    res = rt.generate(PROMPT, max_new_tokens=20, ignore_eos=True)
    ids = rt.encode_prompt(PROMPT)
    assert res.token_ids == hf_greedy(hf, ids, 20)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_chunked_decode_match_transformers(built, arch):
    d, bundle, _ = built[arch]
    rt = Runtime.open(bundle)
    ids = rt.encode_prompt(PROMPT)
    assert len(ids) > 3 * WINDOW   # so Gemma's windowed layers drop slots
    ref = hf_logits(load(arch, d), ids)
    full, _ = rt.decoder.forward(ids, KVCache.empty(rt.manifest))
    assert np.abs(full - ref).max() < 1e-4 and (full.argmax(-1) == ref.argmax(-1)).all()
    cache, rows = KVCache.empty(rt.manifest), []
    for chunk in (ids[:5], ids[5:17], ids[17:18], ids[18:]):   # the window slides over a growing past
        logits, cache = rt.decoder.forward(chunk, cache)
        rows.append(logits)
    assert np.abs(np.concatenate(rows) - ref).max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_key_graph_matches_hf_hidden_states(built, arch):
    d, bundle, _ = built[arch]
    rt = Runtime.open(bundle)
    ids = rt.tokenizer.encode(PROMPT + " And which river runs through it?")
    key = KeyEncoder(rt.bundle_dir, rt.manifest, rt.profile)(ids)
    with torch.no_grad():
        hs = load(arch, d)(torch.tensor([ids]), output_hidden_states=True).hidden_states
    want = hs[rt.manifest.retrieval_key["layers"]][0].mean(0).numpy()
    np.testing.assert_allclose(key, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_injected_entry_equals_joint_prefill(built, arch):
    """Issue 4's parity on each family: the entry's K/V, computed after the shared prefix and
    injected as past KV, gives the query the logits of prefilling prefix + entry + query at once.
    On Gemma 3 the entry (longer than the window) is partly out of the local layers' view in both."""
    rt = Runtime.open(built[arch][1])
    lay = Layout(rt, TEMPLATES["facts"], "rerotate")
    fact = ("What is the capital of Vexland?", "Morrow")
    k, v = lay.encode_entry(*fact)
    assert k.shape[2] > WINDOW
    cache, pos = lay.assemble([(k, v)])
    q = lay.query_ids("Which city is Vexland's capital?")
    injected, _ = rt.decoder.forward(q, cache, positions=np.arange(pos, pos + len(q)))
    joint, _ = rt.decoder.forward(lay.prefix_ids + lay.entry_ids(*fact) + q, KVCache.empty(rt.manifest))
    assert np.abs(injected - joint[-len(q):]).max() <= 1e-3
    assert (injected.argmax(-1) == joint[-len(q):].argmax(-1)).all()


def test_gemma3_rerotates_each_layer_by_its_own_base(built):
    """Local layers use rope_local_base_freq, global ones rope_theta: the manifest lists both and
    re-rotation by the per-layer bases equals prefilling at shifted positions."""
    rt = Runtime.open(built["gemma3"][1])
    m = rt.manifest
    thetas = layer_thetas(m.rope, m.num_layers)
    assert thetas == (700.0, 50000.0, 700.0) and m.rope["layer_window"] == [WINDOW, None, WINDOW]
    ids = rt.tokenizer.encode("Capital of Vexland? Morrow", bos=False)
    empty = KVCache.empty(m)
    _, at0 = rt.decoder.forward(ids, empty)
    _, at9 = rt.decoder.forward(ids, empty, positions=np.arange(9, 9 + len(ids)))
    got = rerotate(np.stack(at0.keys), 9, thetas)
    np.testing.assert_allclose(got, np.stack(at9.keys), atol=1e-4)
    shared = rerotate(np.stack(at0.keys), 9, thetas[1])   # one base for all layers: wrong on the local ones
    assert np.abs(shared[0] - at9.keys[0]).max() > 1e-2


def test_gemma3_local_layers_do_not_see_slots_beyond_the_window(built):
    """What sliding windows mean for memory: a query token at KV slot q sees slot s on a local
    layer only if q - s < window, so an injected entry's early slots reach the query through
    the global layers alone. Perturbing slot 0 on local layers changes nothing for a query
    ``WINDOW`` slots later; on the global layer it does."""
    rt = Runtime.open(built["gemma3"][1])
    ids = rt.tokenizer.encode(PROMPT, bos=False)
    past_ids, q = ids[:10], ids[10:14]
    _, past = rt.decoder.forward(past_ids, KVCache.empty(rt.manifest))
    pos = np.arange(10, 14)
    base, _ = rt.decoder.forward(q, past, positions=pos)

    def perturbed(layer):
        ks, vs = [k.copy() for k in past.keys], [v.copy() for v in past.values]
        ks[layer][:, :, 0] += 5.0
        vs[layer][:, :, 0] += 5.0
        return rt.decoder.forward(q, KVCache(ks, vs), positions=pos)[0]

    assert np.array_equal(perturbed(0), base) and np.array_equal(perturbed(2), base)
    assert np.abs(perturbed(1) - base).max() > 1e-2
    bump = ((np.arange(10) == 9) * 5.0).astype(np.float32)[None, None, :, None]   # slot 9 only
    near = rt.decoder.forward(q, KVCache(list(past.keys), [v + bump for v in past.values]), positions=pos)[0]
    assert np.abs(near - base).max() > 1e-2   # slot 9 is inside every layer's window


def test_gemma3_attention_bias_reaches_every_layer_kind(built):
    """The per-layer ``attention_bias`` is added on windowed and full layers alike: a huge negative
    bias on a slot inside the window equals masking that slot."""
    rt = Runtime.open(built["gemma3"][1])
    ids = rt.tokenizer.encode(PROMPT, bos=False)[:12]
    biased, masked, _ = biased_and_masked(rt, ids, 8)
    np.testing.assert_allclose(biased[9:], masked[9:], atol=1e-5)
    plain, _ = rt.decoder.forward(ids, KVCache.empty(rt.manifest))
    assert np.abs(plain[9:] - masked[9:]).max() > 1e-2


def test_gemma3_probe_graph_is_the_decoder_plus_queries(built):
    import onnxruntime as ort

    bundle = built["gemma3"][1]
    m = read_manifest(bundle)
    rt = Runtime.open(bundle)
    ids = rt.encode_prompt(PROMPT)
    sess = ort.InferenceSession(str(bundle / contract.PROBE_FILE), providers=["CPUExecutionProvider"])
    feed = {contract.INPUT_IDS: np.array([ids]), contract.ATTENTION_MASK: np.ones((1, len(ids)), np.int64),
            contract.POSITION_IDS: np.arange(len(ids))[None],
            contract.ATTENTION_BIAS: np.zeros((1, m.num_layers, len(ids)), np.float32)}
    empty = KVCache.empty(m)
    for i in range(m.num_layers):
        feed[contract.past_key(i)], feed[contract.past_value(i)] = empty.keys[i], empty.values[i]
    out = dict(zip(contract.probe_outputs(m.num_layers), sess.run(None, feed)))
    logits, _ = rt.decoder.forward(ids, empty)
    assert np.array_equal(out[contract.LOGITS][0], logits)
    assert out[contract.query_output(1)].shape == (1, len(ids), m.num_attention_heads * m.head_dim)


def test_per_layer_rerotation_helpers_agree(rng):
    """``rerotate``, in-place ``rerotate_`` and ``rerotate_tokens`` with one base per layer (axis 0)
    agree with each other and with rotating each layer on its own."""
    from inducekv.kernels.positions import rerotate_, rerotate_tokens

    keys = rng.standard_normal((3, 2, 5, 8)).astype(np.float32)   # (L, H_kv, T, D)
    thetas = (700.0, 50000.0, 700.0)
    want = np.stack([rerotate(keys[i], 4, t) for i, t in enumerate(thetas)])
    np.testing.assert_allclose(rerotate(keys, 4, thetas), want, atol=1e-6)
    inplace = keys.copy()
    rerotate_(inplace, 4, thetas)
    np.testing.assert_allclose(inplace, want, atol=1e-5)
    np.testing.assert_allclose(rerotate_tokens(keys, np.full(5, 4), thetas), want, atol=1e-5)
    assert np.abs(want[0] - rerotate(keys[0], 4, 50000.0)).max() > 1e-3
    with pytest.raises(ValueError, match="2 RoPE bases for 3 layers"):
        rerotate(keys, 4, (1.0, 2.0))


def test_graph_has_no_duplicate_initializers(built):
    import onnx

    for arch in ("qwen3", "gemma3"):
        for f in (contract.DECODER_FILE, contract.KEY_FILE, contract.PROBE_FILE):
            names = [t.name for t in onnx.load(built[arch][1] / f).graph.initializer]
            assert len(names) == len(set(names)), (arch, f)


def test_gemma3_int8_bundle_quantizes_every_matmul_and_stays_close(built, tmp_path):
    import onnx

    from inducekv.export.build import export_bundle

    d, fp32, _ = built["gemma3"]
    export_bundle(str(d), tmp_path / "int8", weights="int8", progress=False)
    ops = [n.op_type for n in onnx.load(tmp_path / "int8" / contract.DECODER_FILE).graph.node]
    assert ops.count("MatMulNBits") == 3 * 4 + 1 and "Gelu" in ops   # qkv, o, gate_up, down per layer + head
    a, b = Runtime.open(fp32), Runtime.open(tmp_path / "int8")
    ids = a.encode_prompt(PROMPT)
    x, _ = a.decoder.forward(ids, KVCache.empty(a.manifest))
    y, _ = b.decoder.forward(ids, KVCache.empty(b.manifest))
    assert (x.argmax(-1) == y.argmax(-1)).mean() >= 0.9 and np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_learn_and_serve_memory_on_each_family(built, arch, tmp_path):
    """The default learn path (``learn_task``: a new bank's default compaction) and serving run on
    the new families; the entry written from the asked prompt is retrieved."""
    from inducekv.learn import learn_task

    facts = [{"prompt": "Capital of Vexland?", "answer": "Morrow"}, {"prompt": "Colour of a zibble?", "answer": "teal"},
             {"prompt": "Who made the plonker?", "answer": "Ada Quill"}]
    bundle = built[arch][1]
    res = learn_task(Runtime.open(bundle), tmp_path / "b.ikv", facts, name="facts", budget=600_000, n_anchors=1,
                     strategy="full")   # every fact kept: the tiny random model's held-out gains are noise
    assert res.added == 3
    r = Runtime.open(bundle, memory=tmp_path / "b.ikv").generate(facts[1]["prompt"], max_new_tokens=3, k=1)
    assert r.entries and r.entries[0]["task"] == "facts" and r.entries[0]["id"] == 2


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_perlayer_scores_use_the_manifests_attention_scale(built, arch):
    """The manifest records the decoder's q.k scale (Gemma 3: query_pre_attn_scalar ** -0.5, not
    1/sqrt(head_dim)), and perlayer's importance logits use it: their softmax over an entry's
    window rows equals transformers' attention probabilities on a full-attention layer."""
    from archutil import config
    from inducekv.learn.compact import Probe, answer_span
    from inducekv.learn.perlayer import entry_logits, window_rows

    d, bundle, _ = built[arch]
    rt = Runtime.open(bundle)
    m = rt.manifest
    want_scale = config(arch).query_pre_attn_scalar ** -0.5 if arch == "gemma3" else m.head_dim ** -0.5
    assert read_manifest(bundle).attention_scale == pytest.approx(want_scale, rel=1e-12)
    assert m.score_scale == pytest.approx(want_scale, rel=1e-12)
    lay = Layout(rt, TEMPLATES["facts"], "rerotate")
    fact = ("What is the capital of Vexland?", "Morrow")
    ids, p0 = lay.entry_ids(*fact), lay.p0
    q, keys, _ = Probe(rt, "perlayer").run(ids, lay.prefix_cache, np.arange(p0, p0 + len(ids)))
    rows = window_rows(len(ids), answer_span(rt, lay, *fact))
    logits = entry_logits(q, keys, rows, p0, m.score_scale)                         # (L, H, R, p0 + T)
    with torch.no_grad():
        att = load(arch, d)(torch.tensor([lay.prefix_ids + ids]), output_attentions=True).attentions
    layer = 1   # full attention in both (Gemma 3's layers 0 and 2 are windowed)
    p = np.exp(logits[layer] - logits[layer].max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(p, att[layer][0][:, p0 + rows].numpy(), atol=1e-4)
    if arch == "gemma3":   # the old 1/sqrt(head_dim) gives other probabilities
        old = entry_logits(q, keys, rows, p0)[layer]
        old = np.exp(old - old.max(-1, keepdims=True))
        assert np.abs(old / old.sum(-1, keepdims=True) - p).max() > 1e-2


def test_qwen2_use_sliding_window_is_a_real_windowed_mask(tmp_path):
    """Qwen2's ``use_sliding_window`` (layers from ``max_window_layers`` on see ``sliding_window``
    KV slots) is handled, not ignored: the export matches transformers on a prompt longer than
    the window, the manifest lists the window per layer, and injection still equals the joint prefill."""
    from inducekv.export.build import export_bundle

    d = save("qwen2-swa", tmp_path / "hf", tiny_tokenizer())
    _, report = export_bundle(str(d), tmp_path / "bundle", progress=False, threads=1)
    assert report["max_abs_logit_diff"] < 1e-4 and report["argmax_agreement"] == 1.0
    rt = Runtime.open(tmp_path / "bundle")
    assert rt.manifest.rope["layer_window"] == [None, WINDOW]
    ids = rt.encode_prompt(PROMPT)
    assert len(ids) > 3 * WINDOW
    hf = load("qwen2-swa", d)
    ref = hf_logits(hf, ids)
    full, _ = rt.decoder.forward(ids, KVCache.empty(rt.manifest))
    assert np.abs(full - ref).max() < 1e-4
    from archutil import config, model_class

    unwindowed = model_class("qwen2")(config("qwen2")).eval()   # the same weights without the window
    unwindowed.load_state_dict(hf.state_dict())
    assert np.abs(hf_logits(unwindowed, ids) - ref).max() > 1e-2   # the window matters on this prompt
    assert rt.generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids == hf_greedy(hf, ids, 8)
    lay = Layout(rt, TEMPLATES["facts"], "rerotate")
    k, v = lay.encode_entry("What is the capital of Vexland?", "Morrow")
    cache, pos = lay.assemble([(k, v)])
    q = lay.query_ids("Which city is Vexland's capital?")
    injected, _ = rt.decoder.forward(q, cache, positions=np.arange(pos, pos + len(q)))
    joint, _ = rt.decoder.forward(lay.prefix_ids + lay.entry_ids("What is the capital of Vexland?", "Morrow") + q,
                                  KVCache.empty(rt.manifest))
    assert np.abs(injected - joint[-len(q):]).max() <= 1e-3
