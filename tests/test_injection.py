"""Retrieval-weighted injection: the decoder's attention bias, the entries' weights and order."""
from __future__ import annotations

import numpy as np
import pytest

from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
from inducekv.runtime.memory import INJECTION_KEY, MIN_WEIGHT, Injection, entry_bias
from inducekv.runtime.session import KVCache
from learnutil import add_all
from parityutil import biased_and_masked

FACTS = [{"prompt": f"What is the code of item {i}?", "answer": f"code{i}"} for i in range(5)]


def test_zero_bias_is_no_bias_and_a_huge_negative_bias_is_a_mask(rt):
    ids = rt.tokenizer.encode("Hello there, how are you today?")
    empty = KVCache.empty(rt.manifest)
    plain, _ = rt.decoder.forward(ids, empty)
    zero, _ = rt.decoder.forward(ids, empty, bias=np.zeros(len(ids)))
    assert np.array_equal(plain, zero)
    biased, masked, bias = biased_and_masked(rt, ids, 3)
    np.testing.assert_allclose(biased[4:], masked[4:], atol=1e-5)   # rows after the hidden token
    one_layer = np.zeros_like(bias)
    one_layer[0, 3] = -1e9                                            # per layer: differs from all layers
    assert not np.allclose(rt.decoder.forward(ids, empty, bias=one_layer)[0][4:], masked[4:])


def test_plan_orders_best_last_and_drops_negligible_entries():
    order, w = Injection(None).plan([0.9, 0.8, 0.7])
    assert order == [2, 1, 0] and w is None                     # unweighted: all, best last
    order, w = Injection(0.01).plan([0.90, 0.895, 0.5])
    assert order == [1, 0] and np.isclose(w.sum(), 1) and w[1] > w[0]   # 0.5 is far below: left out
    assert (w >= MIN_WEIGHT).all()
    bias = entry_bias(3, [2, 4], w)
    assert bias.shape == (9,) and not bias[:3].any() and np.allclose(bias[3:5], np.log(w[0]))


def test_weighted_bank_with_a_sharp_tau_answers_like_k1(rt, device_bundle, tmp_path):
    path = tmp_path / "b.ikv"
    with Bank.create_for(path, 1 << 20, rt.manifest, scheme="int8", max_tokens=64) as b:
        add_all(rt, b, FACTS, "t")
        with b.transaction() as tx:
            tx.set_extra(INJECTION_KEY, Injection(1e-6).as_dict())
    mrt = Runtime.open(device_bundle, memory=path)
    q = "What is the code of item 3?"
    k1 = mrt.generate(q, k=1, max_new_tokens=4, ignore_eos=True)
    k4 = mrt.generate(q, k=4, max_new_tokens=4, ignore_eos=True)
    assert [e["id"] for e in k4.entries] == [e["id"] for e in k1.entries]   # the others get no weight
    assert k4.token_ids == k1.token_ids and k4.entries[0]["weight"] == pytest.approx(1.0)


def test_uniform_k_entries_get_a_bias_and_old_bundles_inject_unweighted(rt, device_bundle, tmp_path):
    path = tmp_path / "b.ikv"
    with Bank.create_for(path, 1 << 20, rt.manifest, scheme="int8", max_tokens=64) as b:
        add_all(rt, b, FACTS, "t")
        with b.transaction() as tx:
            tx.set_extra(INJECTION_KEY, Injection(1e3).as_dict())    # nearly equal weights
    mrt = Runtime.open(device_bundle, memory=path)
    prep = mrt.prepare("What is the code of item 3?", k=3)
    assert len(prep.entries) == 3 and prep.bias is not None
    assert np.isclose(sum(e["weight"] for e in prep.entries), 1.0)
    assert np.allclose(prep.bias[-prep.entries[0]["tokens"]:], np.log(prep.entries[0]["weight"]))  # best last
    mrt.decoder.has_bias = False           # what a bundle exported before the bias input does
    prep = mrt.prepare("What is the code of item 3?", k=3)
    assert prep.bias is None and [e["weight"] for e in prep.entries] == [1.0, 1.0, 1.0]


def test_malformed_injection_in_a_bank_is_one_line(rt, device_bundle, tmp_path):
    from inducekv.core.errors import InduceKVError

    path = tmp_path / "b.ikv"
    with Bank.create_for(path, 1 << 20, rt.manifest, scheme="int8", max_tokens=64) as b:
        add_all(rt, b, FACTS[:2], "t")
        with b.transaction() as tx:
            tx.set_extra(INJECTION_KEY, {"tau": -1, "gates": None})
    with pytest.raises(InduceKVError, match="injection calibration is malformed"):
        Runtime.open(device_bundle, memory=path).generate("x", k=2, max_new_tokens=1)


def test_learn_fits_the_weighting_and_stores_it_only_when_it_helps(rt, tmp_path):
    from inducekv.learn import absorb
    from inducekv.learn.calibrate import TAUS, TIE

    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt.manifest, scheme="k4v8", max_tokens=64) as b:
        facts = [{"prompt": f"Which colour is thing {i}?", "answer": ["red", "blue", "green"][i % 3]} for i in range(8)]
        p = absorb(rt, b, facts, "t", n_anchors=1)
        fit = p.injection
        assert set(fit.report["loss_by_tau"]) == {f"{t:g}" for t in TAUS}
        losses, unweighted = fit.report["loss_by_tau"], fit.report["loss_unweighted"]
        if fit.accepted:   # the sharpest tau within TIE of the best, and better than no weighting
            assert losses[f"{fit.tau:g}"] <= min(losses.values()) + TIE + 1e-4 and losses[f"{fit.tau:g}"] < unweighted
            assert all(t >= fit.tau for t in TAUS if losses[f"{t:g}"] <= min(losses.values()) + TIE - 1e-4)
        else:
            assert min(losses.values()) >= unweighted - TIE - 1e-4
        stored = b.catalog["extra"].get(INJECTION_KEY)
        assert (stored is not None and stored["tau"] == fit.tau) if fit.accepted else stored is None
