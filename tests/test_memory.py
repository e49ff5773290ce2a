"""Runtime with memory on the tiny Llama: key graph, injection parity, position policies, bad input."""
import numpy as np
import pytest

from inducekv.kernels.positions import rerotate, rerotate_
from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
from inducekv.core.errors import BankError, InduceKVError
from inducekv.runtime.memory import TEMPLATES, Layout
from learnutil import add_all
from inducekv.runtime.session import KeyEncoder, KVCache

FACTS = [
    {"prompt": "Capital of Vexland?", "answer": "Morrow"},
    {"prompt": "Colour of a zibble?", "answer": "teal"},
    {"prompt": "Who made the plonker?", "answer": "Ada Quill"},
]


@pytest.fixture(scope="module")
def rt(tiny_bundles):
    return Runtime.open(tiny_bundles["fp32"])


def _bank(rt, path, scheme="fp16", cap=1 << 20, facts=FACTS, policy=None):
    m = rt.manifest
    b = Bank.create_for(path, cap, m, scheme=scheme, force=True, max_tokens=64)
    if facts:
        add_all(rt, b, facts, "facts", policy=policy)
    return b


def test_key_graph_matches_hf_hidden_states(rt, tiny_hf_model):
    import torch

    ids = rt.tokenizer.encode("What is the capital of Vexland?")
    key = KeyEncoder(rt.bundle_dir, rt.manifest, rt.profile)(ids)
    with torch.no_grad():
        hs = tiny_hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    want = hs[rt.manifest.retrieval_key["layers"]][0].mean(0).numpy()
    np.testing.assert_allclose(key, want, atol=1e-4, rtol=1e-4)


def test_one_entry_at_its_positions_equals_joint_prefill(rt):
    lay = Layout(rt, TEMPLATES["facts"], "rerotate")
    k, v = lay.encode_entry(FACTS[0]["prompt"], FACTS[0]["answer"])
    cache, pos = lay.assemble([(k, v)])
    q = lay.query_ids("Capital of Vexland?")
    injected, _ = rt.decoder.forward(q, cache, positions=np.arange(pos, pos + len(q)))
    joint_ids = lay.prefix_ids + lay.entry_ids(FACTS[0]["prompt"], FACTS[0]["answer"]) + q
    joint, _ = rt.decoder.forward(joint_ids, KVCache.empty(rt.manifest))
    diff = np.abs(injected - joint[-len(q):]).max()
    assert diff <= 1e-3, diff
    assert (injected.argmax(-1) == joint[-len(q):].argmax(-1)).all()


def test_rerotation_equals_computing_at_shifted_positions(rt):
    """RoPE identity: text prefilled at positions d.. == prefilled at 0.. with keys re-rotated by d
    (relative positions inside the text are unchanged; values carry no position)."""
    ids = rt.tokenizer.encode("Capital of Vexland? Morrow", bos=False)
    empty = KVCache.empty(rt.manifest)
    _, at0 = rt.decoder.forward(ids, empty)
    for d in (7, 100):
        _, atd = rt.decoder.forward(ids, empty, positions=np.arange(d, d + len(ids)))
        for i in range(rt.manifest.num_layers):
            np.testing.assert_allclose(rerotate(at0.keys[i], d, rt.manifest.rope["theta"]), atd.keys[i], atol=1e-4)
            np.testing.assert_allclose(at0.values[i], atd.values[i], atol=1e-4)
    assert rerotate(at0.keys[0], 0, 1e4) is at0.keys[0]
    inplace = at0.keys[1].copy()
    rerotate_(inplace, 100, rt.manifest.rope["theta"])
    np.testing.assert_allclose(inplace, rerotate(at0.keys[1], 100, rt.manifest.rope["theta"]), atol=1e-6)


@pytest.mark.parametrize("scheme, tol", [("fp16", 0.05), ("int8", 1.0)])
def test_generate_with_bank_retrieves_and_injects(rt, tmp_path, tiny_bundles, scheme, tol):
    _bank(rt, tmp_path / "m.ikv", scheme).close()
    mrt = Runtime.open(tiny_bundles["fp32"], memory=tmp_path / "m.ikv")
    r = mrt.generate(FACTS[1]["prompt"], max_new_tokens=5, k=1)
    assert len(r.entries) == 1 and r.entries[0]["task"] == "facts"
    assert r.entries[0]["id"] == 2  # the entry written from the same prompt is the nearest key
    assert r.timings.key_ms > 0 and r.timings.prefill_ms > 0
    # the same prompt through the layout with the exact fp32 entry: logits drift by the payload quantization only
    lay = mrt.memory.layout()
    k, v = lay.encode_entry(**FACTS[1])
    cache, pos = lay.assemble([(k, v)])
    q = lay.query_ids(FACTS[1]["prompt"])
    exact, _ = rt.decoder.forward(q, cache, positions=np.arange(pos, pos + len(q)))
    info, buf = mrt.memory.retrieve(FACTS[1]["prompt"], 1)[0]
    cache2, _ = lay.assemble_payloads([(buf, info["tokens"])], scheme)
    served, _ = rt.decoder.forward(q, cache2, positions=np.arange(pos, pos + len(q)))
    drift = np.abs(served - exact).max()
    print(f"\n{scheme} payload drift on the tiny model: max |dlogit| {drift:.4f}")
    assert drift <= tol
    assert mrt.generate("anything", max_new_tokens=3, k=0).entries == []
    assert len(mrt.generate("anything", max_new_tokens=3, k=50).entries) == 3  # k larger than the bank


def test_parallel_policy_places_query_after_longest(rt):
    lay = Layout(rt, TEMPLATES["facts"], "parallel")
    e = [lay.encode_entry(**f) for f in FACTS]
    cache, pos = lay.assemble(e)
    assert cache.length == lay.p0 + sum(k.shape[2] for k, _ in e)
    assert pos == lay.p0 + max(k.shape[2] for k, _ in e)


def test_bad_banks(rt, tmp_path, tiny_bundles):
    other = Bank.create(tmp_path / "other.ikv", 1 << 20, fingerprint="another-model", scheme="int8", num_layers=2,
                        kv_heads=2, head_dim=16, key_dim=64)
    other.close()
    with pytest.raises(BankError, match="another model"):
        Runtime.open(tiny_bundles["fp32"], memory=tmp_path / "other.ikv")
    _bank(rt, tmp_path / "empty.ikv", facts=None).close()
    r = Runtime.open(tiny_bundles["fp32"], memory=tmp_path / "empty.ikv").generate("hello", max_new_tokens=2)
    assert r.entries == []
    with pytest.raises(BankError, match="does not exist"):
        Runtime.open(tiny_bundles["fp32"], memory=tmp_path / "missing.ikv")
    with pytest.raises(InduceKVError, match="k must be"):
        Runtime.open(tiny_bundles["fp32"], memory=tmp_path / "empty.ikv").generate("hi", k=-1)


def test_reader_follows_a_writer(rt, tmp_path, tiny_bundles):
    b = _bank(rt, tmp_path / "live.ikv", facts=FACTS[:1])
    reader = Runtime.open(tiny_bundles["fp32"], memory=tmp_path / "live.ikv")
    assert len(reader.generate("x", max_new_tokens=1, k=8).entries) == 1
    add_all(rt, b, FACTS[1:], "more")
    got = reader.generate("x", max_new_tokens=1, k=8).entries
    assert sorted(e["task"] for e in got) == ["facts", "more", "more"]
