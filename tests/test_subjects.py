"""The subject gate of text tasks (runtime/subjects.py): words, template, the serve-time check,
the learn's fit and its catalog record."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from inducekv.core.errors import InduceKVError
from inducekv.learn import absorb, read_examples, write
from inducekv.learn.gate import fit_gate
from inducekv.memory.bank import Bank
from inducekv.memory.cli import cli as bank_cli
from inducekv.memory.format import SUBJECTS_KEY
from inducekv.runtime import subjects as subj
from inducekv.runtime.api import Runtime
from learnutil import fact_bank, set_extra

PLACES = ["Zorbia", "Vuroresh", "Kathokumar", "Bubregosland", "Thalassa", "Quenby", "Morvane", "Pellucid"]
CAPITALS = ["Danedith", "Sidum", "Thege", "Orrin", "Vesk", "Lumo", "Tarrow", "Fenn"]
WORDINGS = ["Which city is {}'s capital?", "Tell me the capital of {}.", "{} has its capital in which city?",
            "Name the capital city of {}."]
FACTS = [{"prompt": WORDINGS[i % 4].format(p), "answer": a} for i, (p, a) in enumerate(zip(PLACES, CAPITALS))]


def test_words_are_lowercased_prefixes_without_possessives_or_short_words():
    assert subj.words("Which city is Japan's capital?") == {"which", "city", "japan", "capit"}
    assert subj.words("Japanese zibbles of a zibble") == {"japan", "zibbl"}
    assert subj.words("") == set()


def test_template_words_are_those_of_many_answers_and_subjects_are_the_rest():
    prompts, answers = [f["prompt"] for f in FACTS], [f["answer"] for f in FACTS]
    common = subj.template_words(prompts, answers)
    assert {"which", "city", "capit", "the"} <= common and "tell" not in common   # "Tell me": 2 answers
    assert not {"zorbi", "vuror"} & common
    said = subj.subject_words(prompts, answers)
    assert said[0] == {"zorbi"} and said[1] == {"vuror"}      # not "tell": seen with more answers than Vuroresh
    assert subj.subject_words(prompts[:3], answers[:3]) is None          # too few prompts to tell the template


def test_a_query_names_an_entry_only_by_its_subject_words():
    assert subj.names(subj.words("What is the capital of Zorbia?"), {"zorbi"})
    assert not subj.names(subj.words("Which city is Japan's capital?"), {"zorbi"})
    assert subj.names(subj.words("anything"), set()) and subj.names(set(), None)   # no subject words: open


def test_the_record_round_trips_and_a_malformed_one_is_refused():
    tasks, entries = subj.unpack(subj.pack({"caps"}, {3: {"zorbi"}, 4: set()}))
    assert tasks == {"caps"} and entries == {3: {"zorbi"}}
    assert subj.unpack(None) == (set(), {})
    assert subj.unpack({"version": 99, "tasks": 5}) == (set(), {})          # another version: not applied
    for bad in ({"version": 1, "tasks": ["caps"]}, {"version": 1, "tasks": ["c"], "entries": {"x": "w"}}, [1]):
        with pytest.raises(InduceKVError, match="subject gate is malformed"):
            subj.unpack(bad)


@pytest.fixture(scope="module")
def rt(tiny_bundles):
    return Runtime.open(tiny_bundles["fp32"])


@pytest.fixture()
def bank_path(rt, tmp_path):
    return fact_bank(rt, tmp_path / "b.ikv", FACTS, "caps", max_tokens=128)


def _set(path, value):
    set_extra(path, SUBJECTS_KEY, value)


def _gated(rt, bank_path):
    """The bank's task "caps" subject-gated: (its memory, entry ids sorted, their subject words)."""
    with Bank.open(bank_path) as b:
        ids = sorted(e.entry_id for e in b.snapshot().entries)
    said = subj.subject_words([f["prompt"] for f in FACTS], [f["answer"] for f in FACTS])
    _set(bank_path, subj.pack({"caps"}, dict(zip(ids, said))))
    return rt.open_memory(bank_path), ids, said


def test_a_query_naming_another_subject_is_answered_as_without_memory(rt, bank_path):
    mem, ids, said = _gated(rt, bank_path)
    own = mem.lookup(FACTS[0]["prompt"], 1)          # (the tiny model's keys find an entry by its own prompt)
    assert own.found and own.gated == 0
    assert said[ids.index(own.found[0][0]["id"])] == {"zorbi"}
    query = "Which city is Japan's capital?"
    look = mem.lookup(query, 2)
    assert look.found == [] and look.gated == 2
    plain = rt.generate(query, max_new_tokens=6, use_memory=False)
    gated = rt.generate(query, max_new_tokens=6, k=2, memory=mem)
    assert gated.entries == [] and gated.token_ids == plain.token_ids
    _set(bank_path, subj.pack({"other"}, dict(zip(ids, said))))          # another task's gate does not apply
    assert len(rt.open_memory(bank_path).lookup(query, 2).found) == 2


def test_at_k_above_one_entries_about_other_subjects_are_left_out_too(rt, bank_path):
    mem, ids, said = _gated(rt, bank_path)
    look = mem.lookup(FACTS[0]["prompt"], 4)   # names Zorbia only: its entry, none of the other places'
    assert [said[ids.index(e["id"])] for e, _ in look.found] == [{"zorbi"}] and look.gated == 3
    both = mem.lookup(FACTS[0]["prompt"] + " And what of Vuroresh?", len(ids))   # two subjects: their entries
    assert sorted(" ".join(sorted(said[ids.index(e["id"])])) for e, _ in both.found) == ["vuror", "zorbi"]
    assert both.gated == len(ids) - 2
    _set(bank_path, subj.pack({"other"}, dict(zip(ids, said))))          # an ungated task's entries all come
    assert len(rt.open_memory(bank_path).lookup(FACTS[0]["prompt"], 4).found) == 4


def test_a_malformed_record_is_refused_in_one_line(rt, bank_path):
    _set(bank_path, {"version": 1, "tasks": ["caps"], "entries": {"one": "zorbi"}})
    with pytest.raises(InduceKVError, match="subject gate is malformed"):
        rt.generate("What is the capital of Zorbia?", max_new_tokens=2, k=1, memory=rt.open_memory(bank_path))


class _Fixed:
    """A scorer whose every ask gets the answer's mean log-probability ``after(base)``."""

    def __init__(self, rt, after):
        self.rt, self.after = rt, after

    def logp_many(self, asks):
        for a in asks:
            yield self.after(self.base[a.prompt])


def _subject_fit(b, cands, scorer):
    """``fit_gate`` of the candidates alone (no old entries), with their subject words."""
    scorer.base = {c.prompt: c.base for c in cands}
    words = subj.subject_words([c.prompt for c in cands], [c.answer for c in cands])
    return fit_gate(b.geo, cands, np.zeros((0, b.geo.key_dim), np.float32), None, scorer,
                    np.random.default_rng(0), lambda x: x, pool_words=words)


@pytest.mark.parametrize("after,on", [(lambda b: b - 1.0, True),                 # harmed
                                      (lambda b: min(b + 1.0, np.log(0.1)), True),  # raised, still unlikely
                                      (lambda b: 0.0, False)])                   # made likely: helped
def test_the_gate_is_on_unless_asks_naming_another_subject_are_helped(rt, tmp_path, after, on):
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt.manifest, force=True, max_tokens=128) as b:
        p = absorb(rt, b, read_examples(task), "caps", n_anchors=2, dry_run=True)
        cands = p.candidates
        assert all(c.base < np.log(0.1) - 1 for c in cands)   # (the tiny model knows none of them)
        scorer = _Fixed(rt, after)
        fit = _subject_fit(b, cands, scorer)
        rep = fit.report["subject"]
        assert fit.subjects is on and rep["other_subject"] == len(cands) and rep["on"] is on
        assert rep["closed"] == (len(cands) if on else 0)
        # the margin gate is fitted on the asks the subject gate lets through
        assert fit.report["queries"] == len(cands) and len(fit.report["asks"]) == len(cands) - rep["closed"]
        assert fit.margin is None and fit.report["harmful"] == 0     # on: none left; off: none harmed
        no_words = fit_gate(b.geo, cands, np.zeros((0, b.geo.key_dim), np.float32), None, scorer,
                            np.random.default_rng(0), lambda x: x)
        assert not no_words.subjects and "subject" not in no_words.report
        harmed = after(0.0) < 0.0 and after(-50.0) < -50.0
        assert no_words.report["harmful"] == (len(cands) if harmed else 0)   # without words, the margin sees them all
        assert (no_words.margin is not None) is harmed


def test_a_learn_stores_the_words_of_a_gated_task_and_keeps_them_for_kept_entries(rt, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    other = tmp_path / "o.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"Code word number {i}?", "answer": f"Zup{i}"}) + "\n"
                             for i in range(9)))
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt.manifest, force=True, max_tokens=128) as b:
        p = absorb(rt, b, read_examples(task), "caps", n_anchors=2, dry_run=True)
        p.gate.subjects = True                              # as a fit that found other subjects harmed
        p.subject_words = subj.subject_words([c.prompt for c in p.candidates], [c.answer for c in p.candidates])
        ids = write(b, p)
        tasks, said = subj.unpack(b.catalog["extra"][SUBJECTS_KEY])
        assert tasks == {"caps"} and set(said) == set(ids)
        assert said[ids[0]] == p.subject_words[p.add[0]]
        q = absorb(rt, b, read_examples(other), "codes", n_anchors=2)   # a task whose prompts name no subject
        assert not q.gate.subjects
        tasks, after = subj.unpack(b.catalog["extra"][SUBJECTS_KEY])
        kept = {e.entry_id for e in b.snapshot().entries if e.task == "caps"}
        assert tasks == {"caps"} and set(after) == kept and all(after[e] == said[e] for e in kept)
        out = CliRunner().invoke(bank_cli, ["info", str(b.path), "--json"])
        assert json.loads(out.output)["subject_gates"] == {"caps": len(kept)}
        out = CliRunner().invoke(bank_cli, ["info", str(b.path)])
        assert f"caps ({len(kept)} entries with subject words)" in out.output
        with b.transaction() as tx:                         # a malformed record: the next learn writes a new one
            tx.set_extra(SUBJECTS_KEY, {"version": 1, "tasks": ["caps"], "entries": {"x": "y"}})
        absorb(rt, b, read_examples(other), "codes", n_anchors=2)
        assert subj.unpack(b.catalog["extra"].get(SUBJECTS_KEY)) == (set(), {})
        path = b.path
    out = CliRunner().invoke(bank_cli, ["info", str(path), "--json"])
    assert json.loads(out.output)["subject_gates"] == {}


class _FirstLikely(_Fixed):
    """Makes the answer likely (p = 1) for the first ``n`` asks scored, harms the rest."""

    def __init__(self, rt, n):
        super().__init__(rt, None)
        self.n = n

    def logp_many(self, asks):
        for i, a in enumerate(asks):
            yield 0.0 if i < self.n else self.base[a.prompt] - 1.0


@pytest.mark.parametrize("n,known,on", [(2, False, True),    # two others' entries happen to give the answer
                                        (3, False, False),   # three: the task's answers repeat across subjects
                                        (8, True, True)])    # the bare model gave those answers already
def test_the_gate_turns_off_when_three_other_subjects_entries_give_an_unknown_answer(rt, tmp_path, n, known, on):
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt.manifest, force=True, max_tokens=128) as b:
        cands = absorb(rt, b, read_examples(task), "caps", n_anchors=2, dry_run=True).candidates
        if known:
            for c in cands:
                c.base = float(np.log(0.9))
        fit = _subject_fit(b, cands, _FirstLikely(rt, n))
        rep = fit.report["subject"]
        assert rep["other_subject"] == len(cands) == 8
        assert rep["other_subject_helped"] == (0 if known else n)
        assert fit.subjects is on and rep["on"] is on


@pytest.mark.parametrize("on", [True, False])
def test_with_the_subject_gate_on_entries_are_valued_by_the_queries_naming_their_subject(rt, tmp_path, monkeypatch,
                                                                                           on):
    import sys
    mod = sys.modules["inducekv.learn.plan"]
    fit, real_served, seen = mod.fit_gate, mod.served, {}

    def fit_on(*a, **k):                                    # as a fit that found the gate on (or off)
        g = fit(*a, **k)
        g.subjects = on
        return g

    def spy(cands, offset=0, ok=None):
        seen["ok"] = ok
        return real_served(cands, offset, ok)

    monkeypatch.setattr(mod, "fit_gate", fit_on)
    monkeypatch.setattr(mod, "served", spy)
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt.manifest, force=True, max_tokens=128) as b:
        p = absorb(rt, b, FACTS, "caps", n_anchors=2, dry_run=True)
    if not on:
        assert seen["ok"] is None
        return
    ok, n = seen["ok"], len(FACTS)
    assert all(ok(j, i) == (i == j) for j in range(n) for i in range(n))   # eight places: each its own subject
    for ci in p.add:                                        # so each kept entry serves its own question only
        c = p.candidates[ci]
        assert c.value == pytest.approx(max(c.gain, 0.0))
