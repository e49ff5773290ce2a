"""Held-out value (learn/value.py) and its facility location in selection (learn/select.py)."""
from __future__ import annotations

import numpy as np

from inducekv.learn import select as sel
from inducekv.learn.candidates import Candidate
from inducekv.learn.value import TWIN, contradicted, same_subject, served


def _cand(gain, neighbours=(), gains=()):
    return Candidate("q", "a", b"", 4, np.zeros(4, np.float32), base=-5.0, gain=gain, neighbours=neighbours,
                     neighbour_gains=gains)


def _facts():
    """Fact A stated three times (0, 1, 2: each serves the others), facts B (3) and C (4) once.
    A's statements have the largest gains of all."""
    cands = [_cand(3.0, (1, 2), (2.9, 2.8)), _cand(3.0, (0, 2), (2.9, 2.9)), _cand(3.0, (0, 1), (2.9, 2.9)),
             _cand(2.0, (4, 0), (0.1, -0.5)), _cand(2.0, (3, 0), (0.2, -0.4))]
    return cands


def _pool(cands, served_terms=None):
    n = len(cands)
    rng = np.random.default_rng(0)
    return sel.Pool(nbytes=np.full(n, 1000.0), gain=np.array([c.gain for c in cands]), retention=np.zeros(n),
                    keys=rng.standard_normal((n, 8)), is_new=np.ones(n, bool), age=np.zeros(n), served=served_terms)


def test_served_terms_weight_each_fact_about_once():
    q, s, g, w = served(_facts(), offset=10)
    assert len(q) == 15 and set(q.tolist()) == set(range(10, 15))
    assert np.allclose(w[q == 10], 1 / 3) and np.allclose(w[q == 13], 1.0)   # A has two twins, B none
    assert (g[(q == 13) & (s == 13)] == 2.0).all()                            # the own gain is a term
    lone = _cand(1.0, (0,), (TWIN * 1.0 - 1e-6,))                             # just below a twin
    assert served([lone])[3].tolist() == [1.0, 1.0]


def test_facility_location_keeps_one_statement_per_fact():
    cands = _facts()
    plain = sel.select(_pool(cands), 3000, 3000, "likelihood")
    assert set(plain.tolist()) <= {0, 1, 2, 3, 4} and len({0, 1, 2} & set(plain.tolist())) >= 2  # own gains: A twice+
    fl = sel.select(_pool(cands, served(cands)), 3000, 3000, "likelihood")
    assert len({0, 1, 2} & set(fl.tolist())) == 1 and {3, 4} <= set(fl.tolist())
    # with room for all, the duplicates add nothing worth keeping over nothing: still > 0, so kept
    assert len(sel.select(_pool(cands, served(cands)), 10000, 10000, "likelihood")) >= 3


def test_credit_is_what_each_kept_entry_serves():
    cands = _facts()
    terms = served(cands)
    got = sel.credit(terms, [0, 3])
    assert np.isclose(got[0], (3.0 + 2.9 + 2.9) / 3) and np.isclose(got[3], 2.0 + 0.2)  # and C's question a little
    assert sel.credit(terms, [3, 4]) == {3: 2.0, 4: 2.0}                      # a harmful neighbour serves nothing


def test_old_entries_keep_their_stored_value_beside_the_facility_location():
    cands = _facts()
    n = len(cands) + 1
    pool = sel.Pool(nbytes=np.full(n, 1000.0), gain=np.r_[50.0, [c.gain for c in cands]], retention=np.zeros(n),
                    keys=np.random.default_rng(1).standard_normal((n, 8)), is_new=np.r_[False, np.ones(n - 1, bool)],
                    age=np.r_[1.0, np.zeros(n - 1)], task=np.r_[7, np.zeros(n - 1, np.int64)],
                    served=served(cands, offset=1))
    kept = sel.select(pool, 3000, 3000, "likelihood").tolist()
    assert 0 in kept and len(kept) == 3


def test_twin_groups_link_statements_that_answer_each_other():
    from inducekv.learn.value import twin_groups
    assert twin_groups(_facts()).tolist() == [0, 0, 0, 3, 4]
    one_way = [_cand(2.0, (1,), (1.5,)), _cand(2.0, (0,), (0.1,)), _cand(-1.0, (1,), (5.0,))]
    assert twin_groups(one_way).tolist() == [0, 0, 2]     # one direction is enough; no gain, no twin


def test_a_learn_stores_twin_groups_of_the_entries_it_keeps(tmp_path, tiny_bundles):
    from inducekv.learn import absorb
    from inducekv.memory.bank import Bank
    from inducekv.runtime.api import Runtime
    from inducekv.runtime.memory import twins_from
    rt = Runtime.open(tiny_bundles["fp32"])
    rows = [{"prompt": f"Fact {i} about the vexator?", "answer": f"Zorb{i % 3}"} for i in range(6)]
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt.manifest, scheme="fp16", force=True, max_tokens=64) as b:
        p = absorb(rt, b, rows, "vex", n_anchors=2)
        twins, ids = twins_from(b.catalog), [e.entry_id for e in b.entries()]
        group = p.twin_group
        assert group is not None and len(group) == 6 and all(c.neighbours for c in p.candidates)
        # every stored pair is a pair of kept entries the learn put in one group, labelled by its lowest id
        assert twins, "the tiny model's six near-identical facts answer each other: some twins"
        for e, gid in twins.items():
            assert e in ids and gid in ids and gid <= e
        by_cand = dict(zip([ci for ci in p.add], sorted(ids)))
        for ci, e in by_cand.items():
            mates = [by_cand[cj] for cj in by_cand if group[cj] == group[ci]]
            assert (e in twins) == (len(mates) > 1) and (len(mates) < 2 or twins[e] == min(mates))


def _noisy():
    """Fact A stated three times: 0 and 1 agree (each serves the other), 2 says otherwise (it
    serves neither well, neither serves it) and has the largest own gain; fact B (3, 4) twice,
    agreeing; fact C (5) once, its nearest B's pair, which have A's statements nearer than C."""
    return [_cand(3.0, (1, 2), (2.6, 0.9)), _cand(3.0, (0, 2), (2.5, 1.0)), _cand(3.5, (0, 1), (0.2, 0.3)),
            _cand(3.0, (4, 0), (2.7, 0.1)), _cand(3.0, (3, 1), (2.8, 0.0)), _cand(3.0, (3, 4), (0.1, 0.2))]


def test_a_statement_outvoted_by_its_neighbours_is_contradicted():
    cands = _noisy()
    # 2: its neighbours 0 and 1 are twins, both list 2, it is no twin of theirs, nor they of it.
    # 5 (a lone fact beside B's pair) has the same gains, but B's pair do not list it: kept.
    assert contradicted(cands) == {2}
    q, s, g, w = served(cands)
    assert 2 not in q.tolist() and 2 not in s.tolist()
    agree = [_cand(3.0, (1, 2), (2.6, 2.0)), _cand(3.0, (0, 2), (2.5, 2.2)), _cand(3.0, (0, 1), (2.0, 2.1))]
    assert contradicted(agree) == set()                                      # three statements that agree
    lone = [_cand(3.0, (1,), (0.1,)), _cand(3.0, (0,), (0.1,))]
    assert contradicted(lone) == set()                                       # fewer than two neighbours
    for c in cands:
        c.image = "x.png"
    assert contradicted(cands) == set()                                      # images: never


def test_selection_leaves_out_the_contradicted_statement():
    cands = _noisy()[:3] + [_cand(2.0, (0, 1), (0.1, 0.1))]                  # A's three statements and a fact D
    assert contradicted(cands) == {2}
    kept = sel.select(_pool(cands, served(cands)), 2000, 2000, "likelihood")
    assert 2 not in kept.tolist() and 3 in kept.tolist()                     # one of A's agreeing pair, and D


def _foods():
    """Three people who like mango (0, 1, 2: each raises the others' answer) and one who likes
    figs (3), whose nearest are two of the mango people, who list it: answers shared across
    subjects look like one fact stated three times and a wrong statement of it."""
    people = ["Thobe Zutru", "Drage Thafi", "Futha Sefir", "Tonik Kothi"]
    cands = [_cand(2.1, (1, 3), (1.9, -0.3)), _cand(2.8, (0, 3), (2.9, -0.2)), _cand(2.9, (1, 0), (2.8, 3.0)),
             _cand(2.5, (1, 0), (0.5, 0.7))]
    for c, who, ans in zip(cands, people, ["mango", "mango", "mango", "figs"]):
        c.prompt, c.answer = f"What is {who}'s favourite food?", ans
    return cands, [{w.lower()[:5] for w in who.split()} for who in people]


def test_with_the_subject_gate_on_only_entries_about_the_asked_subject_serve():
    cands, words = _foods()
    # unfiltered: the mango people are one fact's three statements, and figs is outvoted by them
    assert contradicted(cands) == {3}
    q, s, g, w = served(cands)
    assert 3 not in q.tolist() and np.allclose(w[q == 2], 1 / 3)
    ok = same_subject(cands, words)
    assert ok(0, 0) and not ok(0, 1)
    assert contradicted(cands, ok) == set()
    q, s, g, w = served(cands, ok=ok)
    assert (q == s).all() and sorted(q.tolist()) == [0, 1, 2, 3] and np.allclose(w, 1.0)
    kept = sel.select(_pool(cands, served(cands, ok=ok)), 4000, 4000, "likelihood")
    assert kept.tolist() == [0, 1, 2, 3]                                      # each person is a fact of its own
    twice = [_cand(2.1, (2, 1), (1.9, 1.8)), _cand(2.8, (0, 2), (2.9, 2.5)), _cand(2.0, (0, 1), (1.9, 1.8))]
    for c, p in zip(twice, ["What is Thobe Zutru's favourite food?", "What is Drage Thafi's favourite food?",
                            "Which food does Thobe Zutru love most?"]):   # 2 restates 0's fact in other words
        c.prompt, c.answer = p, "mango"
    q, s, g, w = served(twice, ok=same_subject(twice, [words[0], words[1], words[0]]))
    assert np.allclose(w[q == 2], 1 / 2) and set(s[q == 2].tolist()) == {0, 2}   # a true restatement: twins
    assert np.allclose(w[q == 1], 1.0) and s[q == 1].tolist() == [1]



def test_examples_the_bare_model_answers_are_found_once():
    from types import SimpleNamespace
    from inducekv.learn.value import answered
    calls = []

    class Bare:
        def generate(self, prompt, image=None, max_new_tokens=8, stop=None, use_memory=True):
            calls.append((prompt, use_memory))
            return SimpleNamespace(text={"q0": "The capital of Canada is Ottawa.\nMore", "q1": "Toronto",
                                         "q2": "\nOttawa, of course"}[prompt])
    cands = [_cand(1.0), _cand(1.0), _cand(1.0), _cand(1.0)]
    for j, c in enumerate(cands):
        c.prompt, c.answer, c.base = f"q{j}", "Ottawa", -3.0    # 0.05 per token: asked
    cands[3].base = -9.0                              # a made-up answer: not asked
    cands.append(_cand(1.0))
    cands[4].prompt, cands[4].answer, cands[4].base, cands[4].image = "q0", "Ottawa", -3.0, "x.png"   # an image: not asked
    cands.append(_cand(1.0))
    cands[5].prompt, cands[5].answer, cands[5].base = "q1", "Ottawa", -1.0   # 0.37 per token: known, not asked
    assert answered(Bare(), cands) == {0, 2, 5}       # in the first line with text, anywhere in it; or likely enough
    assert [c.answered for c in cands] == [True, False, True, False, False, True] and all(not m for _, m in calls)
    assert answered(Bare(), cands) == {0, 2, 5} and len(calls) == 3   # asked once, q3 and the likely q1 never


def test_a_learn_leaves_out_what_the_bare_model_answers(tmp_path, tiny_bundles, monkeypatch):
    import sys
    from inducekv.learn import absorb
    from inducekv.memory.bank import Bank
    from inducekv.runtime.api import Runtime
    mod = sys.modules["inducekv.learn.plan"]
    rt = Runtime.open(tiny_bundles["fp32"])
    rows = [{"prompt": f"Fact {i} about the vexator?", "answer": f"Zorb{i}"} for i in range(6)]

    def first_two(rt_, cands, progress=False):
        for j, c in enumerate(cands):
            c.answered = j < 2
        return {0, 1}
    monkeypatch.setattr(mod, "answered", first_two)
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt.manifest, scheme="fp16", force=True, max_tokens=64) as b:
        p = absorb(rt, b, rows, "vex", n_anchors=2, dry_run=True)
        assert p.answered == 2 and not {0, 1} & set(p.add) and p.add
        kept = absorb(rt, b, rows, "vex", n_anchors=2, known_out=False, dry_run=True)
        assert kept.answered == 0
        rnd = absorb(rt, b, rows, "vex", n_anchors=2, strategy="random", dry_run=True)
        assert rnd.answered == 0                             # not a valued strategy: nothing asked


def test_a_lead_in_is_fed_but_not_scored(tiny_bundles):
    from inducekv.learn.candidates import Scorer, lead_of
    from inducekv.runtime.api import Runtime
    from inducekv.runtime.memory import TEMPLATES, Layout
    rt = Runtime.open(tiny_bundles["fp32"])
    layout = Layout(rt, TEMPLATES["facts"], "rerotate")
    lead = lead_of(TEMPLATES["facts"])
    assert lead == "The answer is" and lead_of(TEMPLATES["notes"]) == ""
    plain, led = Scorer(rt, layout), Scorer(rt, layout, lead=lead)
    tok = rt.tokenizer
    n_head, n_full = len(tok.encode(lead, bos=False)), len(tok.encode(f"{lead} Zorbia", bos=False))
    # the answer's tokens after the lead-in: the whole sequence's sum minus the lead-in's own
    want = (plain.logp("Who made the vexator?", f"{lead} Zorbia", []) * n_full
            - plain.logp("Who made the vexator?", lead, []) * n_head) / (n_full - n_head)
    got = led.logp("Who made the vexator?", "Zorbia", [])
    assert abs(got - want) < 1e-4 and abs(got - plain.logp("Who made the vexator?", "Zorbia", [])) > 1e-3


def test_held_out_value_read_after_the_lead_in_sets_its_own_gain(tiny_bundles):
    from inducekv.learn.candidates import Scorer, encode_candidates
    from inducekv.learn.value import neighbour_gains, value_scorer
    from inducekv.memory.bank import Bank
    from inducekv.runtime.api import Runtime
    from inducekv.runtime.memory import TEMPLATES, Layout
    import tempfile
    from pathlib import Path
    rt = Runtime.open(tiny_bundles["fp32"])
    layout = Layout(rt, TEMPLATES["facts"], "rerotate")
    rows = [{"prompt": f"Fact {i} about the vexator?", "answer": f"Zorb{i}"} for i in range(4)]
    with tempfile.TemporaryDirectory() as d, \
            Bank.create_for(Path(d) / "b.ikv", 1 << 20, rt.manifest, scheme="fp16", force=True, max_tokens=64) as b:
        cands = encode_candidates(rt, b.geo, layout, rt.key_encoder(), rows)
        first = [(c.base, c.gain) for c in cands]
        scorer = value_scorer(rt, layout, cands)
        assert scorer.lead == "The answer is"
        import dataclasses
        pictured = [dataclasses.replace(cands[0], image="x.png")] + cands[1:]
        assert value_scorer(rt, layout, pictured).lead == ""          # image tasks: the reply's first tokens
        neighbour_gains(b.geo, cands, scorer)
        led = Scorer(rt, layout, lead=scorer.lead)
        from inducekv.learn.candidates import unpack
        for c, (base, gain) in zip(cands, first):
            assert c.base == base                                  # the gates' unit is kept
            lb = led.logp(c.prompt, c.answer, [])
            assert abs(c.gain - (led.logp(c.prompt, c.answer, [unpack(b.geo, c.payload, c.tokens)]) - lb)) < 1e-4
            i = c.neighbours[0]
            want = led.logp(c.prompt, c.answer, [unpack(b.geo, cands[i].payload, cands[i].tokens)]) - lb
            assert abs(c.neighbour_gains[0] - want) < 1e-4
