"""Banks of the shared-key-scale schemes (k8v8, k4v8, k4v4): scales set once, entries decode, crashes."""
from __future__ import annotations

import numpy as np
import pytest

from inducekv.core.errors import BankError
from inducekv.kernels import kvquant
from inducekv.learn import absorb, plan, write
from inducekv.memory import format as fmt
from inducekv.memory.bank import Bank
from inducekv.memory.verify import verify
from inducekv.runtime.api import Runtime
from bankutil import entry, kill_at_write, make_bank

FACTS = [{"prompt": f"What is the code of item {i}?", "answer": f"code{i}"} for i in range(6)]


@pytest.mark.parametrize("scheme", [s for s in kvquant.SHARED_KEY_SCALE if s in kvquant.DENSE])
def test_learn_sets_scales_once_and_entries_decode(rt, device_bundle, tmp_path, scheme):
    path = tmp_path / "b.ikv"
    with Bank.create_for(path, 1 << 20, rt.manifest, scheme=scheme, max_tokens=64) as b:
        assert b.key_scales() is None
        absorb(rt, b, FACTS[:3], "a", n_anchors=1)
        ks = b.key_scales()
        assert ks is not None and ks.shape == (rt.manifest.num_layers, rt.manifest.num_kv_heads, rt.manifest.head_dim)
        absorb(rt, b, FACTS[3:], "b", n_anchors=1)
        assert np.array_equal(b.key_scales(), ks)           # a later learn keeps them
        info, k, v = b.read_entry(int(b.slots()[0]))
        assert k.shape[2] == info.tokens and np.isfinite(k).all()
        per_entry = kvquant.payload_nbytes(scheme, rt.manifest.num_layers, rt.manifest.num_kv_heads, info.tokens,
                                           rt.manifest.head_dim)
        assert info.nbytes == per_entry < kvquant.payload_nbytes("int8", rt.manifest.num_layers,
                                                                  rt.manifest.num_kv_heads, info.tokens,
                                                                  rt.manifest.head_dim)
    assert verify(path)["ok"]
    r = Runtime.open(device_bundle, memory=path).generate(FACTS[4]["prompt"], max_new_tokens=2, k=2)
    assert 1 <= len(r.entries) <= 2 and r.token_ids   # the fitted weighting may leave the second one out


def test_scales_are_fixed_while_entries_exist(tmp_path):
    with make_bank(tmp_path / "b.ikv", scheme="k4v8") as b:
        with b.transaction() as tx:
            tx.add(entry(1, 5))
        with pytest.raises(BankError, match="cannot change"):
            with b.transaction() as tx:
                tx.set_key_scales(np.ones_like(b.key_scales()))
    with make_bank(tmp_path / "c.ikv", scheme="int8") as b:
        with pytest.raises(BankError, match="keeps key scales in each entry"):
            with b.transaction() as tx:
                tx.set_key_scales(np.ones((2, 2, 16), np.float16))


def test_adding_before_scales_are_set_is_refused(tmp_path):
    from bankutil import TOY

    with Bank.create(tmp_path / "b.ikv", 128 * 1024, scheme="k8v8", **TOY) as b:
        with pytest.raises(BankError, match="no key scales yet"):
            with b.transaction() as tx:
                tx.add(entry(1, 5))


def test_corrupt_scales_are_reported(tmp_path):
    p = tmp_path / "b.ikv"
    with make_bank(p, scheme="k4v4") as b:
        with b.transaction() as tx:
            tx.add(entry(1, 5))
        at = b.offsets["scales"] + b.superblock.scales_copy * b.geo.scales_bytes + 3
    raw = bytearray(p.read_bytes())
    raw[at] ^= 0xFF
    p.write_bytes(bytes(raw))
    rep = verify(p)
    assert not rep["ok"] and any("key scales" in x for x in rep["problems"])


def test_version_1_bank_gets_a_clear_message(tmp_path):
    p = tmp_path / "old.ikv"
    make_bank(p).close()
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    head = raw[8:8 + n].decode()
    head = head.replace('"format_version":"2"', '"format_version":"1"')   # a kv-only, f32-key bank is version 2
    raw[8:8 + n] = head.encode()
    p.write_bytes(bytes(raw))
    with pytest.raises(BankError, match="version '1' is not supported.*learn its tasks again"):
        Bank.open(p)


CHILD = """
import sys
sys.path.insert(0, sys.argv[3])
from bankutil import kill_at_write
from inducekv.learn import absorb
from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
rt = Runtime.open(sys.argv[1])
with Bank.open(sys.argv[2], writable=True) as bank:
    kill_at_write(bank, int(sys.argv[4]))
    absorb(rt, bank, [{"prompt": f"What is the code of item {i}?", "answer": f"code{i}"} for i in range(3)], "a",
           n_anchors=1, strategy="full")   # all three kept (the tiny model's held-out gains are noise)
"""


def test_killed_first_learn_of_a_shared_scale_bank(rt, device_bundle, tmp_path):
    """The scales are written in the same commit as the first entries: a kill at any write
    leaves an empty bank without scales, or the learned bank with them. (Fresh processes:
    a forked child of a process that already ran onnxruntime can deadlock.)"""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "b.ikv"
    Bank.create_for(path, 1 << 20, rt.manifest, scheme="k4v8", max_tokens=64).close()
    outcomes, kill_at = set(), 1
    while True:
        subprocess.run([sys.executable, "-c", CHILD, str(device_bundle), str(path), str(Path(__file__).parent),
                        str(kill_at)], timeout=120)
        assert verify(path)["ok"]
        with Bank.open(path) as b:
            state = (len(b.slots()), b.key_scales() is not None)
        assert state in ((0, False), (3, True))
        outcomes.add(state)
        if state[0]:
            break
        kill_at += 1 if kill_at < 8 else 5   # every early write, then every fifth
    assert outcomes == {(0, False), (3, True)} and kill_at > 3
