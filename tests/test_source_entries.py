"""Source entries (issue 19): the example's bytes under the same cap, checksummed and crash-safe."""
import os
import shutil

import numpy as np
import pytest

from inducekv.core.errors import BankError
from inducekv.memory import format as fmt
from inducekv.memory.bank import Bank, NewEntry
from inducekv.memory.source import pack_source, unpack_source
from inducekv.memory.verify import verify
from bankutil import TOY, entry, kill_at_write, make_bank, wait_or_kill

TIERED = dict(key_dtype="f16", inline_bytes=256, slot_share=0.5)


def source(seed: int, task: str = "t0", image: bytes | None = None) -> NewEntry:
    g = np.random.default_rng(seed)
    raw = pack_source(f"What is the capital of Land{seed}?", f"City{seed}", image)
    return NewEntry(None, None, g.standard_normal(TOY["key_dim"]).astype(np.float32), task,
                    seed.to_bytes(16, "little"), tokens=12 + seed % 5, source=raw)


def _contents(b: Bank) -> dict:
    """slot -> (kind, bytes as read back, checksums verified)."""
    out = {}
    for s in b.slots():
        buf, info = b.read_payload(int(s))
        out[int(s)] = (info.kind, bytes(buf))
    return out


def test_source_bytes_round_trip_and_refuse_bad_lengths():
    raw = pack_source("Wie heißt die Hauptstadt?", "Morrow", b"\x89PNG fake")
    assert unpack_source(raw) == ("Wie heißt die Hauptstadt?", "Morrow", b"\x89PNG fake")
    assert unpack_source(pack_source("p", "a")).image is None
    with pytest.raises(BankError, match="add up"):
        unpack_source(raw[:-1])
    with pytest.raises(BankError, match="shorter than its header"):
        unpack_source(raw[:5])
    bad = bytearray(pack_source("ab", "c"))
    bad[8] = 0xFF
    with pytest.raises(BankError, match="not UTF-8"):
        unpack_source(bytes(bad))


def test_a_tiered_bank_holds_both_kinds_under_its_cap(tmp_path):
    p = tmp_path / "tiered.ikv"
    cap = 96 * 1024
    with make_bank(p, cap, **TIERED) as b:
        g = b.geo
        assert g.version == 3 and g.sources and g.inline_capacity >= 256
        assert os.path.getsize(p) <= cap and g.file_bytes == os.path.getsize(p)
        # half the cap went to slots: more slots than the kv-only plan of the same cap
        spare = cap - g.offsets()["records"]        # what the header, superblock, catalog... leave
        assert g.slots * 2 * g.record_bytes >= 0.45 * spare
        big = source(7, image=bytes(range(256)) * 8)                 # 2 KB image: stored in pages
        with b.transaction() as tx:
            a_kv = tx.add(entry(1, 10))
            a_in = tx.add(source(2))
            a_pg = tx.add(big)
        got = _contents(b)
        assert got[a_kv.slot][0] == "kv" and got[a_in.slot][0] == "source" and got[a_pg.slot][0] == "source"
        assert unpack_source(got[a_in.slot][1]).answer == "City2"
        assert unpack_source(got[a_pg.slot][1]).image == bytes(range(256)) * 8
        assert b.entry(a_in.slot).pages == 0 and b.entry(a_pg.slot).pages == g.source_pages(len(big.source)) >= 1
        assert b.usage()["kv_entries"] == 1 and b.usage()["source_entries"] == 2
        with pytest.raises(BankError, match="source entry"):
            b.read(a_in.slot)
        # keys are f16 in the record: what was written, to f16 precision
        ids, keys = b.keys()
        assert np.allclose(keys[list(ids).index(a_in.entry_id)], source(2).key.astype(np.float16), atol=0)
    assert verify(p)["ok"]
    with Bank.open(p) as b:   # and reopened
        assert b.geo.version == 3 and len(b.slots()) == 3


def test_a_kv_only_bank_stays_version_2_and_refuses_sources(tmp_path):
    p = tmp_path / "kv.ikv"
    with make_bank(p) as b:
        assert b.geo.version == 2 and not b.geo.sources
        assert b'"format_version":"2"' in p.read_bytes()[:4096] and b"inline_bytes" not in p.read_bytes()[:4096]
        with b.transaction() as tx:
            with pytest.raises(BankError, match="kv entries only"):
                tx.add(source(1))


def test_verify_finds_a_damaged_source_entry(tmp_path):
    p = tmp_path / "d.ikv"
    with make_bank(p, 96 * 1024, **TIERED) as b:
        with b.transaction() as tx:
            a = tx.add(source(3))
        g, off = b.geo, b.offsets["records"]
        copy = int(b.superblock.bitmap[a.slot])
        at = off + (a.slot * 2 + copy) * g.record_bytes + g.record_dtype.fields["pages"][1]
    raw = bytearray(p.read_bytes())
    raw[at + 9] ^= 0x40   # one bit of the inline prompt (the record CRC catches it first)
    p.write_bytes(bytes(raw))
    rep = verify(p)
    assert not rep["ok"] and any("corrupt" in x or "checksum" in x for x in rep["problems"])


def test_verify_finds_a_source_whose_lengths_lie(tmp_path):
    """A record whose CRCs hold but whose source bytes do not parse (a hostile file)."""
    p = tmp_path / "h.ikv"
    with make_bank(p, 96 * 1024, **TIERED) as b:
        lie = b"\x05\x00\x01\x00\x00\x00\x00\x00abc"   # says 5 + 1 bytes of text, holds 3
        with b.transaction() as tx:
            tx.add(NewEntry(None, None, np.ones(TOY["key_dim"], np.float32), "t0", bytes(16), tokens=4, source=lie))
    rep = verify(p)
    assert not rep["ok"] and any("add up" in x for x in rep["problems"])


def _writer(path, k):
    pid = os.fork()
    if pid == 0:
        try:
            b = Bank.open(path, writable=True)
            kill_at_write(b, k)
            with b.transaction() as tx:
                live = sorted(int(s) for s in b.slots())
                tx.replace(live[0], entry(50, 9))                           # a source swapped for kv
                tx.replace(live[1], source(51))                             # a kv entry swapped for a source
                tx.add(source(52, image=bytes(3000)))                       # a paged source
                tx.remove(live[2])
        finally:
            os._exit(0)
    wait_or_kill(pid)


def test_kill_at_every_write_of_a_mixed_swap(tmp_path):
    base = tmp_path / "base.ikv"
    with make_bank(base, 128 * 1024, **TIERED) as b:
        with b.transaction() as tx:
            for i in range(3):
                tx.add(source(10 + i) if i != 1 else entry(11, 10))
        before = _contents(b)
    after = None
    seen = set()
    for k in range(1, 40):
        p = tmp_path / f"k{k}.ikv"
        shutil.copy(base, p)
        _writer(p, k)
        assert verify(p)["ok"], k
        with Bank.open(p) as b:
            now = _contents(b)
        if now != before:
            after = now if after is None else after
            assert now == after, f"kill at write {k} left a third state"
            seen.add("new")
            break   # the kill came after the last write: the transaction had fewer writes
        seen.add("old")
    assert seen == {"old", "new"} and after is not None
    kinds = sorted(kind for kind, _ in after.values())
    assert kinds == ["kv", "source", "source"]
    answers = sorted(unpack_source(buf).answer for kind, buf in after.values() if kind == "source")
    assert answers == ["City51", "City52"]


def test_a_version_3_header_with_a_bad_key_dtype_is_refused(tmp_path):
    p = tmp_path / "bad.ikv"
    make_bank(p, 96 * 1024, **TIERED).close()
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    head = raw[8:8 + n].decode().replace('"key_dtype":"f16"', '"key_dtype":"f64"')
    raw[8:8 + n] = head.encode()
    p.write_bytes(bytes(raw))
    with pytest.raises(BankError, match="key_dtype"):
        Bank.open(p)
    assert fmt.KEY_DTYPES.keys() == {"f32", "f16"}


def _mixed_tx(b: Bank, i: int) -> None:
    """Transaction ``i`` of a deterministic run: a kv and a source entry swap places each time."""
    with b.transaction() as tx:
        live = sorted(int(s) for s in b.slots())
        tx.replace(live[i % len(live)], source(100 + i) if i % 2 else entry(100 + i, 5 + i % 7))
        tx.replace(live[(3 * i + 1) % len(live)], entry(200 + i, 8) if i % 2 else source(200 + i, image=bytes(1500 + i)))


def test_kill_9_at_random_moments_of_mixed_swaps(tmp_path):
    """200 trials: SIGKILL a process that swaps kv and source entries continuously; every bank
    verifies and holds exactly the state after some whole number of transactions."""
    import signal
    import time

    base = tmp_path / "base.ikv"
    with make_bank(base, 256 * 1024, **TIERED) as b:
        with b.transaction() as tx:
            for i in range(6):
                tx.add(source(10 + i) if i % 2 else entry(10 + i, 8))
        gen0 = b.gen
    ref = tmp_path / "ref.ikv"
    shutil.copy(base, ref)
    states = []
    with Bank.open(ref, writable=True) as b:
        states.append(_contents(b))
        for i in range(1, 41):
            _mixed_tx(b, i)
            states.append(_contents(b))
    g = np.random.default_rng(7)
    p = tmp_path / "trial.ikv"
    reached = set()
    for _ in range(200):
        shutil.copy(base, p)
        pid = os.fork()
        if pid == 0:
            try:
                with Bank.open(p, writable=True) as b:
                    for i in range(1, 41):
                        _mixed_tx(b, i)
            finally:
                os._exit(0)
        time.sleep(float(g.uniform(0.0, 0.03)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        rep = verify(p)
        assert rep["ok"], rep["problems"]
        with Bank.open(p) as b:
            n = b.gen - gen0
            assert 0 <= n <= 40 and _contents(b) == states[n]
        reached.add(n)
    assert len(reached) > 3   # the kills landed at many different points of the run
