"""Kinds of entries (issue 19): source and tiered banks learned, served and budgeted."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from inducekv.core.errors import InduceKVError
from inducekv.learn import learn_task
from inducekv.learn import tiers
from inducekv.learn.cli import cli as learn_cli
from inducekv.learn.candidates import as_example as tiers_example
from inducekv.learn.tiers import (Budget, Costs, TierPlan, bank_closed_share, closed_share, mix, pick_sources,
                                  slot_share_for, source_share)
from inducekv.memory.bank import Bank
from inducekv.memory.cli import cli as bank_cli
from inducekv.memory.format import TIERS_KEY
from inducekv.memory.source import pack_source
from inducekv.runtime.api import Runtime
from inducekv.runtime.memory import TEMPLATES, Layout

CODES = [{"prompt": f"What is the code of item {i}?", "answer": f"code{i}"} for i in range(10)]


def test_budget_parses_multiples_and_milliseconds_and_refuses_the_rest():
    assert Budget.parse("1.3x") == Budget(factor=1.3) and Budget.parse("120ms") == Budget(ms=120.0)
    assert Budget.parse(None) is None and Budget.parse("none") is None
    assert Budget.parse("1.5x").limit_ms(80.0) == pytest.approx(120.0)
    for bad in ("fast", "1.3", "-2x", "0x", "12 s"):
        with pytest.raises(InduceKVError, match="not a budget"):
            Budget.parse(bad)


def test_source_share_is_what_the_mean_ttft_budget_allows():
    c = Costs(t0_ms=100.0, kv_ms=80.0, src_ms=140.0)
    assert source_share(c, None) == 1.0
    assert source_share(c, Budget(factor=0.7)) == 0.0                 # below kv alone: no source
    assert source_share(c, Budget(factor=1.1)) == pytest.approx(0.5)  # (110 - 80) / (140 - 80)
    assert source_share(c, Budget(ms=200.0)) == 1.0
    f = source_share(c, Budget(factor=1.1))
    assert (1 - f) * c.kv_ms + f * c.src_ms == pytest.approx(110.0)   # the mix's mean TTFT is the budget


def test_source_share_prices_the_queries_the_gate_sends_to_the_plain_prompt():
    c = Costs(t0_ms=100.0, kv_ms=80.0, src_ms=140.0, closed_ms=60.0)
    assert source_share(c, Budget(factor=1.1), closed=0.0) == pytest.approx(0.5)
    f = source_share(c, Budget(factor=1.1), closed=0.5)              # half the queries cost 60 ms
    assert f == pytest.approx(1.0)                                    # 0.5 * 60 + 0.5 * 140 = 100 <= 110
    f = source_share(c, Budget(factor=0.9), closed=0.5)
    assert 0.5 * 60 + 0.5 * ((1 - f) * 80 + f * 140) == pytest.approx(90.0)
    assert source_share(c, Budget(factor=0.5), closed=1.0) == 0.0    # even gated out it costs more
    assert source_share(c, Budget(factor=0.7), closed=1.0) == 1.0
    old = Costs(t0_ms=100.0, kv_ms=80.0, src_ms=140.0)                # costs stored before gates were priced
    assert source_share(old, Budget(factor=1.1), closed=0.9) == pytest.approx(0.5)


def test_closed_share_counts_the_leave_one_out_queries_under_the_margin():
    asks = [[0.001, -1.0], [0.004, 0.5], [0.0005, -0.2], [0.01, 2.0]]
    assert closed_share(None, asks) == 0.0                            # no margin gate: every query served
    assert closed_share(0.002, asks) == pytest.approx(0.5)
    assert closed_share(0.002, []) == 0.0
    # asks the subject gate closed count as gated out, with or without a margin gate
    assert closed_share(None, asks, closed=2) == pytest.approx(2 / (len(asks) + 2))
    assert closed_share(0.002, asks, closed=2) == pytest.approx((0.5 * len(asks) + 2) / (len(asks) + 2))
    assert closed_share(None, [], closed=3) == 1.0
    assert bank_closed_share({"a": 0.5, "b": 1.0}, ["a", "b", "c"]) == pytest.approx(0.5)
    assert bank_closed_share({}, []) == 0.0


@pytest.mark.parametrize("share,slots,kv_fit,old_kv,new,old_src", [
    (0.0, 50, 8, 0, 100, 0), (1.0, 50, 8, 0, 100, 0), (1.0, 50, 8, 0, 20, 0), (0.5, 50, 8, 0, 100, 0),
    (0.75, 50, 8, 3, 100, 4), (0.75, 20, 8, 0, 100, 0), (0.9, 200, 8, 2, 5, 3), (0.5, 50, 0, 0, 100, 0),
    (0.57, 25, 11, 0, 12, 0), (0.3, 40, 10, 6, 12, 9)])
def test_mix_keeps_the_most_examples_within_slots_pages_and_share(share, slots, kv_fit, old_kv, new, old_src):
    n_kv, n_src = mix(share, slots, kv_fit, old_kv, new, old_src)

    def ok(a, b):   # a kv and b source entries: feasible?
        new_kv = max(0, a - old_kv)
        return (a <= min(kv_fit, old_kv + new) and 0 <= b <= new - new_kv + old_src and a + b <= slots
                and (a + b == 0 or b <= share * (a + b) + 1e-9))

    feasible = [(a, b) for a in range(kv_fit + 1) for b in range(new + old_src + 1) if ok(a, b)]
    assert ok(n_kv, n_src)
    best = max(a + b for a, b in feasible)
    assert n_kv + n_src == best          # the most examples kept, each once
    assert n_src == max(b for a, b in feasible if a + b == best)   # then the most at full fidelity


def test_pick_sources_follows_the_mix():
    rng = np.random.default_rng(0)
    # 5 kv of which 3 are old kv: at most 8 of the 10 new examples may be source (2 must stay for kv)
    for _ in range(20):
        new, evict = pick_sources(list(range(10)), [70, 71, 72], n_kv=5, n_src=9, old_kv=3, rng=rng)
        assert len(new) + 3 - len(evict) == 9 and len(new) <= 8 and set(evict) <= {70, 71, 72}
    # no room for all: the draw is uniform over new and old together (a reservoir), not newest first
    olds = sum(3 - len(pick_sources(list(range(10)), [70, 71, 72], n_kv=0, n_src=4, old_kv=0, rng=rng)[1])
               for _ in range(400))
    assert 0.2 < olds / (400 * 4) < 0.26          # 3 of 13 are old: 0.23 of the draw
    new, evict = pick_sources(list(range(4)), [70, 71], n_kv=4, n_src=2, old_kv=0, rng=rng)
    assert new == [] and evict == []          # all new ones are kv; the old sources stay


def test_slot_share_fills_slots_and_pages_together():
    assert slot_share_for(1.0, 3000, 3000, 60000) == tiers.SOURCE_SLOT_SHARE
    s = slot_share_for(0.5, 3000, 3000, 63000)
    assert s == pytest.approx(3000 / (0.5 * 3000 + 0.5 * 63000))
    assert slot_share_for(1.0, 3000, 12000, 60000) == pytest.approx(0.25)   # an image takes a page per example


def test_one_pass_source_prefill_is_the_kv_entry_it_replaces(rt):
    """k=1: the source entry's tokens prefilled with the query after the shared prefix give the
    same logits as its K/V encoded on its own and injected (what a kv entry of full precision is)."""
    lay = Layout(rt, TEMPLATES["facts"], "rerotate")
    buf = pack_source("What is the code of item 3?", "code3")
    q = lay.query_ids("Which code does item 3 have?")
    ids, feats = lay.source_ids(buf)
    assert feats is None
    joint, _ = rt.decoder.forward(ids + q, lay.prefix_cache, logits_from=len(ids + q) - 1)
    cache, pos, masks = lay.assemble_mixed([lay.encode_source(buf)], "fp16")
    assert masks is None and pos == lay.p0 + len(ids)
    sep, _ = rt.decoder.forward(q, cache, positions=np.arange(pos, pos + len(q)), logits_from=len(q) - 1)
    np.testing.assert_allclose(joint[-1], sep[-1], atol=2e-4, rtol=1e-4)


def test_a_source_bank_keeps_every_example_and_serves_them_re_encoded(rt, device_bundle, tmp_path):
    bank = tmp_path / "src.ikv"
    res = learn_task(rt, bank, CODES, name="codes", budget=1 << 20, kinds="source", n_anchors=2)
    assert res.sources_added == res.added == len(CODES) and res.tiers["kinds"] == "source"
    with Bank.open(bank) as b:
        assert b.usage()["source_entries"] == len(CODES) and b.geo.version == 3
        assert {e.kind for e in b.entries()} == {"source"}
    out = CliRunner().invoke(bank_cli, ["info", str(bank), "--json"])
    info = json.loads(out.output)
    assert info["source_entries"] == len(CODES) and info["tiers"]["kinds"] == "source"
    assert "source" in CliRunner().invoke(bank_cli, ["list", str(bank)]).output
    assert CliRunner().invoke(bank_cli, ["verify", str(bank)]).exit_code == 0
    serve = Runtime.open(device_bundle, memory=bank)
    r = serve.generate(CODES[4]["prompt"], max_new_tokens=2, k=1)
    if r.entries:   # the tiny model's gate may close; when an entry comes, it is the source re-encoded
        assert r.entries[0]["kind"] == "source" and r.timings.source_ms > 0
    r4 = serve.generate(CODES[4]["prompt"], max_new_tokens=2, k=3, use_memory=True)
    assert all(e["kind"] == "source" for e in r4.entries)


def test_a_tiered_bank_mixes_kinds_within_the_budget_it_measured(rt, tmp_path, monkeypatch):
    """With the device's costs fixed, the stored mix keeps the share the budget allows."""
    fixed = Costs(t0_ms=10.0, kv_ms=8.0, src_ms=14.0)            # 1.0x -> share (10 - 8) / (14 - 8) = 1/3
    monkeypatch.setattr(tiers, "estimate", lambda *a, **k: (fixed, 12.0))
    monkeypatch.setattr(tiers, "measure", lambda *a, **k: fixed)
    checked = []

    def served(rt_, path, examples, budget, seed=0, **priced):   # the serve check after the commit (tested below)
        checked.append(str(budget))
        return {"prompts": 4, "t0_ms": 10.0, "mean_ms": 9.5, "ratio": 0.95, "by_kind": {}, "limit_ms": 10.0,
                "within": True, "costs": fixed}

    monkeypatch.setattr(tiers, "served", served)
    bank = tmp_path / "tiered.ikv"
    res = learn_task(rt, bank, CODES, name="codes", budget=1 << 20, kinds="tiered", ttft_budget="1.0x", n_anchors=2,
                     scheme="int8", compact="none", strategy="full")   # full: the tiny model's gains are noise
    assert res.tiers["share"] == pytest.approx(1 / 3, abs=1e-3) and res.tiers["ttft_budget"] == "1x"
    assert res.tiers["costs_ms"] == {"t0_ms": 10.0, "kv_ms": 8.0, "src_ms": 14.0}
    assert checked == ["1x"] and res.tiers["costs_from"] == "served" and res.tiers["served"]["within"] is True
    with Bank.open(bank) as b:
        u = b.usage()
        assert u["entries"] == res.added > 0
        assert u["source_entries"] <= (1 / 3) * u["entries"] + 1e-9
        assert b.catalog["extra"][TIERS_KEY]["max_source"] == 1
    # a second task where everything fits: nothing is evicted, the share still holds
    more = [{"prompt": f"What is the tag of box {i}?", "answer": f"tag{i}"} for i in range(10)]
    res_b = learn_task(rt, bank, more, name="tags", n_anchors=2, strategy="full")
    with Bank.open(bank) as b:
        u = b.usage()
        assert res_b.evicted == 0 and u["entries"] == res.added + res_b.added
        assert u["source_entries"] <= (1 / 3) * u["entries"] + 1e-9
    # a budget below the kv cost keeps no source entry at all, and the runtime re-encodes none
    res2 = learn_task(rt, bank, [{"prompt": f"Where is town {i}?", "answer": f"hill{i}"} for i in range(6)],
                      name="towns", ttft_budget="0.5x", n_anchors=1)
    assert res2.tiers["share"] == 0.0 and res2.tiers["max_source"] == 0
    with Bank.open(bank) as b:
        assert b.usage()["source_entries"] == 0


def test_the_serve_check_times_the_bank_as_served_and_the_next_learn_plans_with_it(rt, tmp_path, monkeypatch):
    fixed = Costs(t0_ms=10.0, kv_ms=8.0, src_ms=14.0)
    monkeypatch.setattr(tiers, "estimate", lambda *a, **k: (fixed, 12.0))
    monkeypatch.setattr(tiers, "measure", lambda *a, **k: fixed)
    bank = tmp_path / "tiered.ikv"
    learn_task(rt, bank, CODES, name="codes", budget=1 << 20, kinds="tiered", ttft_budget="1.0x", n_anchors=2,
               scheme="int8", compact="none", gated=False)
    with Bank.open(bank, writable=True) as b:
        got = tiers.served(rt, b.path, [tiers_example(e) for e in CODES], tiers.Budget.parse("1.5x"), n=6)
        assert got["prompts"] == 6 == sum(v["n"] for v in got["by_kind"].values())
        assert set(got["by_kind"]) <= {"kv", "source", "none"}
        assert got["ratio"] == pytest.approx(got["mean_ms"] / got["t0_ms"], rel=0.05)   # (reported rounded to 0.01 ms)
        assert got["limit_ms"] == pytest.approx(1.5 * got["t0_ms"], abs=0.02)
        if abs(got["mean_ms"] - got["limit_ms"]) > 0.05:
            assert got["within"] == (got["mean_ms"] <= got["limit_ms"])
        # the task's own prompts always pass the gate: the check prices the planner's gated-out share
        half = tiers.served(rt, b.path, [tiers_example(e) for e in CODES], tiers.Budget.parse("1.5x"), n=6,
                            gated_out=0.5, closed_ms=1.0)
        none = half["by_kind"].get("none", {"n": 0})
        closed = none["median_ms"] if none["n"] >= 2 else 1.0
        assert half["gated_out"] == 0.5 and half["closed_ms"] == pytest.approx(closed, abs=0.01)
        assert half["priced_ms"] == pytest.approx(0.5 * closed + 0.5 * half["mean_ms"], abs=0.02)
        if abs(half["priced_ms"] - half["limit_ms"]) > 0.05:
            assert half["within"] == (half["priced_ms"] <= half["limit_ms"])
        assert "priced_ms" not in got                      # nothing gated out: the plain mean is the check
        # served costs replace the planned ones (a commit of their own), and the next learn plans with them
        slow = Costs(t0_ms=10.0, kv_ms=9.0, src_ms=11.0)          # 1.0x -> share (10 - 9) / (11 - 9) = 1/2
        monkeypatch.setattr(tiers, "served", lambda *a, **k: {**got, "costs": slow})
        plan = TierPlan([], [], 1 / 3, "1x", fixed, 1)
        out = tiers.serve_check(rt, b, plan, [tiers_example(e) for e in CODES])
        assert out["costs_from"] == "served" and out["costs_ms"]["src_ms"] == 11.0
    monkeypatch.setattr(tiers, "measure", lambda *a, **k: pytest.fail("the stored served costs are used"))
    more = [{"prompt": f"What is the tag of box {i}?", "answer": f"tag{i}"} for i in range(10)]
    res = learn_task(rt, bank, more, name="tags", n_anchors=2)
    assert res.tiers["share"] == pytest.approx(1 / 2, abs=1e-3)


def test_cli_kinds_and_budget_errors_are_one_line(device_bundle, tmp_path):
    task = tmp_path / "codes.jsonl"
    task.write_text("".join(json.dumps(e) + "\n" for e in CODES), encoding="utf-8")
    bank = tmp_path / "b.ikv"
    base = ["--bundle", str(device_bundle), "--memory", str(bank), "--task", str(task), "--budget", "1MiB", "--quiet"]
    out = CliRunner().invoke(learn_cli, base + ["--ttft-budget", "1.2x"])
    assert out.exit_code == 2 and "needs --kinds tiered" in out.output and not bank.exists()
    out = CliRunner().invoke(learn_cli, base + ["--kinds", "tiered", "--ttft-budget", "soon"])
    assert out.exit_code == 2 and "not a budget" in out.output and not bank.exists()
    out = CliRunner().invoke(learn_cli, base + ["--kinds", "tiered", "--ttft-budget", "1.2x", "--dry-run"])
    assert out.exit_code == 0 and "kv +" in out.output and not bank.exists(), out.output
    out = CliRunner().invoke(learn_cli, base + ["--kinds", "source"])
    assert out.exit_code == 0, out.output
    assert "source entries added" in out.output


def test_ikv_bank_create_makes_source_and_tiered_banks_that_ikv_learn_fills(device_bundle, tmp_path):
    task = tmp_path / "codes.jsonl"
    task.write_text("".join(json.dumps(e) + "\n" for e in CODES), encoding="utf-8")
    for kinds in ("source", "tiered"):
        bank = tmp_path / f"{kinds}.ikv"
        out = CliRunner().invoke(bank_cli, ["create", str(bank), "--bundle", str(device_bundle), "--budget", "1MiB",
                                            "--kinds", kinds, "--json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)["kinds"] == kinds
        with Bank.open(bank) as b:
            assert b.geo.version == 3 and b.geo.sources and b.catalog["extra"][TIERS_KEY]["kinds"] == kinds
        args = ["--bundle", str(device_bundle), "--memory", str(bank), "--task", str(task), "--quiet", "--json"]
        out = CliRunner().invoke(learn_cli, args)
        assert out.exit_code == 0, out.output
        res = json.loads(out.output)
        assert res["tiers"]["kinds"] == kinds and res["added"] > 0
        if kinds == "source":
            assert res["sources_added"] == res["added"] == len(CODES)
    out = CliRunner().invoke(bank_cli, ["create", str(tmp_path / "x.ikv"), "--bundle", str(device_bundle), "--budget",
                                        "1MiB", "--slot-share", "0.3"])
    assert out.exit_code != 0 and "add --kinds tiered" in out.output and not (tmp_path / "x.ikv").exists()
    with Bank.open(tmp_path / "source.ikv") as b:
        assert {e.kind for e in b.entries()} == {"source"}


def test_resized_share_only_when_the_first_plan_moves_the_split():
    sizing = {"ttft_budget": "1x", "slot_bytes": 3000, "source_bytes": 3000, "kv_bytes": 60000,
              "slot_share": round(slot_share_for(1 / 3, 3000, 3000, 60000), 4)}
    assert tiers.resized_share(sizing, 1 / 3) is None                                  # as sized
    assert tiers.resized_share(sizing, 0.5) == pytest.approx(slot_share_for(0.5, 3000, 3000, 60000))
    assert tiers.resized_share({**sizing, "ttft_budget": None}, 0.5) is None           # no budget: sized for all source
    assert tiers.resized_share({k: v for k, v in sizing.items() if k != "kv_bytes"}, 0.5) is None   # an older report


def test_a_new_tiered_bank_is_split_for_the_queries_its_first_gate_sends_away(rt, tmp_path, monkeypatch):
    """Sized before any gate exists, then split again once the first plan prices the gated-out
    queries: half gated out at 9 ms lets half the stored examples be source (1/3 without), so
    the bank gets more slots than one sized as if no query were gated out."""
    fixed = Costs(t0_ms=10.0, kv_ms=8.0, src_ms=14.0, closed_ms=9.0)
    monkeypatch.setattr(tiers, "estimate", lambda *a, **k: (fixed, 12.0))
    monkeypatch.setattr(tiers, "measure", lambda *a, **k: fixed)
    monkeypatch.setattr(tiers, "served", lambda *a, **k: {"prompts": 1, "t0_ms": 10.0, "mean_ms": 9.0, "ratio": 0.9,
                                                          "by_kind": {}, "limit_ms": 10.0, "within": True,
                                                          "costs": fixed})
    slots = {}
    for q in (0.0, 0.5):
        monkeypatch.setattr(tiers, "closed_share", lambda margin, asks, closed=0, q=q: q)
        bank = tmp_path / f"q{q}.ikv"
        res = learn_task(rt, bank, CODES, name="codes", budget=1 << 20, kinds="tiered", ttft_budget="1.0x",
                         n_anchors=2, scheme="int8", compact="none")
        assert res.tiers["share"] == pytest.approx(1 / 3 if q == 0 else 0.5, abs=1e-3)
        assert ("resplit_plan_s" in res.timings_s) == (q > 0)     # the first plan's time is reported too
        with Bank.open(bank) as b:
            slots[q] = b.geo.slots
            assert b.usage()["entries"] == res.added > 0
    assert slots[0.5] > slots[0.0]


def test_a_text_tasks_subject_gate_closures_are_not_priced_as_gated_out(rt, tmp_path, monkeypatch):
    """A left-out fact's question names a subject no kept entry has, so the subject gate closes it;
    a served question about a stored fact names its own. Priced, those closures made text banks keep
    every example as source at ~2.1x under a 1.6x budget (benchmarks/promote.py, 2026-12-03)."""
    fixed = Costs(t0_ms=10.0, kv_ms=14.0, src_ms=20.0, closed_ms=11.0)
    monkeypatch.setattr(tiers, "estimate", lambda *a, **k: (fixed, 12.0))
    monkeypatch.setattr(tiers, "measure", lambda *a, **k: fixed)
    monkeypatch.setattr(tiers, "served", lambda *a, **k: {"prompts": 0, "by_kind": {}, "costs": None})
    facts = [{"prompt": f"What is the capital of Vex{c}land?", "answer": f"Mor{c}ow"} for c in "abcdefghij"]
    res = learn_task(rt, tmp_path / "t.ikv", facts, name="capitals", budget=1 << 20, kinds="tiered",
                     ttft_budget="1.6x", n_anchors=1, scheme="int8", compact="none")
    assert (res.gate.get("subject") or {}).get("closed", 0) > 0      # the subject gate did close left-out asks
    assert res.tiers["closed"]["capitals"] == 0.0 and res.tiers["share"] == pytest.approx(1 / 3, abs=1e-3)
