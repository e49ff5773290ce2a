"""ikv-learn on toy pools and the tiny Llama: cap, anchors, calibration, kills."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from inducekv.learn import select as sel
from inducekv.memory.bank import Bank
from inducekv.learn import absorb, read_examples
from inducekv.learn.calibrate import fit_calibration, retrieval_loss
from inducekv.memory.verify import verify
from bankutil import kill_at_write, wait_or_kill
from inducekv.learn.commit import pending
from inducekv.runtime.api import Runtime
from inducekv.learn.cli import cli


def _pool(rng, n_old=10, n_new=10):
    n = n_old + n_new
    return sel.Pool(nbytes=rng.integers(1, 5, n).astype(float) * 1000, gain=rng.normal(1, 0.5, n),
                    retention=np.r_[rng.random(n_old), np.zeros(n_new)], keys=rng.standard_normal((n, 16)),
                    is_new=np.r_[np.zeros(n_old, bool), np.ones(n_new, bool)],
                    age=np.r_[np.arange(n_old, 0, -1), np.zeros(n_new)].astype(float))


@pytest.mark.parametrize("strategy", sel.STRATEGIES)
def test_selection_respects_both_budgets_exactly(strategy, rng):
    for trial in range(20):
        p = _pool(rng)
        budget, new_budget = int(rng.integers(3000, 30000)), int(rng.integers(0, 20000))
        chosen = sel.select(p, budget, new_budget, strategy, seed=trial)
        assert p.nbytes[chosen].sum() <= budget
        assert p.nbytes[chosen][p.is_new[chosen]].sum() <= new_budget
        assert len(set(chosen.tolist())) == len(chosen)


def test_greedy_prefers_value_per_byte_and_fifo_keeps_newest(rng):
    p = sel.Pool(nbytes=np.array([1000.0, 1000, 4000]), gain=np.array([1.0, 0.1, 2.0]), retention=np.zeros(3),
                 keys=rng.standard_normal((3, 8)), is_new=np.array([False, False, True]), age=np.array([2.0, 1, 0]))
    assert sel.select(p, 2000, 10000, "likelihood").tolist() == [0, 1]  # 1.0/1000 and 0.1/1000 beat 2.0/4000 ... and fit
    assert sel.select(p, 5000, 10000, "likelihood").tolist() == [0, 2]
    assert sel.select(p, 5000, 10000, "fifo").tolist() == [1, 2]  # newest first: the new item, then age 1
    no_cov = sel.Weights(cov=0.0)
    p = sel.Pool(nbytes=np.array([1000.0, 1000, 4000, 4000]), gain=np.array([0.4, 0.1, 2.0, 2.0]),
                 retention=np.zeros(4), keys=rng.standard_normal((4, 8)), is_new=np.ones(4, bool), age=np.zeros(4))
    assert sel.select(p, 4000, 10000, "full", no_cov).tolist() == [0, 1]          # per byte: two small ones
    assert sel.select(p, 4000, 10000, "no-per-byte", no_cov).tolist() == [2]      # per entry: the most valuable


def test_fill_keeps_entries_of_no_value_only_in_room_left_free(rng):
    """likelihood-fill: the greedy keeps what has value; the room it leaves is filled with old
    entries first (newest first), then new candidates by gain; a candidate that serves no query
    (outvoted) stays out, and nothing of no value takes room a valued entry needs."""
    # items: 0 old valued, 1 old worthless (age 2), 2 old worthless (age 1), 3 new valued, 4 new ~0, 5 new outvoted
    p = sel.Pool(nbytes=np.full(6, 1000.0), gain=np.array([1.0, 0.0, 0.0, 1.0, -0.1, 0.0]), retention=np.zeros(6),
                 keys=rng.standard_normal((6, 8)), is_new=np.array([False, False, False, True, True, True]),
                 age=np.array([3.0, 2, 1, 0, 0, 0]))
    assert sel.select(p, 6000, 6000, "likelihood").tolist() == [0, 3]
    assert sel.select(p, 6000, 6000, "likelihood-fill").tolist() == [0, 1, 2, 3, 4, 5]
    assert sel.select(p, 3000, 3000, "likelihood-fill").tolist() == [0, 2, 3]      # old, newest first
    assert sel.select(p, 2000, 2000, "likelihood-fill").tolist() == [0, 3]         # no room: the greedy's set
    assert sel.select(p, 6000, 6000, "likelihood-fill", max_items=3).tolist() == [0, 2, 3]
    # with the facility location: item 5 serves no query (value.contradicted) and is not filled in
    served = (np.array([0, 3, 4]), np.array([0, 3, 4]), np.array([1.0, 1.0, -0.1]), np.ones(3))
    q = dataclasses.replace(p, served=served)
    assert sel.select(q, 6000, 6000, "likelihood-fill").tolist() == [0, 1, 2, 3, 4]


def test_each_task_counts_its_gains_in_its_own_unit(rng):
    """Task 0's entries gain 10x task 1's (a made-up name vs a common word: the answer's
    surprisal bounds its gain, not how often it is copied). Full selection counts each task's
    gains in units of its own typical gain and splits the room evenly, as does the balanced
    trial; with one unit for all tasks (global-scale, before 2026-12) task 0 takes most."""
    task = np.r_[np.zeros(4, int), np.ones(4, int)]
    p = sel.Pool(nbytes=np.full(8, 1000.0), gain=np.r_[np.full(4, 5.0), np.full(4, 0.5)], retention=np.zeros(8),
                 keys=rng.standard_normal((8, 6)), is_new=np.ones(8, bool), age=np.zeros(8), task=task)
    no_cov = sel.Weights(cov=0.0)
    full = sel.select(p, 4000, 4000, "full", no_cov)
    balanced = sel.select(p, 4000, 4000, "balanced", no_cov)
    one_unit = sel.select(p, 4000, 4000, "global-scale", no_cov)
    assert np.bincount(task[full], minlength=2).tolist() == [2, 2]
    assert np.bincount(task[balanced], minlength=2).tolist() == [2, 2]
    assert np.bincount(task[one_unit], minlength=2).tolist() == [3, 1]


def test_a_gain_above_its_tasks_typical_gain_counts_as_one_copy(rng):
    """Within a task, gains above the task's typical gain (TASK_SCALE quantile) count the same
    (SATURATE): an entry with an outsized gain does not crowd out two facts of its task in the
    same bytes (counted by its gain, 9/2000 per byte would beat 1/1000)."""
    gain = np.array([9.0, 1.0, 1.0, 1.0, 0.2])
    p = sel.Pool(nbytes=np.array([2000.0, 1000, 1000, 1000, 1000]), gain=gain, retention=np.zeros(5),
                 keys=rng.standard_normal((5, 6)), is_new=np.ones(5, bool), age=np.zeros(5), task=np.zeros(5, int))
    assert np.allclose(sel._scales(gain, np.zeros(5, int)), 1.0)  # the 0.75 quantile of the positive gains
    no_cov = sel.Weights(cov=0.0)
    assert sel.select(p, 2000, 2000, "full", no_cov).tolist() == [1, 2]      # two facts, not the one big gain
    assert sel.select(p, 5000, 5000, "full", no_cov).tolist() == [0, 1, 2, 3]   # the four that answer, not the 0.2


def test_calibration_fit_reduces_heldout_retrieval_loss(rng):
    K, n = 32, 400
    keys = rng.standard_normal((60, K))
    target = rng.integers(0, 60, n)
    A = np.eye(K) + 0.8 * rng.standard_normal((K, 4)) @ rng.standard_normal((4, K)) / np.sqrt(K)
    queries = (keys[target] + 0.3 * rng.standard_normal((n, K))) @ np.linalg.inv(A).T  # a distorted query space
    onehot = np.eye(60)[target]
    fit, val = slice(0, 300), slice(300, n)
    a, b, U, V = fit_calibration(queries[fit], keys[target[fit]], rank=8, ridge=0.1)
    mapped = a * queries[val] + b + (queries[val] @ V) @ U.T
    before = retrieval_loss(queries[val], keys, onehot[val])
    after = retrieval_loss(mapped, keys, onehot[val])
    print(f"\nheld-out retrieval loss: identity {before:.3f} -> calibrated {after:.3f}")
    assert after < 0.8 * before


def _task(path, prefix, n):
    path.write_text("".join(json.dumps({"prompt": f"{prefix} question {i}?", "answer": f"{prefix}{i}"}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture(scope="module")
def tiny_rt(tiny_bundles):
    return Runtime.open(tiny_bundles["fp32"])


def _new_bank(rt, path, cap=100_000):
    m = rt.manifest
    return Bank.create_for(path, cap, m, force=True, max_tokens=96)


def test_two_tasks_under_a_cap_keep_anchors(tiny_rt, tmp_path):
    p = tmp_path / "b.ikv"
    size = None
    with _new_bank(tiny_rt, p) as b:
        size = os.path.getsize(p)
        a = read_examples(_task(tmp_path / "a.jsonl", "alpha", 12))
        plan_a = absorb(tiny_rt, b, a, "alpha", n_anchors=3)
        assert 0 < len(plan_a.add) < 12  # the cap cannot hold everything
        used_a = b.usage()["bytes_used"]
        anchors_a = b.anchors("alpha")
        bb = read_examples(_task(tmp_path / "b.jsonl", "beta", 12))
        absorb(tiny_rt, b, bb, "beta", n_anchors=3)
        assert b.anchors("alpha") == anchors_a and len(anchors_a) == 3
        assert set(b.tasks()) == {"alpha", "beta"}
        assert b.usage()["bytes_used"] <= b.geo.pages * b.geo.page_bytes and used_a > 0
    assert os.path.getsize(p) == size <= 100_000
    assert verify(p)["ok"]


def test_killed_learn_leaves_the_bank_before_evicted_or_after(tiny_rt, tmp_path):
    """A kill at any write of a learn into a full bank: before, or evicted (old entries minus
    the evictions, marked ``learn_pending``), or after; never anything else."""
    p = tmp_path / "b.ikv"
    with _new_bank(tiny_rt, p) as b:
        # strategy full: the tiny random model's likelihood gains are noise; coverage values every entry,
        # so the bank fills and the second learn must evict (the default keeps only positive held-out value)
        absorb(tiny_rt, b, read_examples(_task(tmp_path / "a.jsonl", "alpha", 8)), "alpha", n_anchors=2, strategy="full")
        before = (b.gen, b.tasks())
    base = tmp_path / "base.ikv"
    shutil.copy(p, base)
    examples = read_examples(_task(tmp_path / "b.jsonl", "beta", 8))
    outcomes = []
    for kill_at in range(1, 400, 3):
        shutil.copy(base, p)
        pid = os.fork()
        if pid == 0:
            try:
                with Bank.open(p, writable=True) as bank:
                    kill_at_write(bank, kill_at)
                    absorb(tiny_rt, bank, examples, "beta", n_anchors=2, strategy="full")
            finally:
                os._exit(0)
        wait_or_kill(pid)
        assert verify(p)["ok"]
        with Bank.open(p) as bank:
            state, mark = (bank.gen, bank.tasks()), pending(bank)
        if state == before:
            outcomes.append("before")
        elif mark is not None:
            assert mark["task"] == "beta" and "beta" not in state[1] and state[1]["alpha"] < before[1]["alpha"]
            outcomes.append("evicted")
        else:
            assert "beta" in state[1] and state[0] in (before[0] + 1, before[0] + 2)
            outcomes.append("after")
            break
    assert outcomes[0] == "before" and "evicted" in outcomes and outcomes[-1] == "after"


def test_cli_dry_run_and_bad_input(tiny_bundles, tmp_path):
    r = CliRunner()
    task = _task(tmp_path / "t.jsonl", "gamma", 5)
    bank = tmp_path / "new.ikv"
    out = r.invoke(cli, ["--bundle", str(tiny_bundles["fp32"]), "--memory", str(bank), "--task", str(task),
                         "--budget", "100KB", "--dry-run", "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert plan["dry_run"] and plan["added"] > 0 and not bank.exists()
    assert isinstance(plan["outvoted"], int) and 0 <= plan["outvoted"] <= plan["examples"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "answer": "a"}\n{"prompt": "no answer"}\n')
    out = r.invoke(cli, ["--bundle", str(tiny_bundles["fp32"]), "--memory", str(bank), "--task", str(bad), "--budget", "100KB"])
    assert out.exit_code == 2 and ":2" in out.output and not bank.exists()
    out = r.invoke(cli, ["--bundle", str(tiny_bundles["fp32"]), "--memory", str(bank), "--task", str(task),
                         "--json", "--quiet"])   # no --budget: a new bank gets the device profile's default cap
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["cap"] == Runtime.open(tiny_bundles["fp32"]).profile.default_budget_bytes
    assert verify(bank)["ok"]
    out = r.invoke(cli, ["--bundle", str(tiny_bundles["fp32"]), "--memory", str(tmp_path / "t2.ikv"), "--task", str(task),
                         "--budget", "1KB"])
    assert out.exit_code == 2 and "too small" in out.output
