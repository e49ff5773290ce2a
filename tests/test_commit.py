"""A learn's write in two commits (evictions, then additions): kill -9 anywhere leaves a bank
that verifies, in one of three documented states (learn/commit.py)."""
import os
import shutil
import signal
import time
from types import SimpleNamespace

import numpy as np

from inducekv.learn.commit import fits_now, pending, write
from inducekv.memory.bank import Bank
from inducekv.memory.verify import verify
from bankutil import entry, kill_at_write, make_bank, seed_of, wait_or_kill

N = 6          # entries per group; the bank holds two groups and no more
TOKENS = 20
CAP = 80_000     # 62 pages of 576 B: two groups of 5-page entries, not three


class _Cand:
    def __init__(self, seed: int):
        self.seed, self.tokens, self.gain, self.value = seed, TOKENS, 0.5, None

    def entry(self, task: str):
        return entry(self.seed, self.tokens, task)


def _group(g: int) -> list[int]:
    return [1000 * g + j for j in range(N)]


def _plan(bank: Bank, g: int):
    """Learn group ``g`` as task t{g}: evict group g-2, add group g."""
    old = [e for e in bank.entries() if seed_of(e.example_hash) // 1000 == g - 2]
    return SimpleNamespace(
        task=f"t{g}", bank_gen=bank.gen, candidates=[_Cand(s) for s in _group(g)], add=list(range(N)),
        evict=[e.slot for e in old], gains={}, twins={}, twin_group=None, template=None, key_scales=None, store_compaction=False,
        anchors=[{"prompt": f"q{g}", "answer": f"a{g}"}], timings={}, commits=0,
        calibration=SimpleNamespace(accepted=False), injection=SimpleNamespace(accepted=False),
        value_gates=SimpleNamespace(accepted=False),
        gate=SimpleNamespace(margin=None))


def _base(tmp_path):
    """A bank holding groups 1 and 2 (full: a third group only fits after evicting one)."""
    p = tmp_path / "base.ikv"
    with make_bank(p, CAP) as b:
        for g in (1, 2):
            write(b, _plan(b, g))
        assert not fits_now(b, [TOKENS] * N)
    return p


def _groups(p) -> tuple[list[int], dict | None]:
    """The groups a bank holds (each must be whole) and its pending mark."""
    rep = verify(p)
    assert rep["ok"], rep["problems"]
    with Bank.open(p) as b:
        seeds = sorted(seed_of(e.example_hash) for e in b.entries())
        mark = pending(b)
    groups = sorted({s // 1000 for s in seeds})
    assert seeds == sorted(s for g in groups for s in _group(g)), f"a partial group: {seeds}"
    return groups, mark


def _state(groups, mark) -> str:
    """before / evicted / after of the learn of the newest group, or AssertionError."""
    if mark is None:
        assert len(groups) == 2 and groups[1] == groups[0] + 1, groups
        return "complete"
    assert len(groups) == 1 and mark == {"task": f"t{groups[0] + 1}", "evicted": N, "adding": N}, (groups, mark)
    return "evicted"


def test_a_full_bank_learns_in_two_commits_and_every_kill_point_is_documented(tmp_path):
    base = _base(tmp_path)
    with Bank.open(base, writable=True) as b:
        p = _plan(b, 3)
        gen = b.gen
        write(b, p)
        assert p.commits == 2 and b.gen == gen + 2 and pending(b) is None
    assert _groups(base) == ([2, 3], None)
    seen = []
    for k in range(1, 200):
        trial = tmp_path / f"k{k}.ikv"
        shutil.copy(_base(tmp_path), trial)
        pid = os.fork()
        if pid == 0:
            try:
                with Bank.open(trial, writable=True) as b:
                    kill_at_write(b, k)
                    write(b, _plan(b, 3))
            finally:
                os._exit(0)
        wait_or_kill(pid)
        groups, mark = _groups(trial)
        state = {(1, 2): "before", (2, 3): "after"}.get(tuple(groups), "evicted")
        assert _state(groups, mark) == ("evicted" if state == "evicted" else "complete")
        seen.append(state)
        if state == "after":  # the write has fewer than k writes: every point covered
            break
    assert seen[-1] == "after" and "evicted" in seen and seen[0] == "before"
    assert seen == sorted(seen, key=["before", "evicted", "after"].index)  # states only move forward


def test_a_pending_mark_is_cleared_by_the_next_learn(tmp_path):
    base = _base(tmp_path)
    with Bank.open(base, writable=True) as b:
        with b.transaction() as tx:  # the state a kill between the commits leaves
            for e in b.entries():
                if seed_of(e.example_hash) // 1000 == 1:
                    tx.remove(e.slot)
            tx.set_extra("learn_pending", {"task": "t3", "evicted": N, "adding": N})
        p = _plan(b, 3)
        write(b, p)
        assert p.commits == 1 and pending(b) is None  # it fit in the freed space: one commit
    assert _groups(base) == ([2, 3], None)


def _learn_forever(path):
    """Child process: learn groups 3, 4, 5, ... until killed (each evicts the oldest group)."""
    try:
        with Bank.open(path, writable=True) as b:
            for g in range(3, 1 << 30):
                write(b, _plan(b, g))
    finally:
        os._exit(0)


def test_kill_9_at_random_moments_of_two_commit_learns(tmp_path):
    """200 trials: SIGKILL a process that learns continuously into a full bank; every bank
    verifies and holds two whole consecutive groups, or one with the pending mark."""
    base = _base(tmp_path)
    rng = np.random.default_rng(7)
    counts = {"complete": 0, "evicted": 0}
    trial = tmp_path / "trial.ikv"
    for _ in range(200):
        shutil.copy(base, trial)
        pid = os.fork()
        if pid == 0:
            _learn_forever(trial)
        time.sleep(float(rng.uniform(0.0, 0.06)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        counts[_state(*_groups(trial))] += 1
    print(f"\nkill -9 during two-commit learns: 200 trials, all verified; {counts}")
    assert sum(counts.values()) == 200 and counts["evicted"] > 0 and counts["complete"] > 0
