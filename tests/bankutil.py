"""Helpers shared by the bank tests: a toy geometry and deterministic entries."""
from __future__ import annotations

import os
import signal
import time
import warnings

import numpy as np

from inducekv.kernels import kvquant
from inducekv.memory.bank import Bank, NewEntry

TOY = dict(fingerprint="toy-model", num_layers=2, kv_heads=2, head_dim=16, key_dim=8, max_tokens=48)


def make_bank(path, cap=128 * 1024, scheme="int8", **kw) -> Bank:
    """A toy bank; shared-key-scale schemes get their scales in a first commit (fitted on toy keys)."""
    b = Bank.create(path, cap, force=True, scheme=scheme, **{**TOY, **kw})
    if scheme in kvquant.SHARED_KEY_SCALE:
        with b.transaction() as tx:
            tx.set_key_scales(kvquant.fit_key_scale([entry(s, 48).keys for s in range(8)], scheme))
    return b


def entry(seed: int, tokens: int, task: str = "t0") -> NewEntry:
    """An entry whose every number is a function of ``seed``: readers can check it is not torn."""
    g = np.random.default_rng(seed)
    shape = (TOY["num_layers"], TOY["kv_heads"], tokens, TOY["head_dim"])
    k = g.standard_normal(shape).astype(np.float32)
    v = g.standard_normal(shape).astype(np.float32)
    key = g.standard_normal(TOY["key_dim"]).astype(np.float32)
    return NewEntry(k, v, key, task, seed.to_bytes(16, "little"))


def seed_of(example_hash: bytes) -> int:
    return int.from_bytes(example_hash, "little")


def slot_of(added) -> int | None:
    """The slot of ``Transaction.add``'s result (None when it did not fit)."""
    return None if added is None else added.slot


def kill_at_write(bank: Bank, n: int) -> None:
    """Make this process die (SIGKILL) during the ``n``-th write ``bank`` makes, with that write
    half done: every byte a writer puts on disk goes through ``Bank.write_at``."""
    import os
    import signal

    count, real = [0], bank.write_at

    def hooked(data, off):
        count[0] += 1
        if count[0] == n:
            real(data[: len(data) // 2], off)
            os.kill(os.getpid(), signal.SIGKILL)
        real(data, off)

    bank.write_at = hooked


def wait_or_kill(pid: int, timeout_s: float = 15.0) -> bool:
    """Wait for a forked writer; one that has not exited after ``timeout_s`` is killed with
    SIGKILL (a crash at whatever point it reached). A child forked from this multi-threaded
    test process can hang on a lock another thread held at the fork (seen in two full
    runs, in ``test_kill_at_every_write_of_a_mixed_swap``, at ``Bank.open`` before any write);
    the tests' assertions hold for a kill at any point. A writer here takes milliseconds.
    Returns True when the child had to be killed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    warnings.warn(f"a forked writer (pid {pid}) was still running after {timeout_s:g} s and was killed")
    return True
