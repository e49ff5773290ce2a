"""Promotion on use (issue 19): the uses record, the runtime's counts, kv copies added and removed."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from inducekv.core.errors import InduceKVError
from inducekv.learn import learn_task
from inducekv.learn import promote as promote_mod
from inducekv.learn.cli import cli as learn_cli
from inducekv.learn.promote import promote
from inducekv.learn.tiers import Costs
from inducekv.memory import uses as uses_
from inducekv.memory.bank import Bank
from inducekv.memory.cli import cli as bank_cli
from inducekv.memory.format import TIERS_KEY, TWINS_KEY
from inducekv.memory.verify import verify
from inducekv.runtime.api import Runtime
from inducekv.runtime.eval_cli import cli as eval_cli

CODES = [{"prompt": f"What is the code of item {i}?", "answer": f"code{i}"} for i in range(10)]


def _hash(i: int) -> bytes:
    return bytes([i]) * 16


def test_the_uses_record_round_trips_adds_up_and_refuses_bad_input(tmp_path):
    a = uses_.Uses(10, 2, {_hash(1): 5, _hash(2): 3}, {_hash(1): 6, _hash(2): 3})
    p = tmp_path / "u.json"
    uses_.write(p, a)
    assert uses_.read(p) == a and [x.name for x in tmp_path.iterdir()] == ["u.json"]   # no temporary file left
    total = uses_.add_to(p, uses_.Uses(4, 1, {_hash(2): 2, _hash(3): 1}, {_hash(3): 1}))
    assert total.queries == 14 and total.gated_out == 3 and total.top == {_hash(1): 5, _hash(2): 5, _hash(3): 1}
    assert uses_.read(p) == total
    good = a.as_dict()
    for bad, msg in [({**good, "format": "x"}, "not an inducekv uses record"), ({**good, "version": 9}, "version 9"),
                     ({**good, "queries": -1}, "non-negative integer"), ({**good, "queries": 1.5}, "non-negative"),
                     ({**good, "top": {"zz": 1}}, "not an example hash"), ({**good, "top": []}, "must be an object"),
                     ({**good, "entries": {"ab" * 16: True}}, "non-negative"),
                     ({**good, "gated_out": 11}, "more than queries")]:
        p.write_text(json.dumps(bad))
        with pytest.raises(InduceKVError, match=msg):
            uses_.read(p)
    p.write_text("{not json")
    with pytest.raises(InduceKVError, match="not a JSON uses record"):
        uses_.read(p)
    with pytest.raises(InduceKVError, match="cannot read"):
        uses_.read(tmp_path / "absent.json")


def test_the_counter_counts_each_query_once_and_hands_its_counts_over_once():
    c = uses_.Counter()
    c.record([_hash(1), _hash(2)], False)
    c.record([_hash(1)], False)
    c.record([], True)
    c.record([], False)          # nothing retrieved (an empty bank): not gated out
    got = c.take()
    assert (got.queries, got.gated_out) == (4, 1)
    assert got.top == {_hash(1): 2} and got.entries == {_hash(1): 2, _hash(2): 1}
    assert c.take() == uses_.Uses()
    c.give_back(got)
    assert c.peek() == got


def _source_bank(rt, tmp_path, device_bundle, slot_share: float = 0.3):
    """A tiered bank without a latency budget (every example kept as source) with room for kv copies."""
    bank = tmp_path / "t.ikv"
    out = CliRunner().invoke(bank_cli, ["create", str(bank), "--bundle", str(device_bundle), "--budget", "1MiB",
                                        "--kinds", "tiered", "--slot-share", str(slot_share)])
    assert out.exit_code == 0, out.output
    res = learn_task(rt, bank, CODES, name="codes", n_anchors=2, gated=False, scheme="int8", compact="none")
    assert res.sources_added == res.added == len(CODES)
    return bank


def _by_hash(bank) -> dict:
    with Bank.open(bank) as b:
        out = {}
        for e in b.entries():
            out.setdefault(e.example_hash, []).append(e)
        return out


def test_serving_counts_what_each_query_injected_and_saves_it(rt, device_bundle, tmp_path):
    bank = _source_bank(rt, tmp_path, device_bundle)
    serve = Runtime.open(device_bundle, memory=bank)
    for i in (3, 3, 5):
        serve.generate(CODES[i]["prompt"], max_new_tokens=1, k=1)
    got = serve.memory.uses()
    assert got.queries == 3 and sum(got.top.values()) == 3
    assert all(len(h) == 16 for h in got.top) and set(got.top) <= set(_by_hash(bank))
    path = tmp_path / "uses.json"
    assert serve.memory.save_uses(path) == got
    serve.generate(CODES[1]["prompt"], max_new_tokens=1, k=1)
    assert serve.memory.save_uses(path).queries == 4         # added to the file, each query once
    assert serve.memory.uses().queries == 0
    (tmp_path / "bad.json").write_text("[]")
    serve.generate(CODES[1]["prompt"], max_new_tokens=1, k=1)
    with pytest.raises(InduceKVError, match="not an inducekv uses record"):
        serve.memory.save_uses(tmp_path / "bad.json")
    assert serve.memory.uses().queries == 1                  # not lost: counted again


def test_promotion_copies_the_most_used_sources_to_kv_and_serves_the_copies(rt, device_bundle, tmp_path):
    bank = _source_bank(rt, tmp_path, device_bundle)
    hashes = {e.example_hash: e for es in _by_hash(bank).values() for e in es}
    prompts = {}
    with Bank.open(bank) as b:
        from inducekv.memory.source import unpack_source
        for e in b.entries():
            prompts[e.example_hash] = unpack_source(b.read_payload(e.slot, e.entry_id)[0]).prompt
    order = sorted(hashes, key=lambda h: h.hex())
    hot, warm, cold = order[:2], order[2], order[3]
    rec = uses_.Uses(20, 2, {hot[0]: 9, hot[1]: 6, warm: 2, cold: 1}, {})

    dry = promote(rt, bank, rec, dry_run=True)
    assert dry.promoted == 3 and dry.copies == 3 and dry.commits == 0 and dry.kv_share_before == 0.0
    assert sum(len(v) for v in _by_hash(bank).values()) == len(CODES)      # nothing written
    res = promote(rt, bank, rec)                                            # no budget: every copy that fits
    assert (res.promoted, res.demoted, res.copies, res.sources) == (3, 0, 3, len(CODES))
    assert res.kv_share == pytest.approx(17 / 18, abs=1e-4) and res.mean_ms_after is None   # no costs, no budget: not priced
    now = _by_hash(bank)
    for h in (*hot, warm):
        assert sorted(e.kind for e in now[h]) == ["kv", "source"]
        assert len({e.task for e in now[h]}) == 1
    assert [e.kind for e in now[cold]] == ["source"]                        # used once: below --min-uses 2
    with Bank.open(bank) as b:
        twins = b.catalog["extra"][TWINS_KEY]
        snap = b.snapshot()
        for h in hot:
            src, kv = sorted(now[h], key=lambda e: e.kind, reverse=True)
            assert twins[str(src.entry_id)] == twins[str(kv.entry_id)]      # the gate's margin skips the copy
            rows = {e.entry_id: i for i, e in enumerate(snap.entries)}
            assert (snap.keys[rows[src.entry_id]] == snap.keys[rows[kv.entry_id]]).all()
        assert b.catalog["extra"][TIERS_KEY]["promotion"]["copies"] == 3
    assert verify(bank)["ok"]
    info = CliRunner().invoke(bank_cli, ["info", str(bank), "--json"])
    assert json.loads(info.output)["kv_copies"] == 3
    assert "3 of the kv are copies" in CliRunner().invoke(bank_cli, ["info", str(bank)]).output
    serve = Runtime.open(device_bundle, memory=bank)
    r = serve.generate(prompts[hot[0]], max_new_tokens=1, k=3)
    assert [e["example"] for e in r.entries].count(hot[0].hex()) <= 1       # one entry per example
    got = {e["example"]: e["kind"] for e in r.entries}
    if hot[0].hex() in got:
        assert got[hot[0].hex()] == "kv"

    # use moves on: the copies of examples no longer used go, the newly hot get theirs
    rec2 = uses_.Uses(12, 0, {cold: 7, hot[0]: 5}, {})
    res2 = promote(rt, bank, rec2)
    assert (res2.promoted, res2.demoted, res2.copies) == (1, 2, 2)
    now = _by_hash(bank)
    assert sorted(e.kind for e in now[cold]) == ["kv", "source"] and [e.kind for e in now[hot[1]]] == ["source"]
    assert sum(1 for es in now.values() for e in es if e.kind == "source") == len(CODES)   # no example lost
    with Bank.open(bank) as b:
        live = {str(e.entry_id) for e in b.entries()}
        assert set(b.catalog["extra"][TWINS_KEY]) <= live
    assert verify(bank)["ok"]


def test_with_a_budget_it_copies_no_more_than_the_budget_needs(rt, device_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(promote_mod, "_serve_check", lambda *a, **k: {"prompts": 0, "costs": None})   # below
    bank = _source_bank(rt, tmp_path, device_bundle)
    with Bank.open(bank, writable=True) as b, b.transaction() as tx:   # this device's costs, as a learn stores them
        tx.set_extra(TIERS_KEY, {**b.catalog["extra"][TIERS_KEY],
                                 "costs_ms": {"t0_ms": 10.0, "kv_ms": 15.0, "src_ms": 20.0, "closed_ms": 12.0}})
    order = sorted(_by_hash(bank), key=lambda h: h.hex())
    rec = uses_.Uses(20, 0, {order[0]: 10, order[1]: 6, order[2]: 4}, {})
    # all source: 20 ms; the first copy: (10 * 15 + 10 * 20) / 20 = 17.5 ms; two: 16.0; three: 15.0
    res = promote(rt, bank, rec, ttft_budget="1.75x")
    assert res.copies == 1 and res.within and res.mean_ms_before == 20.0 and res.mean_ms_after == 17.5
    res = promote(rt, bank, rec, ttft_budget="1.6x")
    assert (res.promoted, res.demoted, res.copies) == (1, 0, 2) and res.mean_ms_after == 16.0
    res = promote(rt, bank, rec, ttft_budget="1.4x")               # unreachable: every copy that fits, reported over
    assert res.copies == 3 and res.within is False and res.limit_ms == 14.0
    with Bank.open(bank) as b:
        assert b.catalog["extra"][TIERS_KEY].get("ttft_budget") is None    # the bank's own budget is left alone


def test_the_serve_check_reprices_with_what_serving_costs_and_copies_more(rt, device_bundle, tmp_path, monkeypatch):
    bank = _source_bank(rt, tmp_path, device_bundle)
    with Bank.open(bank, writable=True) as b, b.transaction() as tx:
        tx.set_extra(TIERS_KEY, {**b.catalog["extra"][TIERS_KEY],
                                 "costs_ms": {"t0_ms": 10.0, "kv_ms": 15.0, "src_ms": 20.0, "closed_ms": 12.0}})
    order = sorted(_by_hash(bank), key=lambda h: h.hex())
    rec = uses_.Uses(20, 0, {order[0]: 10, order[1]: 6, order[2]: 4}, {})
    checked = []

    def served(rt_, path, examples, budget, seed=0, n=10, **kw):   # serving turns out slower for kv than planned
        checked.append([e.prompt for e in examples])
        return {"prompts": n, "ratio": 1.9, "costs": Costs(10.0, 16.0, 20.0, None)}

    monkeypatch.setattr(promote_mod.tiers_, "served", served)
    res = promote(rt, bank, rec, ttft_budget="1.75x")
    # planned: one copy, 17.5 ms; served kv 16 ms: one copy (10*16 + 10*20) / 20 = 18 > 17.5, two 16.8: two copies
    assert res.copies == 2 and res.promoted == 2 and res.mean_ms_after == pytest.approx(16.8)
    assert res.costs_ms == {"t0_ms": 10.0, "kv_ms": 16.0, "src_ms": 20.0, "closed_ms": 12.0}
    assert res.mean_ms_before == 20.0 and res.served["ratio"] == 1.9 and len(checked) == 1
    assert len(checked[0]) == 3 + 5       # the one copied example (three times) and the five most used of the rest
    with Bank.open(bank) as b:
        assert b.catalog["extra"][TIERS_KEY]["costs_from"] == "served"


def test_a_bank_without_costs_times_them_when_a_budget_is_given(rt, device_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(promote_mod, "_serve_check", lambda *a, **k: {"prompts": 0, "costs": None})
    bank = _source_bank(rt, tmp_path, device_bundle)
    order = sorted(_by_hash(bank), key=lambda h: h.hex())
    seen = []

    def measure(rt_, layout, cands, geo, key_scale, k=1):
        seen.append(len(cands))
        return Costs(10.0, 12.0, 30.0, 11.0)

    monkeypatch.setattr(promote_mod.tiers_, "measure", measure)
    res = promote(rt, bank, uses_.Uses(10, 0, {order[0]: 10}, {}), ttft_budget="1.5x")
    assert seen and res.costs_ms == {"t0_ms": 10.0, "kv_ms": 12.0, "src_ms": 30.0, "closed_ms": 11.0}
    assert res.copies == 1 and res.mean_ms_after == 12.0
    with Bank.open(bank) as b:
        assert b.catalog["extra"][TIERS_KEY]["costs_from"] == "promote"


def test_a_failed_write_leaves_the_bank_as_it_was(rt, device_bundle, tmp_path, monkeypatch):
    bank = _source_bank(rt, tmp_path, device_bundle)
    before = bank.read_bytes()
    order = sorted(_by_hash(bank), key=lambda h: h.hex())
    from inducekv.memory import txn

    def boom(self, entry, slot=None):
        raise OSError("disk full")

    monkeypatch.setattr(txn.Transaction, "add", boom)
    with pytest.raises(OSError):
        promote(rt, bank, uses_.Uses(5, 0, {order[0]: 5}, {}))
    monkeypatch.undo()
    assert verify(bank)["ok"]
    with Bank.open(bank) as b:
        assert {e.kind for e in b.entries()} == {"source"} and len(b.entries()) == len(CODES)
    assert len(bank.read_bytes()) == len(before)


def test_promotion_errors_are_one_line(rt, device_bundle, tmp_path):
    kv = tmp_path / "kv.ikv"
    learn_task(rt, kv, CODES[:4], name="codes", budget=1 << 20, n_anchors=1, gated=False, scheme="int8", compact="none")
    with pytest.raises(InduceKVError, match="holds kv entries only"):
        promote(rt, kv, uses_.Uses())
    with pytest.raises(InduceKVError, match="does not exist"):
        promote(rt, tmp_path / "none.ikv", uses_.Uses())
    with pytest.raises(InduceKVError, match="not a budget"):
        promote(rt, kv, uses_.Uses(), ttft_budget="soon")
    task = tmp_path / "codes.jsonl"
    task.write_text("".join(json.dumps(e) + "\n" for e in CODES), encoding="utf-8")
    uses_path = tmp_path / "uses.json"
    uses_.write(uses_path, uses_.Uses())
    base = ["--bundle", str(device_bundle), "--memory", str(kv), "--quiet"]
    out = CliRunner().invoke(learn_cli, base + ["--task", str(task), "--promote", str(uses_path)])
    assert out.exit_code == 2 and "not both" in out.output
    out = CliRunner().invoke(learn_cli, base)
    assert out.exit_code == 2 and "--promote" in out.output
    out = CliRunner().invoke(learn_cli, base + ["--promote", str(uses_path)])
    assert out.exit_code == 2 and "holds kv entries only" in out.output and len(out.output.strip().splitlines()) == 1
    out = CliRunner().invoke(learn_cli, base + ["--promote", str(tmp_path / "absent.json")])
    assert out.exit_code == 2 and "cannot read the uses record" in out.output


def test_ikv_eval_records_uses_and_ikv_learn_promotes_with_them(rt, device_bundle, tmp_path):
    bank = _source_bank(rt, tmp_path, device_bundle)
    task = tmp_path / "codes.jsonl"
    task.write_text("".join(json.dumps(e) + "\n" for e in CODES[:3] * 3), encoding="utf-8")
    uses_path = tmp_path / "uses.json"
    args = ["--bundle", str(device_bundle), "--memory", str(bank), "--task", str(task), "--k", "1", "--quiet",
            "--max-new-tokens", "1", "--uses", str(uses_path)]
    out = CliRunner().invoke(eval_cli, args)
    assert out.exit_code == 0, out.output
    rec = uses_.read(uses_path)
    assert rec.queries == 9 and sum(rec.top.values()) + rec.gated_out == 9
    out = CliRunner().invoke(eval_cli, args[:-2] + ["--uses", str(uses_path)])
    assert uses_.read(uses_path).queries == 18
    out = CliRunner().invoke(eval_cli, [a for a in args if a not in ("--memory", str(bank))])
    assert out.exit_code == 2 and "pass --memory" in out.output
    out = CliRunner().invoke(learn_cli, ["--bundle", str(device_bundle), "--memory", str(bank), "--promote",
                                         str(uses_path), "--quiet", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["queries"] == 18 and res["copies"] == sum(1 for n in uses_.read(uses_path).top.values() if n >= 2)
    out = CliRunner().invoke(learn_cli, ["--bundle", str(device_bundle), "--memory", str(bank), "--promote",
                                         str(uses_path), "--quiet", "--dry-run"])
    assert out.exit_code == 0 and "promotion (would)" in out.output and "served as kv" in out.output


def test_a_learn_drops_the_kv_copies_and_keeps_their_sources(rt, device_bundle, tmp_path):
    bank = _source_bank(rt, tmp_path, device_bundle)
    order = sorted(_by_hash(bank), key=lambda h: h.hex())
    assert promote(rt, bank, uses_.Uses(6, 0, {order[0]: 3, order[1]: 3}, {})).copies == 2
    more = [{"prompt": f"What is the tag of box {i}?", "answer": f"tag{i}"} for i in range(4)]
    res = learn_task(rt, bank, more, name="tags", n_anchors=1, gated=False)
    assert res.evicted == 2 and res.evicted_per_task == {"codes": 2}
    now = _by_hash(bank)
    assert all([e.kind for e in now[h]] == ["source"] for h in order[:2])
    with Bank.open(bank) as b:
        assert sum(e.kind == "source" for e in b.entries()) == len(CODES) + len(more)
        assert set(b.catalog["extra"].get(TWINS_KEY, {})) <= {str(e.entry_id) for e in b.entries()}
    assert promote(rt, bank, uses_.Uses(6, 0, {order[0]: 3, order[1]: 3}, {})).promoted == 2   # the record still applies


def test_ikv_learn_sizes_a_new_tiered_bank_with_the_slot_share_asked(rt, device_bundle, tmp_path):
    bank = tmp_path / "s.ikv"
    res = learn_task(rt, bank, CODES, name="codes", budget=1 << 20, kinds="tiered", slot_share=0.3, n_anchors=1,
                     gated=False)
    assert res.sources_added == len(CODES)          # no budget: every example kept as source
    with Bank.open(bank) as b:
        g = b.geo
        assert g.slots * 2 * g.record_bytes == pytest.approx(0.3 * g.cap, rel=0.1)
    with pytest.raises(InduceKVError, match="add --kinds tiered"):
        learn_task(rt, tmp_path / "k.ikv", CODES, name="codes", budget=1 << 20, slot_share=0.3)
    with pytest.raises(InduceKVError, match="between 0.02 and 0.95"):
        learn_task(rt, tmp_path / "k.ikv", CODES, name="codes", budget=1 << 20, kinds="tiered", slot_share=1.5)
    assert not (tmp_path / "k.ikv").exists()


def test_ikv_run_records_uses_too(rt, device_bundle, tmp_path):
    from inducekv.runtime.cli import cli as run_cli

    bank = _source_bank(rt, tmp_path, device_bundle)
    uses_path = tmp_path / "uses.json"
    args = ["--bundle", str(device_bundle), "--memory", str(bank), "--k", "1", "--max-new-tokens", "1", "--quiet"]
    out = CliRunner().invoke(run_cli, args + ["--prompt", CODES[2]["prompt"], "--uses", str(uses_path)])
    assert out.exit_code == 0, out.output
    assert uses_.read(uses_path).queries == 1
    out = CliRunner().invoke(run_cli, args + ["--prompt", "hi", "--no-memory", "--uses", str(uses_path)])
    assert out.exit_code == 2 and "pass --memory" in out.output
    uses_path.write_text("{}")
    out = CliRunner().invoke(run_cli, args + ["--prompt", "hi", "--uses", str(uses_path)])
    assert out.exit_code == 2 and "not an inducekv uses record" in out.output and uses_path.read_text() == "{}"


def test_the_fidelity_check_leaves_out_copies_that_answer_worse_than_their_source(rt, device_bundle, tmp_path):
    bank = _source_bank(rt, tmp_path, device_bundle)
    order = sorted(_by_hash(bank), key=lambda h: h.hex())
    rec = uses_.Uses(12, 0, {order[0]: 4, order[1]: 4, order[2]: 4}, {})
    dry = promote(rt, bank, rec, dry_run=True)
    assert set(dry.fidelity) == {h.hex() for h in order[:3]} and dry.copies == 3
    drops = [dry.fidelity[h.hex()] for h in order[:3]]
    cut = (sorted(drops)[0] + sorted(drops)[1]) / 2   # between the two lowest: the lowest copy is left out
    res = promote(rt, bank, rec, dry_run=True, max_drop=-cut)
    assert res.copies == sum(d >= cut for d in drops) == 2
