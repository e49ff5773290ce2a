"""Per-layer value gates: fitted by a learn per task on the entry's own continuation, stored only
when they lower held-out loss, applied by the serving path to the injected values of each layer
(the gates of the top-1 entry's task, else the bank-wide ones)."""
from __future__ import annotations

import numpy as np
import pytest

from inducekv.learn.calibrate import GATE_GRID, TIE, continuation, layer_gates
from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
from inducekv.memory.format import VALUE_GATES_KEY
from inducekv.runtime.memory import INJECTION_KEY, TEMPLATES, Injection
from learnutil import add_all

FACTS = [{"prompt": f"What is the code of item {i}?", "answer": f"code{i}"} for i in range(5)]


def test_continuation_is_what_the_entry_says_after_its_prompt():
    assert continuation(TEMPLATES["facts"], "Morrow") == "The answer is Morrow."
    assert continuation(TEMPLATES["qa"], "Morrow") == "A: Morrow"
    assert continuation(TEMPLATES["notes"], "Morrow") == "Morrow"


def test_layer_gates_split_the_layers_into_consecutive_groups():
    assert layer_gates((0.5, 1.0, 2.0), 6) == (0.5, 0.5, 1.0, 1.0, 2.0, 2.0)
    assert layer_gates((0.5, 1.0, 2.0), 30).count(0.5) == 10
    g = tuple(np.linspace(0.5, 2, 7))
    assert layer_gates(g, 7) == g                                         # one group per layer: unchanged


def _past(rt, path, bank_gates=None, task_gates=None):
    with Bank.open(path, writable=True) as b, b.transaction() as tx:
        tx.set_extra(INJECTION_KEY, Injection(None, bank_gates).as_dict())
        tx.set_extra(VALUE_GATES_KEY, task_gates or {})
    prep = Runtime.open(rt.bundle_dir, memory=path).prepare("What is the code of item 3?", k=1)
    return prep, prep.entries[0]["tokens"]


def test_the_serving_path_scales_each_layers_injected_values_by_its_gate(rt, tmp_path):
    path = tmp_path / "b.ikv"
    with Bank.create_for(path, 1 << 20, rt.manifest, scheme="int8", max_tokens=64) as b:
        add_all(rt, b, FACTS, "t")
    L = rt.manifest.num_layers
    plain, T = _past(rt, path)
    gates = tuple(float(x) for x in np.linspace(0.5, 2.0, L))
    other = tuple(float(x) for x in np.linspace(2.0, 0.5, L))
    P = plain.cache.length
    for case in ({"bank_gates": gates}, {"task_gates": {"t": list(gates)}},
                 {"bank_gates": other, "task_gates": {"t": list(gates), "u": list(other)}}):
        gated, _ = _past(rt, path, **case)     # the top-1 entry's task's gates win over the bank's
        for i in range(L):
            np.testing.assert_array_equal(gated.cache.keys[i][..., :P, :], plain.cache.keys[i][..., :P, :])
            np.testing.assert_allclose(gated.cache.values[i][..., P - T:P, :],
                                       gates[i] * plain.cache.values[i][..., P - T:P, :], rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(gated.cache.values[i][..., :P - T, :], plain.cache.values[i][..., :P - T, :])


def test_malformed_value_gates_are_one_line(rt, tmp_path):
    from inducekv.core.errors import InduceKVError

    path = tmp_path / "b.ikv"
    with Bank.create_for(path, 1 << 20, rt.manifest, scheme="int8", max_tokens=64) as b:
        add_all(rt, b, FACTS[:2], "t")
    with pytest.raises(InduceKVError, match="value gates are malformed"):
        _past(rt, path, task_gates={"t": [1.0] * (rt.manifest.num_layers + 1)})   # not one per layer


def test_learn_stores_the_gates_only_when_held_out_loss_drops(rt, tmp_path):
    from inducekv.learn import absorb

    facts = [{"prompt": f"Which colour is thing {i}?", "answer": ["red", "blue", "green"][i % 3]} for i in range(10)]
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt.manifest, scheme="k4v8", max_tokens=64) as b:
        p = absorb(rt, b, facts, "t", n_anchors=1)
        vg, r = p.value_gates, p.value_gates.report
        assert all(x in GATE_GRID for x in r["groups"]) and r["queries"] == len(facts)
        stored = (b.catalog["extra"].get(VALUE_GATES_KEY) or {}).get("t")
        if vg.accepted:
            assert r["loss_after"] < r["loss_before"] - TIE + 1e-4
            assert tuple(stored) == layer_gates(tuple(r["groups"]), rt.manifest.num_layers) == vg.gates
        else:
            assert r["loss_after"] >= r["loss_before"] - TIE - 1e-4 and stored is None
        assert (b.catalog["extra"].get(INJECTION_KEY) or {}).get("gates") is None     # per task, not bank-wide
        # a second task's gates are its own: the first task's stay as they were
        p2 = absorb(rt, b, [{"prompt": f"Which shape is block {i}?", "answer": ["round", "square"][i % 2]}
                            for i in range(8)], "u", n_anchors=1)
        now = b.catalog["extra"].get(VALUE_GATES_KEY) or {}
        assert now.get("t") == stored and now.get("u") == (list(p2.value_gates.gates) if p2.value_gates.accepted else None)


def test_the_relevance_gate_measures_harm_with_the_value_gates_entries_get():
    from types import SimpleNamespace

    from inducekv.learn.gate import fit_gate

    rng = np.random.default_rng(0)
    cands = [SimpleNamespace(key=rng.normal(size=8).astype(np.float32), payload=b"", tokens=3, prompt=f"q{i}",
                             answer="a", image=None, base=-1.0) for i in range(6)]
    old_keys = rng.normal(size=(2, 8)).astype(np.float32)
    seen = []

    class Scorer:   # records what would be scored; every injected entry "hurts"
        rt = None

        def logp_many(self, asks):
            for a in asks:
                seen.append(a.gates)
                yield -2.0

    new, old = (0.5, 2.0), (1.0, 1.5)
    fit = fit_gate(None, cands, old_keys, lambda j: "kv", Scorer(), np.random.default_rng(1), lambda x: x,
                   gates_of=lambda j: new if j >= 2 else old)
    assert len(seen) == 6 and set(seen) <= {new, old} and fit.margin is not None
