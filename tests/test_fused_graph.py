"""The decoder graph with onnxruntime's fused ops (export/fuse.py) computes what the standard
opset-23 graph computes, for every way the runtime feeds it; decode steps on in-place KV
buffers (runtime/steps.py) give the plain loop's logits."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from inducekv.core import contract
from inducekv.export.graph import build_llama_graph
from inducekv.runtime import Runtime
from inducekv.runtime.session import KVCache
from inducekv.runtime.steps import InPlaceSteps
import tinybundle

CFG = tinybundle.CONFIG
L, Hkv, D = CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim


@pytest.fixture(scope="module")
def sessions():
    state = tinybundle.weights(seed=3)
    out = {}
    for name, contrib in (("fused", True), ("standard", False)):
        model = build_llama_graph(state, CFG, contrib=contrib)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        out[name] = (model, ort.InferenceSession(model.SerializeToString(), so))
    return out


def _feed(rng, B, S, P, past_lens, start, per_layer_bias):
    ids = rng.integers(3, CFG.vocab_size, (B, S))
    mask = np.zeros((B, P + S), np.int64)
    pos = np.zeros((B, S), np.int64)
    for r in range(B):
        mask[r, :past_lens[r]] = 1
        mask[r, P:P + S - r] = 1              # row r: r padding tokens at the end
        pos[r] = start + r + np.arange(S)
    if P > 2:
        mask[0, 1] = 0                        # a hidden past slot
    feed = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask, contract.POSITION_IDS: pos,
            contract.ATTENTION_BIAS: (rng.standard_normal((B, L, P + S)).astype(np.float32)
                                      if per_layer_bias else np.zeros((B, L, P + S), np.float32))}
    for i in range(L):
        feed[contract.past_key(i)] = rng.standard_normal((B, Hkv, P, D)).astype(np.float32)
        feed[contract.past_value(i)] = rng.standard_normal((B, Hkv, P, D)).astype(np.float32)
    return feed


def test_the_fused_graph_uses_the_contrib_ops_and_says_it_shares_kv(sessions):
    fused, standard = sessions["fused"][0], sessions["standard"][0]
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("GroupQueryAttention") == L and "Attention" not in ops
    std_ops = [n.op_type for n in standard.graph.node]
    assert "RotaryEmbedding" not in ops and ops.count("Split") == std_ops.count("Split") - L   # q/k/v stay packed
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"][0]
    assert gqa.input[1] == gqa.input[2] == "" and gqa.input[9] == contract.POSITION_IDS   # packed q/k/v, explicit positions
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * L         # ln2 of each layer, ln1 after it, final
    assert ops.count("RMSNormalization") == 1 and "Add" not in ops           # ln1 of layer 0 reads the embeddings
    assert std_ops.count("Attention") == L and std_ops.count("RotaryEmbedding") == 2 * L
    meta = sessions["fused"][1].get_modelmeta().custom_metadata_map
    assert meta.get(contract.KV_BUFFER_KEY) == "shared"
    assert contract.KV_BUFFER_KEY not in sessions["standard"][1].get_modelmeta().custom_metadata_map
    probe = [n.op_type for n in build_llama_graph(tinybundle.weights(), CFG, query_outputs=True).graph.node]
    assert "Attention" in probe and "GroupQueryAttention" not in probe and "SkipSimplifiedLayerNormalization" in probe


@pytest.mark.parametrize("B,S,P,past_lens,start,per_layer_bias", [
    (1, 6, 0, [0], 0, False),         # a plain prompt
    (1, 5, 0, [0], 7, True),          # positions from 7, a per-layer bias
    (1, 4, 9, [9], 20, True),         # a prompt after a past (memory entries) with a hidden slot
    (1, 1, 12, [12], 30, True),       # one decode step
    (2, 5, 0, [0, 0], 4, True),       # a right-padded batch of prompts
])
def test_fused_graph_matches_the_standard_one(sessions, B, S, P, past_lens, start, per_layer_bias):
    feed = _feed(np.random.default_rng(B * 100 + S * 10 + P), B, S, P, past_lens, start, per_layer_bias)
    names = [o.name for o in sessions["standard"][1].get_outputs()]
    if B == 1:
        got = sessions["fused"][1].run(names, feed)
    else:                                       # as the runtime runs it (Decoder._run_batch): row by row
        rows = [sessions["fused"][1].run(names, {k: v[r:r + 1] for k, v in feed.items()}) for r in range(B)]
        got = [np.concatenate(parts) for parts in zip(*rows)]
    ref = sessions["standard"][1].run(names, feed)
    for r in range(B):                          # padding rows' outputs are not defined by either graph
        n = S - r
        assert np.abs(got[0][r, :n] - ref[0][r, :n]).max() < 1e-4
        for g, f in zip(got[1:], ref[1:]):
            assert g.shape == f.shape
            assert np.abs(g[r, :, :P + n] - f[r, :, :P + n]).max() < 1e-5


def test_a_batch_after_a_past_runs_row_by_row_on_the_fused_graph(tmp_path):
    rt = Runtime.open(tinybundle.build(tmp_path / "b", seed=2))
    rng = np.random.default_rng(1)
    B, P = 3, 6
    past_k = [rng.standard_normal((B, Hkv, P, D)).astype(np.float32) for _ in range(L)]
    past_v = [rng.standard_normal((B, Hkv, P, D)).astype(np.float32) for _ in range(L)]
    ids = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    args = (ids, past_k, past_v, [6, 4, 5], [np.arange(7, 7 + len(x)) for x in ids])
    got, _ = rt.decoder.forward_batch(*args)
    _, kv = rt.decoder.forward_batch(*args, logits=False)
    rt.decoder.kv_shared = False                 # as one pass: onnxruntime refuses it on this graph
    with pytest.raises(Exception, match="batch_size must be 1"):
        rt.decoder.forward_batch(*args)
    for r, x in enumerate(ids):                  # each row as it would be alone
        past = KVCache([k[r:r + 1, :, :args[3][r]] for k in past_k], [v[r:r + 1, :, :args[3][r]] for v in past_v])
        alone, cache = rt.decoder.forward(x, past, positions=args[4][r])
        assert np.abs(got[r, :len(x)] - alone).max() < 1e-4
        assert np.abs(kv.keys[0][r, :, P:P + len(x)] - cache.keys[0][0, :, args[3][r]:]).max() < 1e-5


def test_in_place_steps_give_the_plain_loops_logits(tmp_path):
    rt = Runtime.open(tinybundle.build(tmp_path / "b", seed=5))
    assert rt.decoder.kv_shared
    ids = rt.encode_prompt("What is the capital of Vexland?")
    rng = np.random.default_rng(0)
    P0 = 5                                       # a past of 5 slots, one hidden by the bias
    past = KVCache([rng.standard_normal((1, Hkv, P0, D)).astype(np.float32) for _ in range(L)],
                   [rng.standard_normal((1, Hkv, P0, D)).astype(np.float32) for _ in range(L)])
    steps_n = 8
    bias = np.zeros((L, P0 + len(ids) + steps_n), np.float32)
    bias[:, :P0] = rng.standard_normal((L, P0))
    bias[:, 2] = -1e9
    logits, cache = rt.decoder.forward(ids, past, positions=np.arange(10, 10 + len(ids)),
                                       bias=bias[:, :P0 + len(ids)], logits_from=len(ids) - 1)
    steps = InPlaceSteps(rt.decoder, cache, P0 + len(ids) + steps_n)
    a = b = logits[-1]
    pos = 10 + len(ids)
    for _ in range(steps_n):
        tok = int(np.argmax(a))
        T = cache.length + 1
        ref, cache = rt.decoder.forward([tok], cache, positions=np.array([pos]), bias=bias[:, :T])
        a = ref[-1]
        b = steps.run([tok], np.array([pos]), bias=bias[:, :T])
        assert np.abs(a - b).max() < 1e-4
        pos += 1
    with pytest.raises(ValueError, match="capacity"):
        steps.run([1], np.array([pos]), bias=np.zeros((L, cache.length + 1), np.float32))


def test_generate_is_the_same_with_and_without_in_place_steps(tmp_path):
    rt = Runtime.open(tinybundle.build(tmp_path / "b"))
    a = rt.generate("hello there friend", max_new_tokens=24, ignore_eos=True)
    rt.decoder.kv_shared = False
    b = rt.generate("hello there friend", max_new_tokens=24, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24


@pytest.mark.parametrize("B", [1, 2])
def test_positions_that_do_not_count_up_are_honoured_without_a_past(sessions, tmp_path, B):
    """With an empty past onnxruntime's rotary takes only the first position: the runtime
    runs such a prompt after a hidden slot (Decoder._run) and gets the standard graph's answer."""
    rt = Runtime.open(tinybundle.build(tmp_path / "b", seed=3))
    assert rt.decoder.rotary_in_attention
    ids = [[5, 9, 14, 3, 8, 2], [7, 7, 30, 4, 11, 6]][:B]
    pos = [np.array([9, 3, 4, 20, 1, 0]), np.array([0, 2, 4, 6, 8, 10])][:B]
    empty = [np.zeros((B, Hkv, 0, D), np.float32)] * L
    got, _ = rt.decoder.forward_batch(ids, empty, empty, [0] * B, pos)
    _, kv = rt.decoder.forward_batch(ids, empty, empty, [0] * B, pos, logits=False)
    feed = {contract.INPUT_IDS: np.array(ids), contract.ATTENTION_MASK: np.ones((B, 6), np.int64),
            contract.POSITION_IDS: np.stack(pos), contract.ATTENTION_BIAS: np.zeros((B, L, 6), np.float32)}
    for i in range(L):
        feed[contract.past_key(i)] = feed[contract.past_value(i)] = empty[0]
    ref = sessions["standard"][1].run(None, feed)
    assert np.abs(got - ref[0]).max() < 1e-4
    assert kv.keys[0].shape == ref[1].shape and np.abs(kv.keys[0] - ref[1]).max() < 1e-5
    one, cache = rt.decoder.forward(ids[0], KVCache.empty(rt.manifest), positions=pos[0])
    assert np.abs(one - ref[0][0]).max() < 1e-4 and cache.length == 6
