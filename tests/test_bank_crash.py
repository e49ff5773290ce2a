"""Crash safety (kill -9 while swapping) and lock-free readers during swaps."""
import os
import shutil
import signal
import time

import numpy as np
import pytest

from inducekv.kernels import kvquant
from inducekv.memory.bank import Bank
from inducekv.memory.txn import Added
from inducekv.memory.verify import verify
from bankutil import entry, kill_at_write as kill_at_write_, make_bank, seed_of, slot_of, wait_or_kill

N_LIVE = 6
CAP = 160_000


def _plan(i: int) -> list[tuple[str, int, int]]:
    """Transaction ``i`` (1-based): two swaps, plus an add or a remove every other time."""
    ops = [("swap", i % N_LIVE, 1000 * i + 1), ("swap", (i * 7 + 3) % N_LIVE, 1000 * i + 2)]
    if i % 2:
        ops.append(("add", -1, 1000 * i + 3))
    else:
        ops.append(("remove_extra", -1, 0))
    return ops


def _apply(tx, state: dict[int, int], i: int) -> None:
    """Run transaction ``i`` on ``tx`` and on the model ``state`` (slot -> seed)."""
    live = sorted(state)
    for op, which, seed in _plan(i):
        tokens = 4 + seed % 29
        if op == "swap":
            s = live[which]
            assert tx.replace(s, entry(seed, tokens, f"t{seed % 2}"))
            state[s] = seed
        elif op == "add":
            s = slot_of(tx.add(entry(seed, tokens, "extra")))
            assert s is not None
            state[s] = seed
        else:
            extra = [s for s in sorted(state) if s not in live[:N_LIVE]]
            if extra:
                tx.remove(extra[0])
                del state[extra[0]]


def _base(tmp_path):
    p = tmp_path / "base.ikv"
    state = {}
    with make_bank(p, CAP) as b:
        with b.transaction() as tx:
            for j in range(N_LIVE):
                state[tx.add(entry(j, 10)).slot] = j
        gen0 = b.gen
    return p, state, gen0


def _expected(state0: dict, n: int) -> dict:
    """Model state after ``n`` transactions from the base (the base's first N_LIVE slots stay the swap targets)."""
    state = dict(state0)

    class _Tx:  # replays the plan on the model only, allocating slots the way the bank does
        def replace(self, s, e):
            return True

        def add(self, e):
            return Added(min(set(range(1000)) - set(state)), -1)

        def remove(self, s):
            pass

    for i in range(1, n + 1):
        _apply(_Tx(), state, i)
    return state


def _state(bank) -> dict:
    return {int(s): seed_of(bank.entry(int(s)).example_hash) for s in bank.slots()}


def _writer(path, pipe_w, stop_after=None, kill_at_write=None):
    """Child process body: run transactions 1, 2, ... forever; report begin/commit on the pipe."""
    try:
        b = Bank.open(path, writable=True)
        state = _state(b)
        if kill_at_write is not None:
            kill_at_write_(b, kill_at_write)  # die with this write half done
        i = 0
        while stop_after is None or i < stop_after:
            i += 1
            os.write(pipe_w, f"b{i}\n".encode())
            with b.transaction() as tx:
                _apply(tx, state, i)
            os.write(pipe_w, f"c{i}\n".encode())
    finally:
        os._exit(0)


def _run_and_kill(path, delay_s=None, kill_at_write=None):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _writer(path, w, stop_after=1 if kill_at_write else None, kill_at_write=kill_at_write)
    os.close(w)
    if delay_s is not None:
        time.sleep(delay_s)
        os.kill(pid, signal.SIGKILL)
    wait_or_kill(pid)
    log = b""
    while chunk := os.read(r, 1 << 16):
        log += chunk
    os.close(r)
    lines = log.decode().split()
    return lines[-1] if lines else None


def _check_after_kill(path, state0, gen0, last) -> str:
    rep = verify(path)
    assert rep["ok"], rep["problems"]
    with Bank.open(path) as b:
        n = b.gen - gen0
        assert _state(b) == _expected(state0, n)
        for s in b.slots():
            e = b.entry(int(s))
            ref = entry(seed_of(e.example_hash), e.tokens)
            k, v = b.read(int(s))
            kb, vb = kvquant.error_bound("int8", ref.keys, ref.values)
            assert (np.abs(k - ref.keys) <= kb).all() and (np.abs(v - ref.values) <= vb).all()
    if last is None:
        assert n == 0
        return "old"
    i = int(last[1:])
    if last[0] == "c":  # killed between transactions
        assert n == i
        return "between"
    assert n in (i - 1, i), f"killed in transaction {i}, bank is at {n}"
    return "new" if n == i else "old"


def test_kill_at_every_write_of_a_swap(tmp_path):
    """Deterministic: die in the middle of write k of a transaction, for every k."""
    base, state0, gen0 = _base(tmp_path)
    outcomes = []
    for k in range(1, 40):
        p = tmp_path / f"k{k}.ikv"
        shutil.copy(base, p)
        last = _run_and_kill(p, kill_at_write=k)
        outcomes.append(_check_after_kill(p, state0, gen0, last))
        if last == "c1":  # the transaction has fewer than k writes: all points covered
            break
    assert outcomes[-1] == "between" and outcomes[:-1] == ["old"] * (len(outcomes) - 1)


def test_kill_9_at_random_moments(tmp_path):
    """>= 200 trials: SIGKILL a process that swaps continuously; every bank must verify and
    hold exactly the state before or after the interrupted transaction."""
    base, state0, gen0 = _base(tmp_path)
    g = np.random.default_rng(1234)
    counts = {"old": 0, "new": 0, "between": 0}
    p = tmp_path / "trial.ikv"
    for _ in range(200):
        shutil.copy(base, p)
        last = _run_and_kill(p, delay_s=float(g.uniform(0.0, 0.08)))
        counts[_check_after_kill(p, state0, gen0, last)] += 1
    print(f"\nkill -9 trials: 200, failed verify: 0, killed mid-transaction -> old state {counts['old']}, "
          f"new state {counts['new']}; killed between transactions {counts['between']}")
    assert sum(counts.values()) == 200


@pytest.mark.parametrize("slow", [False, True])
def test_reader_never_sees_a_torn_entry(tmp_path, slow):
    """A reader reads while a writer process swaps continuously: >= 1,000 reads, 0 torn.

    ``slow`` widens the race: the reader pauses between reading a record and its
    pages, so the writer often reuses those pages meanwhile (checksums must catch it)."""
    base, _, _ = _base(tmp_path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _writer(base, w)
    os.close(w)
    reads = torn = vanished = 0
    gens = set()
    try:
        with Bank.open(base) as b:
            if slow:
                gather = b.stored_bytes
                b.stored_bytes = lambda pages, n: (time.sleep(0.003), gather(pages, n))[1]
            deadline = time.monotonic() + 60
            while (reads < 1500 or len(gens) < 20) and time.monotonic() < deadline:
                b.refresh()
                gens.add(b.gen)
                for s in b.slots():
                    got = b.read_entry(int(s), b.entry(int(s)).entry_id)
                    if got is None:
                        vanished += 1  # swapped out since refresh: correctly not served
                        continue
                    info, k, v = got
                    ref = entry(seed_of(info.example_hash), info.tokens)
                    kb, vb = kvquant.error_bound("int8", ref.keys, ref.values)
                    ok = k.shape == ref.keys.shape and (np.abs(k - ref.keys) <= kb).all() and (np.abs(v - ref.values) <= vb).all()
                    torn += not ok
                    reads += 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    print(f"\nconcurrent reads (slow={slow}): {reads}, torn: {torn}, swapped out before read: {vanished}, generations seen: {len(gens)}")
    assert reads >= 1000 and len(gens) >= 20
    assert torn == 0
    assert verify(base)["ok"]
