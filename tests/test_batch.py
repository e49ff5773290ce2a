"""Padded batches (learn-time encoding and scoring) give each row what it gives alone."""
import numpy as np
import pytest

from inducekv.kernels import kvquant
from inducekv.learn.candidates import Ask, Scorer, unpack
from inducekv.learn.perlayer import PerLayer
from inducekv.runtime.memory import entry_bias, key_of

FACTS = [("Capital of Vexland?", "Morrow"), ("Colour of a zibble?", "teal"),
         ("Who built the great Orrery of the northern hills?", "Ada Quill"), ("Name?", "Bo")]


def logp_alone(rt, layout, prompt, answer, entries, weights=None, gates=None) -> float:
    """The unbatched reference: one decoder pass over the assembled past, as the runtime serves."""
    cache, pos = layout.assemble(entries, gates)
    q = layout.query_ids(prompt)
    a = rt.tokenizer.encode(answer, bos=False)
    bias = entry_bias(layout.p0, [e[0].shape[2] for e in entries], weights, [e[2] if len(e) > 2 else None for e in entries])
    if bias is not None:
        bias = np.concatenate([bias, np.zeros(bias.shape[:-1] + (len(q) + len(a),), np.float32)], axis=-1)
    logits, _ = rt.decoder.forward(q + a, cache, positions=np.arange(pos, pos + len(q) + len(a)), bias=bias)
    rows = logits[len(q) - 1: len(q) + len(a) - 1].astype(np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    return float(np.mean(rows[np.arange(len(a)), a] - np.log(np.exp(rows).sum(axis=1))))


def test_entries_encoded_in_one_pass_equal_alone(rt, layout):
    items = [(p, a, None) for p, a in FACTS]
    batched = layout.encode_entries(items)
    for (p, a, _), (k, v) in zip(items, batched):
        k1, v1 = layout.encode_entry(p, a)
        assert k.shape == k1.shape                       # padding is cut off each row
        np.testing.assert_allclose(k, k1, atol=1e-4)
        np.testing.assert_allclose(v, v1, atol=1e-4)


def test_keys_in_one_pass_equal_alone(rt):
    keys = rt.key_encoder()
    got = keys.batch([rt.tokenizer.encode(p) for p, _ in FACTS])
    for (p, _), row in zip(FACTS, got):
        np.testing.assert_allclose(row, key_of(rt, keys, p), atol=1e-4)


def test_probe_batch_equals_alone(rt, layout):
    pl = PerLayer(rt, layout, 0.5)
    items = [(p, a, None) for p, a in FACTS]
    for (p, a, _), (k, v, extra) in zip(items, pl.encode_many(items)):
        ids = layout.entry_ids(p, a)
        q1, k1, v1 = pl.probe.run(ids, layout.prefix_cache, np.arange(layout.p0, layout.p0 + len(ids)))
        k2, v2, extra2 = pl._keep(p, a, None, q1, k1, v1)
        np.testing.assert_array_equal(extra["slots"], extra2["slots"])
        np.testing.assert_allclose(extra["slot_bias"], extra2["slot_bias"], atol=1e-4)
        np.testing.assert_allclose(k, k2, atol=1e-4)
        np.testing.assert_allclose(v, v2, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_scores_in_batches_equal_alone(rt, layout, batch):
    """Rows with no entry, one or two dense entries of different lengths, a sparse (masked)
    entry, retrieval weights and value gates, all in one batch."""
    L = rt.manifest.num_layers
    dense = [layout.encode_entry(p, a) for p, a in FACTS]
    pl = PerLayer(rt, layout, 0.5)
    k, v, extra = pl.encode_many([(FACTS[2][0], FACTS[2][1], None)])[0]
    buf = kvquant.pack(k, v, "f16s", **extra)
    geo = type("G", (), {"scheme": "f16s", "num_layers": L, "kv_heads": rt.manifest.num_kv_heads,
                         "head_dim": rt.manifest.head_dim})
    sparse = unpack(geo, buf, k.shape[2])
    cases = [(0, [], None, None), (1, [dense[0]], None, None), (2, [dense[2], dense[1]], np.array([0.7, 0.3]), None),
             (2, [sparse], None, None), (3, [dense[3], sparse, dense[0]], np.array([0.5, 0.3, 0.2]), np.linspace(0.8, 1.4, L)),
             (0, [dense[1]], None, None)]
    want = [logp_alone(rt, layout, *FACTS[i], es, w, g) for i, es, w, g in cases]
    scorer = Scorer(rt, layout, batch=batch)
    got = list(scorer.logp_many(Ask(*FACTS[i], es, None, w, g) for i, es, w, g in cases))
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert len({round(x, 3) for x in want}) > 3          # the cases differ, so a row mix-up would show
    lazy = list(scorer.logp_many(Ask(*FACTS[i], (lambda es=es: es), None, w, g) for i, es, w, g in cases))
    np.testing.assert_allclose(lazy, got, atol=1e-6)


def test_batch_feed_masks_the_padding(rt):
    """Row r sees its own past slots and new tokens, nothing else (the padding is masked out)."""
    from inducekv.runtime.session import batch_feed

    m = rt.manifest
    past = [np.zeros((2, m.num_kv_heads, 5, m.head_dim), np.float32)] * m.num_layers
    feed = batch_feed(m, None, [[5, 6, 7], [8]], past, past, [5, 2], [np.arange(9, 12), np.arange(4, 5)])
    np.testing.assert_array_equal(feed["attention_mask"], [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(feed["input_ids"], [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(feed["position_ids"][:, :1], [[9], [4]])
    assert feed["attention_bias"].shape == (2, m.num_layers, 8) and not feed["attention_bias"].any()


def test_learn_runtime_serves_and_probes_from_one_session(device_bundle, rt, tmp_path):
    """Runtime.open(learn=True): the probe graph is the decoder (one copy of the weights); it
    generates what the plain runtime generates, and a learn through it writes the same entries."""
    from inducekv.learn import learn_task
    from inducekv.learn.compact import Probe
    from inducekv.memory.bank import Bank
    from inducekv.runtime.api import Runtime

    one = Runtime.open(device_bundle, learn=True)
    assert one.decoder.probe and not rt.decoder.probe
    assert Probe(one, "perlayer").sess is one.decoder.sess
    assert one.generate("Capital of Vexland?", max_new_tokens=6).text == rt.generate("Capital of Vexland?", max_new_tokens=6).text
    facts = [{"prompt": p, "answer": a} for p, a in FACTS]
    for r, name in ((one, "one"), (rt, "two")):
        learn_task(r, tmp_path / f"{name}.ikv", facts, name="facts", budget=2_000_000, n_anchors=1, strategy="full")
    with Bank.open(tmp_path / "one.ikv") as a, Bank.open(tmp_path / "two.ikv") as b:
        pa = [a.read_payload(e.slot, e.entry_id)[0] for e in a.snapshot().entries]
        pb = [b.read_payload(e.slot, e.entry_id)[0] for e in b.snapshot().entries]
    assert len(pa) == len(FACTS) and pa == pb


def test_logits_from_skips_rows_and_matches_the_full_pass(rt, layout):
    """The graph's logits_from input: the same rows as the full logits, fewer of them; a
    bundle without the input (rows sliced after the pass) gives the same."""
    from inducekv.runtime.session import KVCache

    assert rt.decoder.rows_input
    ids = rt.tokenizer.encode("Capital of Vexland? Morrow, by the river.")
    full, _ = rt.decoder.forward(ids, KVCache.empty(rt.manifest))
    part, cache = rt.decoder.forward(ids, KVCache.empty(rt.manifest), logits_from=len(ids) - 3)
    assert full.shape[0] == len(ids) and part.shape[0] == 3
    np.testing.assert_allclose(part, full[-3:], atol=1e-5)
    rt.decoder.rows_input = False
    try:
        old, _ = rt.decoder.forward(ids, KVCache.empty(rt.manifest), logits_from=len(ids) - 3)
    finally:
        rt.decoder.rows_input = True
    np.testing.assert_allclose(old, part, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        rt.decoder.forward(ids, KVCache.empty(rt.manifest), logits_from=len(ids))
