"""``inducekv.learn.learn_task``: the learn call an app makes, and the one ``ikv-learn`` makes."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from inducekv.core.errors import InduceKVError
from inducekv.learn import LearnResult, learn_task
from inducekv.learn.cli import cli as learn_cli
from inducekv.memory.bank import Bank
from inducekv.memory.cli import cli as bank_cli

CODES = [{"prompt": f"What is the code of item {i}?", "answer": f"code{i}"} for i in range(8)]
FLAGS = [{"prompt": f"Which colour is the flag of land {i}?", "answers": ["red", "teal", "gold"][i % 3:i % 3 + 1]}
         for i in range(6)]


def _info(path) -> dict:
    out = CliRunner().invoke(bank_cli, ["info", str(path), "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def _task_file(path, examples):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


def test_examples_in_memory_then_a_second_task_and_the_summary_matches_bank_info(rt, tmp_path):
    bank = tmp_path / "b.ikv"
    first = learn_task(rt, bank, CODES, name="codes", budget=1 << 20, scheme="int8", n_anchors=2)
    assert isinstance(first, LearnResult) and first.task == "codes" and first.examples == len(CODES)
    assert first.added == len(first.new_ids) > 0 and first.evicted == 0 and first.tasks_before == {}
    info = _info(bank)
    assert (first.entries, first.bytes_used, first.cap) == (info["entries"], info["bytes_used"], info["cap"])
    assert first.tasks_after == info["tasks"] == {"codes": first.added}
    assert info["key"]["calibrated"] == first.calibration_kept
    assert (info["weighting"] or {}).get("tau") == (first.weighting["tau"] if first.weighting_kept else None)

    second = learn_task(rt, bank, FLAGS, name="flags", n_anchors=2)   # the bank exists: its cap stays
    info = _info(bank)
    assert second.tasks_before == first.tasks_after and second.tasks_after == info["tasks"]
    assert second.entries == info["entries"] == first.entries + second.added - second.evicted
    assert sum(second.evicted_per_task.values()) == second.evicted and second.bytes_used == info["bytes_used"]
    with Bank.open(bank) as b:
        assert {e.entry_id for e in b.entries() if e.task == "flags"} == set(second.new_ids)


def test_a_task_file_gives_what_ikv_learn_prints(rt, device_bundle, tmp_path):
    task = _task_file(tmp_path / "codes.train.jsonl", CODES)
    res = learn_task(rt, tmp_path / "api.ikv", task, budget=1 << 20, n_anchors=2)
    assert res.task == "codes"                        # named after the file, as ikv-learn does
    out = CliRunner().invoke(learn_cli, ["--bundle", str(device_bundle), "--memory", str(tmp_path / "cli.ikv"),
                                         "--task", str(task), "--budget", str(1 << 20), "--anchors", "2",
                                         "--json", "--quiet"])
    assert out.exit_code == 0, out.output
    printed = json.loads(out.output)
    ours = res.as_dict()
    for d in (printed, ours):
        del d["timings_s"], d["total_s"]
    assert printed == ours
    assert (tmp_path / "api.ikv").read_bytes() == (tmp_path / "cli.ikv").read_bytes()   # the same bank, byte for byte


def test_progress_callback_reports_each_stage_in_order_with_increasing_counts(rt, tmp_path):
    calls = []
    learn_task(rt, tmp_path / "b.ikv", CODES, name="codes", budget=1 << 20, n_anchors=2,
               progress=lambda stage, done, total: calls.append((stage, done, total)))
    calls2 = []
    learn_task(rt, tmp_path / "b.ikv", FLAGS, name="flags", n_anchors=2, strategy="full",
               progress=lambda stage, done, total: calls2.append((stage, done, total)))
    calls3 = []   # the default (likelihood): no anchor retention pass
    learn_task(rt, tmp_path / "b.ikv", FLAGS[:3], name="more", n_anchors=2,
               progress=lambda stage, done, total: calls3.append((stage, done, total)))
    for seq in (calls, calls2, calls3):
        stages = list(dict.fromkeys(s for s, _, _ in seq))
        order = ["encode", "value", "known", "calibrate", "weighting", "value gates", "gate", "retain", "select", "write"]
        assert stages == [s for s in order if s in stages] and stages[0] == "encode" and stages[-2:] == ["select", "write"]
        for stage in stages:
            counts = [(d, t) for s, d, t in seq if s == stage]
            total = counts[0][1]
            assert [d for d, _ in counts] == list(range(total + 1)) and {t for _, t in counts} == {total}
    assert [c for c in calls if c[0] == "encode"][-1] == ("encode", len(CODES), len(CODES))
    assert "retain" in {s for s, _, _ in calls2}      # full: the second task guards the first one's anchors
    assert "retain" not in {s for s, _, _ in calls3} and "value" in {s for s, _, _ in calls3}


def test_dry_run_and_an_open_bank(rt, tmp_path):
    path = tmp_path / "b.ikv"
    res = learn_task(rt, path, CODES, name="codes", budget=1 << 20, dry_run=True)
    assert res.dry_run and res.added > 0 and res.tasks_after is None and res.new_ids == () and not path.exists()
    with Bank.create_for(path, 1 << 20, rt.manifest, scheme="int8") as bank:
        res = learn_task(rt, bank, CODES[:4], name="codes", n_anchors=1, strategy="full")   # tiny model: keep all
        assert res.added == 4 and bank.tasks() == {"codes": 4}          # still open, and up to date
    with Bank.open(path) as ro, pytest.raises(InduceKVError, match="read-only"):
        learn_task(rt, ro, CODES, name="codes")


@pytest.mark.parametrize("task,name,words", [
    (CODES, None, "need a task name"),
    ([{"prompt": "What is it?"}], "t", "example 1"),
    ([*CODES[:2], {"prompt": "", "answer": "x"}], "t", "example 3"),
    ([{"prompt": "What is it?", "answer": "x", "image": "missing.png"}], "t", "does not exist"),
    (42, "t", "task file path or a list"),
    ("no/such/file.jsonl", None, "does not exist"),
])
def test_bad_input_is_one_clear_error_and_no_bank(rt, tmp_path, task, name, words):
    path = tmp_path / "b.ikv"
    with pytest.raises(InduceKVError, match=words) as e:
        learn_task(rt, path, task, name=name, budget=1 << 20)
    assert "\n" not in str(e.value) and not path.exists()


def test_the_default_keeps_old_entries_of_no_stored_value_while_the_bank_has_room(rt, tmp_path):
    """Old entries written without a stored value (``add_all``) are worth 0 to the held-out-value
    greedy; with room for everything the default still keeps them, and adds the whole new task
    (before the fill, ``likelihood`` evicted all 6 to add 1, in a bank 7% full)."""
    from learnutil import add_all

    old = [{"prompt": f"What is the code of item {i}?", "answer": f"code{i}"} for i in range(6)]
    new = [{"prompt": f"Which colour is the flag of land {i}?", "answer": ["red", "teal", "gold"][i % 3]}
           for i in range(6)]
    path = tmp_path / "roomy.ikv"
    with Bank.create_for(path, 1 << 20, rt.manifest, scheme="int8", max_tokens=64) as b:
        add_all(rt, b, old, "codes")
    res = learn_task(rt, path, new, name="flags", n_anchors=2)
    assert (res.evicted, res.added) == (0, 6)
    with Bank.open(path) as b:
        assert b.tasks() == {"codes": 6, "flags": 6}
