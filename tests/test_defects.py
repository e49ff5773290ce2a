"""One test per defect found in review (each failed before its fix)."""
from __future__ import annotations

import itertools
import json
import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner

from inducekv.core.errors import BankError, InduceKVError, PromptError
from inducekv.learn import plan, select as sel, write
from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
from bankutil import entry, make_bank
from learnutil import add_all

FACTS = [{"prompt": f"What is the code of item {i}?", "answer": f"code{i}"} for i in range(6)]


def _task(path, n=4):
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS[:n]))
    return path


# 1. the slot limit is a constraint inside selection, not a cut of an index-sorted list
@pytest.mark.parametrize("strategy", sel.STRATEGIES)
def test_slot_limit_is_inside_selection(strategy):
    n = 6
    pool = sel.Pool(nbytes=np.full(n, 1000.0), gain=np.array([0.1, 0.1, 0.1, 0.1, 5.0, 6.0]), retention=np.zeros(n),
                    keys=np.eye(n), is_new=np.ones(n, bool), age=np.zeros(n), task=np.zeros(n, np.int64))
    chosen = sel.select(pool, 10_000, 10_000, strategy, max_items=2)
    assert len(chosen) == 2
    if strategy in ("full", "likelihood", "likelihood-fill"):
        assert chosen.tolist() == [4, 5]  # the two best, although they come last


def test_plan_never_exceeds_the_slots(tiny_rt, tmp_path):
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, tiny_rt.manifest, scheme="int8", max_tokens=64) as b:
        slots = b.geo.slots
        examples = [{"prompt": f"Code of thing {i}?", "answer": f"c{i}"} for i in range(slots + 3)]
        p = plan(tiny_rt, b, examples, "t", n_anchors=0, reserve=0.0)
        assert len(p.add) + len(p.keep_old) <= slots
        write(b, p)
        assert len(b.slots()) == len(p.add)


# 2. ikv-bank create goes through Bank.create_for: a bundle without a key graph is refused
def test_bank_create_refuses_a_bundle_without_key_graph(device_bundle, tmp_path):
    from inducekv.memory.cli import cli

    bundle = tmp_path / "nokey"
    shutil.copytree(device_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["retrieval_key"] = None
    (bundle / "manifest.json").write_text(json.dumps(m))
    out = CliRunner().invoke(cli, ["create", str(tmp_path / "b.ikv"), "--bundle", str(bundle), "--budget", "1MiB"])
    assert out.exit_code == 2 and "retrieval-key" in out.output and len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "b.ikv").exists()
    ok = CliRunner().invoke(cli, ["create", str(tmp_path / "c.ikv"), "--bundle", str(device_bundle),
                                  "--budget", "1MiB", "--json"])
    assert ok.exit_code == 0, ok.output
    rt = Runtime.open(device_bundle, memory=tmp_path / "c.ikv")  # a bank serving accepts
    assert rt.memory.bank.geo.key_dim == rt.manifest.retrieval_key["dim"]


# 3. bad input gives one line and exit 2, not a traceback
def test_bad_default_budget_in_a_profile_is_one_line(device_bundle, tmp_path):
    from inducekv.devices.profile import load_profile
    from inducekv.learn.cli import cli

    prof = tmp_path / "p.toml"
    prof.write_text('default_budget = "lots"\n')
    with pytest.raises(InduceKVError, match="default_budget"):
        load_profile(prof)
    out = CliRunner().invoke(cli, ["--bundle", str(device_bundle), "--memory", str(tmp_path / "b.ikv"),
                                   "--task", str(_task(tmp_path / "t.jsonl")), "--device", str(prof)])
    assert out.exit_code == 2 and "default_budget" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "b.ikv").exists()


def test_unstorable_entry_is_one_line(device_bundle, tmp_path, monkeypatch):
    from inducekv.learn.cli import cli
    from inducekv.runtime.memory import Layout

    real = Layout.encode_entries

    def broken(self, *a, **kw):
        return [(k, np.full_like(v, np.inf)) for k, v in real(self, *a, **kw)]

    monkeypatch.setattr(Layout, "encode_entries", broken)   # the dense path (perlayer encodes through its probe)
    out = CliRunner().invoke(cli, ["--bundle", str(device_bundle), "--memory", str(tmp_path / "b.ikv"),
                                   "--task", str(_task(tmp_path / "t.jsonl")), "--budget", "1MiB", "--quiet",
                                   "--compact", "none"])
    assert out.exit_code == 2 and "cannot be stored" in out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)


# 4. a read racing commits forever is retried a bounded number of times, then a clear error
def test_racing_reads_are_bounded(tmp_path, monkeypatch):
    b = make_bank(tmp_path / "b.ikv")
    with b.transaction() as tx:
        tx.add(entry(1, 5))
    # the superblock looks stable across the record read, then a commit lands before the
    # record's checksum is re-checked: 10, 10, 11, 11, 11, 12, ... (every attempt races)
    gens = (g + (i == 2) for g in itertools.count(10) for i in range(3))
    real = Bank._superblock

    def racing(self):
        sb, copy = real(self)
        sb.gen = next(gens)
        return sb, copy

    monkeypatch.setattr(Bank, "_superblock", racing)
    monkeypatch.setattr(Bank, "_record_ok", lambda self, raw: False)
    with pytest.raises(BankError, match="changed on every read"):
        b.reload()
    monkeypatch.undo()
    b.close()


# 5. chat=False with memory is refused, not ignored; the prefix prefill is its own timing
def test_chat_false_with_memory_is_refused(tiny_rt, device_bundle, tmp_path):
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, tiny_rt.manifest, scheme="int8", max_tokens=64) as b:
        add_all(tiny_rt, b, FACTS[:2], "t")
    rt = Runtime.open(device_bundle, memory=tmp_path / "b.ikv")
    with pytest.raises(PromptError, match="chat=False"):
        rt.generate("hello", chat=False, max_new_tokens=1)
    assert rt.generate("hello", chat=False, use_memory=False, max_new_tokens=1, ignore_eos=True).token_ids


def test_prefix_prefill_is_not_tokenize_time(device_bundle, tmp_path, monkeypatch):
    from inducekv.runtime import memory as rm

    rt0 = Runtime.open(device_bundle)
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, rt0.manifest, scheme="int8", max_tokens=64) as b:
        add_all(rt0, b, FACTS[:2], "t")
    real = rm.Layout.__init__

    def slow(self, *a, **kw):
        time.sleep(0.3)
        real(self, *a, **kw)

    monkeypatch.setattr(rm.Layout, "__init__", slow)
    rt = Runtime.open(device_bundle, memory=tmp_path / "b.ikv")
    first = rt.generate("What is the code of item 1?", max_new_tokens=1, k=1).timings
    again = rt.generate("What is the code of item 1?", max_new_tokens=1, k=1).timings
    assert first.prefix_ms >= 300 and first.tokenize_ms < 200
    assert again.prefix_ms < 100  # cached after the first call


# 6. weight quantization is checked
def test_quantization_that_does_nothing_is_caught(monkeypatch):
    from onnx import TensorProto, helper, numpy_helper

    from inducekv.export import build, quantize

    def model():  # y = x @ w, w a constant float weight (the quantizer edits its input in place)
        w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])

    packed = build.quantize_weights_checked(model(), "int8")
    assert [n.op_type for n in packed.graph.node] == ["MatMulNBits"]
    monkeypatch.setattr(quantize, "quantize_weights", lambda m, weights: m)
    with pytest.raises(InduceKVError, match="left all 1 MatMul"):
        build.quantize_weights_checked(model(), "int8")


# the public transaction API: add returns the slot and the entry id
def test_add_returns_slot_and_entry_id(tmp_path):
    with make_bank(tmp_path / "b.ikv") as b:
        with b.transaction() as tx:
            first = tx.add(entry(1, 5))
            second = tx.add(entry(2, 5))
        assert second.entry_id == first.entry_id + 1
        assert b.entry(first.slot).entry_id == first.entry_id and b.entry(second.slot).entry_id == second.entry_id
        snap = b.snapshot()
        assert [e.entry_id for e in snap.entries] == sorted([first.entry_id, second.entry_id])
        assert snap.keys.shape == (2, b.geo.key_dim) and snap.next_entry_id == second.entry_id + 1


def test_write_refuses_a_stale_plan(tiny_rt, tmp_path):
    with Bank.create_for(tmp_path / "b.ikv", 1 << 20, tiny_rt.manifest, scheme="int8", max_tokens=64) as b:
        p = plan(tiny_rt, b, FACTS[:3], "a", n_anchors=1)
        add_all(tiny_rt, b, FACTS[3:], "b")  # another commit in between
        with pytest.raises(BankError, match="plan again"):
            write(b, p)


@pytest.fixture(scope="module")
def tiny_rt(device_bundle):
    return Runtime.open(device_bundle)
