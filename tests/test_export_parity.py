"""Oracle: runtime logits and tokens vs transformers on a tiny random Llama."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inducekv.core import contract
from inducekv.core.manifest import read_manifest
from inducekv.runtime import Runtime
from inducekv.runtime.session import KVCache
from parityutil import hf_greedy

PROMPT = "What is the capital of Vexland?"


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_manifest_records_the_model(tiny_bundles, tiny_llama_dir):
    m = read_manifest(tiny_bundles["fp32"], verify_hashes=True)
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    assert (m.architecture, m.num_layers, m.num_kv_heads, m.head_dim) == ("llama", 2, 2, 16)
    assert m.rope["theta"] == cfg["rope_theta"] == 50000.0
    assert m.special_tokens["eos_token_ids"] == [2]
    assert m.weights == "fp32" and m.chat_template
    fps = {read_manifest(b).fingerprint for b in tiny_bundles.values()}
    assert len(fps) == 3  # each weight format is a different model for a memory bank


def test_prefill_logits_match_transformers(tiny_bundles, tiny_hf_model):
    rt = Runtime.open(tiny_bundles["fp32"])
    ids = rt.encode_prompt(PROMPT)
    got, _ = rt.decoder.forward(ids, KVCache.empty(rt.manifest))
    ref = hf_logits(tiny_hf_model, ids)
    assert np.abs(got - ref).max() < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_incremental_decode_matches_full_prefill(tiny_bundles, tiny_hf_model):
    rt = Runtime.open(tiny_bundles["fp32"])
    ids = rt.encode_prompt(PROMPT)
    cache = KVCache.empty(rt.manifest)
    rows = []
    for chunk in (ids[:5], ids[5:17], ids[17:18], ids[18:]):  # uneven chunks through the growing cache
        logits, cache = rt.decoder.forward(chunk, cache)
        rows.append(logits)
    assert cache.length == len(ids)
    assert np.abs(np.concatenate(rows) - hf_logits(tiny_hf_model, ids)).max() < 1e-4


def test_greedy_tokens_match_transformers_generate(tiny_bundles, tiny_hf_model):
    rt = Runtime.open(tiny_bundles["fp32"])
    res = rt.generate(PROMPT, max_new_tokens=20, ignore_eos=True)
    ids = rt.encode_prompt(PROMPT)
    assert res.token_ids == hf_greedy(tiny_hf_model, ids, 20)
    prep = rt.prepare(PROMPT)        # the prompt's cached start (runtime/prefix.py) is not prefilled again
    assert res.timings.new_tokens == 20 and res.timings.prompt_tokens == len(prep.ids) == len(ids) - prep.pos


def test_attention_mask_hides_a_token(tiny_bundles):
    """A zero in attention_mask must act as if that token were absent (a real mask, not a length)."""
    rt = Runtime.open(tiny_bundles["fp32"])
    ids = rt.encode_prompt(PROMPT)
    a, b, query = ids[:6], ids[6:9], ids[9:14]
    empty = KVCache.empty(rt.manifest)
    _, cache_ab = rt.decoder.forward(a + b, empty)
    hidden = np.r_[np.ones(len(a)), np.zeros(len(b)), np.ones(len(query))]
    pos = np.arange(len(a) + len(b), len(a) + len(b) + len(query))
    masked, _ = rt.decoder.forward(query, cache_ab, positions=pos, mask=hidden)
    _, cache_a = rt.decoder.forward(a, empty)
    absent, _ = rt.decoder.forward(query, cache_a, positions=pos)
    assert np.abs(masked - absent).max() < 1e-4
    unmasked, _ = rt.decoder.forward(query, cache_ab, positions=pos)
    assert np.abs(unmasked - absent).max() > 1e-2  # the hidden tokens did matter


def test_explicit_positions_are_honoured(tiny_bundles):
    rt = Runtime.open(tiny_bundles["fp32"])
    ids = rt.encode_prompt(PROMPT)[:8]
    empty = KVCache.empty(rt.manifest)
    base, _ = rt.decoder.forward(ids, empty)
    shifted, _ = rt.decoder.forward(ids, empty, positions=np.arange(7, 7 + len(ids)))
    # RoPE is relative: a constant shift leaves attention scores (and logits) unchanged...
    assert np.abs(base - shifted).max() < 1e-3
    reversed_pos, _ = rt.decoder.forward(ids, empty, positions=np.arange(len(ids))[::-1].copy())
    assert np.abs(base - reversed_pos).max() > 1e-2  # ...but other positions change them


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_bundles_use_matmulnbits_and_stay_close(tiny_bundles, tiny_hf_model, weights):
    import onnx

    g = onnx.load(tiny_bundles[weights] / contract.DECODER_FILE)
    ops = [n.op_type for n in g.graph.node]
    assert ops.count("MatMulNBits") == 2 * 4 + 1  # fused qkv, o, fused gate_up, down per layer + lm head
    assert "MatMul" not in [n.op_type for n in g.graph.node if any(i.endswith(".weight") for i in n.input)]
    rt = Runtime.open(tiny_bundles[weights])
    ids = rt.encode_prompt(PROMPT)
    got, _ = rt.decoder.forward(ids, KVCache.empty(rt.manifest))
    ref = hf_logits(tiny_hf_model, ids)
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= {"int8": 0.9, "int4": 0.6}[weights]
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > {"int8": 0.999, "int4": 0.95}[weights]


def test_optimum_graph_matches_native(tiny_llama_dir, tiny_bundles, tiny_hf_model, tmp_path):
    """The optimum-onnx path is kept for other architectures; both graphs obey one contract."""
    from inducekv.export.build import export_bundle

    manifest, _ = export_bundle(str(tiny_llama_dir), tmp_path / "opt", graph="optimum", progress=False)
    assert manifest.extra["graph"] == "optimum"
    native, optimum = Runtime.open(tiny_bundles["fp32"]), Runtime.open(tmp_path / "opt")
    ids = native.encode_prompt(PROMPT)
    a, _ = native.decoder.forward(ids, KVCache.empty(native.manifest))
    b, _ = optimum.decoder.forward(ids, KVCache.empty(optimum.manifest))
    assert np.abs(a - b).max() < 1e-4
    assert np.abs(b - hf_logits(tiny_hf_model, ids)).max() < 1e-4
    # memory needs the native graph (key graph, attention_bias): refused in one line, nothing written
    from click.testing import CliRunner

    from inducekv.core.errors import BundleError
    from inducekv.learn.cli import cli as learn_cli

    with pytest.raises(BundleError, match="exported with --graph optimum"):
        Runtime.open(tmp_path / "opt", memory=tmp_path / "absent.ikv")
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "Capital of Vexland?", "answer": "Morrow"}\n')
    res = CliRunner().invoke(learn_cli, ["--bundle", str(tmp_path / "opt"), "--memory", str(tmp_path / "b.ikv"),
                                         "--task", str(task), "--budget", "1MiB", "--quiet"])
    assert res.exit_code == 2 and "--graph optimum" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "b.ikv").exists()


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_probe_graph_is_the_decoder_plus_its_queries(tiny_bundles, tiny_hf_model, weights):
    """probe.onnx (listed in the manifest) returns the decoder's logits and KV and each layer's
    post-RoPE queries: layer 0's equal the HF model's q_proj + RoPE."""
    import onnxruntime as ort
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    bundle = tiny_bundles[weights]
    m = read_manifest(bundle, verify_hashes=True)
    assert m.probe == {"graph": contract.PROBE_FILE} and contract.PROBE_FILE in m.files
    rt = Runtime.open(bundle)
    ids = rt.encode_prompt(PROMPT)
    sess = ort.InferenceSession(str(bundle / contract.PROBE_FILE), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == contract.probe_outputs(m.num_layers)
    cache = KVCache.empty(m)
    feed = {contract.INPUT_IDS: np.array([ids]), contract.ATTENTION_MASK: np.ones((1, len(ids)), np.int64),
            contract.POSITION_IDS: np.arange(len(ids))[None],
            contract.ATTENTION_BIAS: np.zeros((1, m.num_layers, len(ids)), np.float32)}
    for i in range(m.num_layers):
        feed[contract.past_key(i)], feed[contract.past_value(i)] = cache.keys[i], cache.values[i]
    out = dict(zip(contract.probe_outputs(m.num_layers), sess.run(None, feed)))
    logits, grown = rt.decoder.forward(ids, cache)
    assert np.array_equal(out[contract.LOGITS][0], logits)
    assert np.array_equal(out[contract.present_key(1)], grown.keys[1])
    if weights != "fp32":
        return
    model = tiny_hf_model.model
    H, D = m.num_attention_heads, m.head_dim
    with torch.no_grad():
        x = model.embed_tokens(torch.tensor([ids]))
        att = model.layers[0].self_attn
        q = att.q_proj(model.layers[0].input_layernorm(x)).view(1, len(ids), H, D).transpose(1, 2)
        cos, sin = model.rotary_emb(x, torch.arange(len(ids))[None])
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    want = q.transpose(1, 2).reshape(len(ids), H * D).numpy()
    np.testing.assert_allclose(out[contract.query_output(0)][0], want, atol=1e-4)
