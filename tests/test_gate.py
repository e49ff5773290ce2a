"""The relevance gate: a query whose top-1 entry does not stand out is answered without memory."""
import json

import numpy as np
import pytest

from inducekv.core.errors import InduceKVError
from inducekv.learn import absorb, read_examples
from inducekv.learn.gate import QUANTILE, fit_gate, gate_from
from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
from inducekv.runtime.memory import RELEVANCE_KEY
from learnutil import fact_bank, set_extra

FACTS = [{"prompt": f"Capital of Vexland number {i}?", "answer": f"Morrow{i}"} for i in range(6)]
QUERY = "Capital of Vexland number 3?"


@pytest.fixture(scope="module")
def rt(tiny_bundles):
    return Runtime.open(tiny_bundles["fp32"])


@pytest.fixture()
def bank_path(rt, tmp_path):
    return fact_bank(rt, tmp_path / "b.ikv", FACTS, "facts")


def _set_gate(path, value):
    set_extra(path, RELEVANCE_KEY, value)


def _margin(rt, path) -> float:
    with rt.open_memory(path) as mem:
        s = [info["score"] for info, _ in mem.lookup(QUERY, 2).found]
    return s[0] - s[1]


def test_a_closed_gate_answers_exactly_as_without_memory(rt, bank_path):
    plain = rt.generate(QUERY, max_new_tokens=6, use_memory=False)
    with_mem = rt.generate(QUERY, max_new_tokens=6, k=2, memory=rt.open_memory(bank_path))
    assert len(with_mem.entries) == 2
    margin = _margin(rt, bank_path)
    _set_gate(bank_path, {"facts": margin + 1e-4})            # just above this query's margin: closed
    mem = rt.open_memory(bank_path)
    look = mem.lookup(QUERY, 2)
    assert look.found == [] and look.gated == 2
    gated = rt.generate(QUERY, max_new_tokens=6, k=2, memory=mem)
    assert gated.entries == [] and gated.token_ids == plain.token_ids
    assert gated.timings.prompt_tokens == plain.timings.prompt_tokens   # the plain prompt, not the memory layout
    _set_gate(bank_path, {"facts": max(margin - 1e-4, 0.0)})  # just below: open
    assert rt.generate(QUERY, max_new_tokens=6, k=2, memory=rt.open_memory(bank_path)).entries
    _set_gate(bank_path, {"other task": 2.0})                 # another task's gate does not apply
    assert len(rt.generate(QUERY, max_new_tokens=6, k=2, memory=rt.open_memory(bank_path)).entries) == 2


@pytest.mark.parametrize("bad", [{"facts": -0.1}, {"facts": "high"}, ["facts"], {"facts": float("nan")}])
def test_a_malformed_gate_is_refused_in_one_line(rt, bank_path, bad):
    _set_gate(bank_path, bad)
    with pytest.raises(InduceKVError, match="relevance gate is malformed"):
        rt.generate(QUERY, max_new_tokens=2, k=1, memory=rt.open_memory(bank_path))


def test_learn_fits_the_gate_from_harmful_leave_one_out_queries(rt, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Code word number {i}?", "answer": f"Zup{i * 7}"}) + "\n"
                            for i in range(12)))
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt.manifest, force=True, max_tokens=64) as b:
        p = absorb(rt, b, read_examples(task), "codes", n_anchors=2)
        rep = p.gate.as_dict()
        assert rep["queries"] == 12 and rep["harmful"] == len(rep["harmful_margins"])
        if p.gate.margin is None:
            assert rep["harmful"] < 3
            assert "codes" not in b.catalog["extra"][RELEVANCE_KEY]
        else:
            m, g = np.array(rep["asks"]).T
            assert p.gate.margin == pytest.approx(gate_from(m, g), abs=2e-5)
            assert p.gate.margin == pytest.approx(np.quantile(rep["harmful_margins"], QUANTILE), abs=2e-5)
            assert b.catalog["extra"][RELEVANCE_KEY]["codes"] == p.gate.margin
        # the same fit, called directly, is deterministic for a seed
        cands = p.candidates
        from inducekv.learn.candidates import Scorer
        from inducekv.runtime.memory import Layout, template_from

        scorer = Scorer(rt, Layout(rt, *template_from(b.catalog.get("template"))))
        fits = [fit_gate(b.geo, cands, np.zeros((0, b.geo.key_dim), np.float32), None, scorer,
                         np.random.default_rng(3), lambda x: x) for _ in range(2)]
        assert fits[0].as_dict() == fits[1].as_dict()


def test_the_gate_is_a_quantile_of_the_harmful_asks_margins():
    """Only the harmful asks' margins set it; fewer than MIN_HARMFUL of them: no gate."""
    margins = np.r_[np.linspace(0.0001, 0.0040, 21), [0.0045, 0.0050, 0.0060]]
    gains = np.r_[np.full(21, 0.5), [-1.0, -1.0, -1.0]]
    assert gate_from(margins, gains, quantile=0.5) == pytest.approx(0.005)
    assert gate_from(margins, gains) == pytest.approx(np.quantile([0.0045, 0.005, 0.006], QUANTILE))
    assert gate_from(margins, gains, quantile=1.0) == pytest.approx(0.006)
    assert gate_from(margins, np.r_[np.full(22, 0.5), [-1.0, -1.0]]) is None
    assert gate_from(margins, np.r_[np.full(22, 0.5), [-1.0, 0.0]]) is None      # no change is no harm
    assert gate_from(margins, np.r_[np.full(22, 5.0), [-1.0, -1.0]]) is None
    assert gate_from(margins, np.r_[np.full(21, 5.0), [-1.0, -1.0, -1.0]]) is not None   # gains elsewhere do not count


def test_the_margin_skips_the_top_entrys_twins(rt, bank_path):
    from inducekv.runtime.memory import TWINS_KEY, gate_margin
    assert gate_margin(np.array([5, 6, 7]), np.array([0.9, 0.89, 0.5]), {}) == pytest.approx(0.01)
    assert gate_margin(np.array([5, 6, 7]), np.array([0.9, 0.89, 0.5]), {5: 5, 6: 5}) == pytest.approx(0.4)
    assert gate_margin(np.array([5, 6]), np.array([0.9, 0.8]), {5: 1, 6: 1}) == pytest.approx(0.1)  # all twins
    with rt.open_memory(bank_path) as mem:
        look = [(info["id"], info["score"]) for info, _ in mem.lookup(QUERY, 3).found]
    (top, s0), (second, s1), (_, s2) = look
    _set_gate(bank_path, {"facts": (s0 - s1) + (s1 - s2) / 2})  # closed by the top-2 margin alone ...
    assert rt.open_memory(bank_path).lookup(QUERY, 2).found == []
    with Bank.open(bank_path, writable=True) as b, b.transaction() as tx:
        tx.set_extra(TWINS_KEY, {str(top): top, str(second): top})
    assert len(rt.open_memory(bank_path).lookup(QUERY, 2).found) == 2   # ... open once the second is its twin
    with Bank.open(bank_path, writable=True) as b, b.transaction() as tx:
        tx.set_extra(TWINS_KEY, {"x": "y"})
    with pytest.raises(InduceKVError, match="twin groups are malformed"):
        rt.open_memory(bank_path).lookup(QUERY, 2)


def test_the_gate_benchmark_reads_other_quantiles_off_one_run():
    """benchmarks/gate.py --read-off: gates refitted from the stored asks, applied to the stored
    margins; a question keeps its memory answer only where its margin reaches its task's gate."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("gate_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "gate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    asks = [[m, g] for m, g in zip([0.001, 0.002, 0.003, 0.004, 0.005, 0.006], [-1, -1, -1, -1, 0.5, 0.5])]
    res = {"learn": {"t": {"fit": {"asks": asks}}, "u": {"fit": {"asks": []}}},
           "questions": {"real": {"rows": [
               {"task": "t", "margin": 0.0035, "zero": 1.0, "k1": 0.0},    # memory would override it
               {"task": "t", "margin": 0.0100, "zero": 0.0, "k1": 1.0},    # stands out: memory answers
               {"task": "u", "margin": 0.0000, "zero": 0.0, "k1": 1.0}]}}}  # an ungated task
    got = bench.read_off(res, [0.25, 1.0])
    assert got["0.25"]["gates"] == {"t": pytest.approx(0.00175), "u": None}
    assert got["0.25"]["real"] == {"k1": pytest.approx(2 / 3), "open": 1.0, "known_k1": 0.0, "known_n": 1}
    assert got["1.0"]["gates"]["t"] == pytest.approx(0.004)
    assert got["1.0"]["real"] == {"k1": 1.0, "open": pytest.approx(2 / 3), "known_k1": 1.0, "known_n": 1}


def test_an_image_task_keeps_the_margin_gate_only_where_the_bare_model_knows_its_answers():
    from types import SimpleNamespace

    from inducekv.learn.gate import KNOWN, knows

    def cands(*probs):
        return [SimpleNamespace(base=float(np.log(p))) for p in probs]

    assert knows(cands(0.9, 0.8, 0.2))                 # the median example: 0.8
    assert not knows(cands(0.9, 0.3, 0.2))             # 0.3
    assert knows(cands(KNOWN, KNOWN)) and not knows(cands(KNOWN - 1e-3, 0.9, 0.1)) and not knows([])


def test_text_keys_are_remembered_for_the_last_prompts(rt, bank_path, monkeypatch):
    import inducekv.runtime.memory as memory

    monkeypatch.setattr(memory, "TEXT_KEYS", 3)
    with rt.open_memory(bank_path) as mem:
        a = mem.text_key(QUERY)
        np.testing.assert_array_equal(a, mem.query_key(QUERY))
        assert mem.text_key(QUERY) is a                        # remembered
        for i in range(4):
            mem.text_key(f"question {i}?")
        assert len(mem._text_keys) == 3 and QUERY not in mem._text_keys   # the oldest went first


def test_excluded_candidates_are_neither_asked_nor_injected(rt, tmp_path):
    """The outvoted (``value.contradicted``) take no part in the gate's fit: a wrong label
    asked with a right sibling on top would look harmed at a large margin."""
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Code word number {i}?", "answer": f"Zup{i * 7}"}) + "\n"
                            for i in range(8)))
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt.manifest, force=True, max_tokens=64) as b:
        cands = absorb(rt, b, read_examples(task), "codes", n_anchors=2, dry_run=True).candidates
        from inducekv.learn.candidates import Scorer, unpack
        from inducekv.runtime.memory import Layout, template_from

        inner = Scorer(rt, Layout(rt, *template_from(b.catalog.get("template"))))
        seen = []

        class Recording:
            rt = inner.rt

            def logp_many(self, asks):
                for a in asks:
                    seen.append((a.prompt, a.entries()[0][0]))
                    yield from inner.logp_many([a])

        out = {1, 4}
        fit = fit_gate(b.geo, cands, np.zeros((0, b.geo.key_dim), np.float32), None, Recording(),
                       np.random.default_rng(0), lambda x: x, exclude=out)
        assert fit.report["queries"] == len(seen) == len(cands) - len(out)
        banned = [unpack(b.geo, cands[i].payload, cands[i].tokens)[0] for i in out]
        for prompt, k in seen:
            assert prompt not in {cands[i].prompt for i in out}
            assert not any(x.shape == k.shape and np.array_equal(x, k) for x in banned)
