"""Bank file: cap accounting, round trips, transactions, hostile files, CLI."""
import json
import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from inducekv.kernels import kvquant
from inducekv.memory import format as fmt
from inducekv.memory.bank import Bank
from inducekv.memory.cli import cli
from inducekv.memory.verify import verify
from inducekv.core.errors import BankError
from bankutil import TOY, entry, make_bank, seed_of, slot_of


def _check_entry(bank, slot, scheme="int8"):
    e = bank.entry(slot)
    ref = entry(seed_of(e.example_hash), e.tokens, e.task)
    k, v = bank.read(slot)
    kb, vb = kvquant.error_bound(scheme, ref.keys, ref.values, bank.key_scales())
    assert (np.abs(k - ref.keys) <= kb).all() and (np.abs(v - ref.values) <= vb).all()


@pytest.mark.parametrize("scheme", kvquant.DENSE)
def test_create_fill_reopen(tmp_path, scheme):
    p = tmp_path / "b.ikv"
    cap = 200_000
    b = make_bank(p, cap, scheme)
    size = os.path.getsize(p)
    assert size <= cap and os.stat(p).st_blocks * 512 <= cap + 4096  # preallocated, not sparse
    added = []
    with b.transaction() as tx:
        for i in range(1000):
            s = slot_of(tx.add(entry(i, 5 + i % 40, f"task{i % 3}")))
            if s is None:
                break
            added.append(s)
    assert 0 < len(added) < 1000  # filled up: a normal outcome, not an error
    assert os.path.getsize(p) == size
    b.close()
    with Bank.open(p, fingerprint="toy-model") as b:
        assert len(b.slots()) == len(added)
        for s in b.slots():
            _check_entry(b, s, scheme)
        u = b.usage()
        assert u["pages_used"] * u["page_bytes"] == u["bytes_used"] <= b.geo.pages * b.geo.page_bytes
    assert verify(p)["ok"]


def test_is_valid_safetensors(tmp_path):
    from safetensors import safe_open

    p = tmp_path / "b.ikv"
    with make_bank(p) as b, b.transaction() as tx:
        tx.add(entry(1, 7))
    with safe_open(str(p), "np") as f:
        assert set(f.keys()) == set(fmt.SECTIONS)
        assert f.metadata()["format"] == fmt.FORMAT_NAME
        assert f.get_tensor("superblock").shape == (2, b.geo.superblock_bytes)


def test_short_entries_cost_less(tmp_path):
    b = make_bank(tmp_path / "b.ikv", 1 << 20, page_tokens=4)
    assert b.geo.entry_bytes(8) < 0.4 * b.geo.entry_bytes(40)  # pages, not fixed-size slots


def test_swap_replace_remove_and_ids(tmp_path):
    b = make_bank(tmp_path / "b.ikv")
    with b.transaction() as tx:
        s0 = slot_of(tx.add(entry(10, 12, "a")))
        s1 = slot_of(tx.add(entry(11, 3, "b")))
    id0 = b.entry(s0).entry_id
    with b.transaction() as tx:
        assert tx.replace(s0, entry(12, 20, "b"))
        tx.remove(s1)
    assert b.entry(s0).entry_id > id0 and seed_of(b.entry(s0).example_hash) == 12
    assert list(b.slots()) == [s0] and b.tasks() == {"a": 0, "b": 1}
    assert b.read(s1) is None and b.read(s0, entry_id=id0) is None  # swapped out: not served
    _check_entry(b, s0)


def test_abandoned_transaction_changes_nothing(tmp_path):
    b = make_bank(tmp_path / "b.ikv")
    with b.transaction() as tx:
        s = slot_of(tx.add(entry(1, 9)))
    before = (b.gen, b.entries())
    with pytest.raises(RuntimeError), b.transaction() as tx:
        tx.replace(s, entry(2, 30))
        tx.add(entry(3, 4))
        raise RuntimeError("caller failed mid-way")
    b.refresh()
    assert (b.gen, b.entries()) == before
    _check_entry(b, s)


def test_freed_space_is_reusable_only_after_commit(tmp_path):
    b = make_bank(tmp_path / "b.ikv", 120_000)
    with b.transaction() as tx:
        n = 0
        while tx.add(entry(n, 40)) is not None:
            n += 1
    full = list(b.slots())
    with b.transaction() as tx:
        tx.remove(full[0])
        assert tx.add(entry(999, 40)) is None  # the old state still owns those pages
    with b.transaction() as tx:
        assert tx.add(entry(999, 40)) is not None


def test_remove_task_anchors_and_catalog(tmp_path):
    p = tmp_path / "b.ikv"
    b = make_bank(p)
    with b.transaction() as tx:
        for i in range(6):
            tx.add(entry(i, 8, "keep" if i % 2 else "drop"))
        tx.set_anchors("drop", [{"prompt": "q", "answer": "a"}])
        tx.set_anchors("keep", [{"prompt": "k", "answer": "v"}])
    with b.transaction() as tx:
        assert tx.remove_task("drop") == 3
    assert b.tasks() == {"keep": 3} and b.anchors("drop") == [] and b.anchors("keep")[0]["answer"] == "v"
    with pytest.raises(BankError, match="not in this bank"), b.transaction() as tx:
        tx.remove_task("drop")
    with pytest.raises(BankError, match="catalog holds"), b.transaction() as tx:
        tx.set_anchors("keep", [{"prompt": "x" * 1000}] * 100)
    assert b.anchors("keep")[0]["answer"] == "v"


def test_calibration_identity_then_fitted(tmp_path, rng):
    b = make_bank(tmp_path / "b.ikv")
    x = rng.standard_normal((3, TOY["key_dim"])).astype(np.float32)
    assert b.calibration() is None and np.array_equal(b.calibrate(x), x)
    K, r = TOY["key_dim"], b.geo.calib_rank
    a, c = rng.standard_normal(K), rng.standard_normal(K)
    U, V = rng.standard_normal((K, r)), rng.standard_normal((K, r))
    with b.transaction() as tx:
        tx.set_calibration(a, c, U, V)
    np.testing.assert_allclose(b.calibrate(x), a * x + c + (x @ V) @ U.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(BankError, match="shapes"), b.transaction() as tx:
        tx.set_calibration(a, c, U[:, :2], V)


def test_cap_too_small_and_bad_entries(tmp_path):
    with pytest.raises(BankError, match="too small"):
        make_bank(tmp_path / "tiny.ikv", 20_000)
    assert not (tmp_path / "tiny.ikv").exists()
    b = make_bank(tmp_path / "b.ikv")
    with pytest.raises(BankError, match="at most 48"), b.transaction() as tx:
        tx.add(entry(1, 49))
    bad = entry(1, 4)
    with pytest.raises(BankError, match="shape"), b.transaction() as tx:
        tx.add(type(bad)(bad.keys[:1], bad.values[:1], bad.key, "t"))
    with pytest.raises(BankError, match="already exists"):
        Bank.create(tmp_path / "b.ikv", 1 << 20, scheme="int8", **TOY)


def test_second_writer_refused_and_readonly(tmp_path):
    p = tmp_path / "b.ikv"
    b = make_bank(p)
    with pytest.raises(BankError, match="being written"):
        Bank.open(p, writable=True)
    with Bank.open(p) as r, pytest.raises(BankError, match="read-only"):
        r.transaction()
    b.close()
    Bank.open(p, writable=True).close()


def test_wrong_fingerprint(tmp_path):
    make_bank(tmp_path / "b.ikv").close()
    with pytest.raises(BankError, match="another model"):
        Bank.open(tmp_path / "b.ikv", fingerprint="other")


# ---------------------------------------------------------------- hostile files

def _bank_bytes(tmp_path) -> bytes:
    p = tmp_path / "good.ikv"
    with make_bank(p, 100_000) as b, b.transaction() as tx:
        tx.add(entry(5, 10))
    return p.read_bytes()


def _header(raw: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def _with_header(raw: bytes, head: dict) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    j = json.dumps(head, separators=(",", ":")).encode()
    return raw[:8] + j + b" " * (n - len(j)) + raw[8 + n:]


def _huge_shape(raw):
    n, h = _header(raw)
    h["__metadata__"]["slots"] = str(10**9)
    h["pages"]["shape"] = [2**40, 2**20]
    return _with_header(raw, h)


def _other_format(raw):
    n, h = _header(raw)
    h["__metadata__"]["format"] = "something.else"
    return _with_header(raw, h)


def _flip_payload(raw):
    n, h = _header(raw)
    at = 8 + n + h["pages"]["data_offsets"][0] + 3
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: r[: len(r) // 2], "truncated"),
        (lambda r: r[:7], "too short"),
        (lambda r: b"\xff" * 8 + r[8:], "header length"),
        (lambda r: r[:8] + b"{not json" + r[17:], "not valid JSON"),
        (_other_format, "not an inducekv bank"),
        (_huge_shape, "bank"),
        (lambda r: r + b"\0" * 4096, "truncated or padded"),
    ],
)
def test_hostile_headers(tmp_path, damage, message):
    p = tmp_path / "bad.ikv"
    p.write_bytes(damage(_bank_bytes(tmp_path)))
    with pytest.raises(BankError, match=message):
        Bank.open(p)
    rep = verify(p)
    assert not rep["ok"] and len(rep["problems"]) == 1 and "\n" not in rep["problems"][0]


def test_flipped_payload_byte_is_caught(tmp_path):
    p = tmp_path / "bad.ikv"
    p.write_bytes(_flip_payload(_bank_bytes(tmp_path)))
    with Bank.open(p) as b, pytest.raises(BankError, match="corrupt"):
        b.read(int(b.slots()[0]))
    rep = verify(p)
    assert not rep["ok"] and "payload checksum" in rep["problems"][0]


def test_torn_superblock_falls_back_to_the_other_copy(tmp_path):
    p = tmp_path / "b.ikv"
    with make_bank(p) as b:
        with b.transaction() as tx:
            tx.add(entry(1, 5))
        old = b.entries()
        with b.transaction() as tx:
            tx.add(entry(2, 5))
        newest = b.gen % 2
        at = b.offsets["superblock"] + newest * b.geo.superblock_bytes + 20
    raw = bytearray(p.read_bytes())
    raw[at] ^= 0x01  # the newest superblock is torn: the previous state must come back
    p.write_bytes(bytes(raw))
    with Bank.open(p) as b:
        assert b.entries() == old
    assert verify(p)["ok"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 100_000)))
def test_fuzz_parser_raises_only_our_errors(tmp_path_factory, edits, cut):
    base = _FUZZ_BASE.setdefault("raw", _bank_bytes(tmp_path_factory.mktemp("fuzz")))
    raw = bytearray(base)
    for at, val in edits:
        raw[at % len(raw)] = val
    if cut is not None:
        raw = raw[: cut % len(raw)]
    p = tmp_path_factory.mktemp("f") / "x.ikv"
    p.write_bytes(bytes(raw))
    try:
        with Bank.open(p) as b:
            for s in b.slots():
                b.read(int(s))
            b.calibration()
    except BankError:
        pass
    verify(p)  # never raises


_FUZZ_BASE: dict = {}


# ---------------------------------------------------------------- property: random operation sequences

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "swap", "remove", "remove_task", "commit"]),
                              st.integers(0, 10**6), st.integers(1, 48)), min_size=1, max_size=40),
       scheme=st.sampled_from(kvquant.DENSE))
def test_random_operations_keep_invariants(tmp_path_factory, ops, scheme):
    p = tmp_path_factory.mktemp("prop") / "b.ikv"
    cap = 90_000
    b = make_bank(p, cap, scheme)
    size = os.path.getsize(p)
    tx, pending = b.transaction(), {}  # pending: slot -> seed of the entry it will hold
    for op, x, tokens in ops:
        live = sorted(pending)
        if op == "add":
            s = slot_of(tx.add(entry(x, tokens, f"t{x % 3}")))
            if s is not None:
                pending[s] = x
        elif op == "swap" and live:
            s = live[x % len(live)]
            if tx.replace(s, entry(x, tokens, f"t{x % 3}")):
                pending[s] = x
        elif op == "remove" and live:
            s = live[x % len(live)]
            tx.remove(s)
            del pending[s]
        elif op == "remove_task":
            name = f"t{x % 3}"
            if name in tx.task_names():
                tx.remove_task(name)
                pending = {s: v for s, v in pending.items() if f"t{v % 3}" != name}
        elif op == "commit":
            tx.commit()
            tx = b.transaction()
    tx.commit()
    model = pending
    assert os.path.getsize(p) == size <= cap
    b.close()
    with Bank.open(p) as b:
        assert {int(s): seed_of(b.entry(int(s)).example_hash) for s in b.slots()} == model
        for s in b.slots():
            _check_entry(b, int(s), scheme)
    assert verify(p)["ok"]


# ---------------------------------------------------------------- CLI

def test_cli_info_list_verify_remove(tmp_path):
    p = tmp_path / "b.ikv"
    with make_bank(p) as b, b.transaction() as tx:
        for i in range(4):
            tx.add(entry(i, 10, "a" if i < 3 else "b"))
    r = CliRunner()
    out = r.invoke(cli, ["info", str(p), "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["entries"] == 4 and info["tasks"] == {"a": 3, "b": 1} and info["file_bytes"] <= info["cap"]
    out = r.invoke(cli, ["list", str(p), "--json", "--task", "a"])
    assert [e["task"] for e in json.loads(out.output)["entries"]] == ["a"] * 3
    assert r.invoke(cli, ["verify", str(p)]).exit_code == 0
    out = r.invoke(cli, ["remove-task", str(p), "a", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["removed_entries"] == 3
    assert json.loads(r.invoke(cli, ["info", str(p), "--json"]).output)["tasks"] == {"b": 1}
    out = r.invoke(cli, ["remove-task", str(p), "nope"])
    assert out.exit_code == 2 and "not in this bank" in out.output
    (tmp_path / "junk.ikv").write_bytes(b"hello world, not a bank")
    out = r.invoke(cli, ["info", str(tmp_path / "junk.ikv")])
    assert out.exit_code == 2 and out.output.count("\n") == 1
    assert r.invoke(cli, ["verify", str(tmp_path / "junk.ikv")]).exit_code == 1


def test_cli_create_from_bundle(tmp_path, tiny_bundles):
    p = tmp_path / "new.ikv"
    out = CliRunner().invoke(cli, ["create", str(p), "--bundle", str(tiny_bundles["fp32"]), "--budget", "256KiB", "--json"])
    assert out.exit_code == 0, out.output
    assert os.path.getsize(p) <= 256 * 1024 == json.loads(out.output)["cap"]
    out = CliRunner().invoke(cli, ["create", str(p), "--bundle", str(tiny_bundles["fp32"]), "--budget", "lots"])
    assert out.exit_code == 2 and "byte size" in out.output


def test_read_key_matches_the_snapshot_and_follows_swaps(tmp_path):
    with make_bank(tmp_path / "b.ikv") as b:
        with b.transaction() as tx:
            a = tx.add(entry(1, 5))
        snap = b.snapshot()
        assert np.array_equal(b.read_key(a.slot, a.entry_id), snap.keys[0])
        with b.transaction() as tx:
            tx.replace(a.slot, entry(2, 5))
        assert b.read_key(a.slot, a.entry_id) is None   # swapped out: not served
