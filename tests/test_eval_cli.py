"""ikv-eval: JSON report, summary table, deterministic scores, one clear line + exit 2 on bad input."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from inducekv.runtime.eval_cli import cli as eval_cli
from inducekv.runtime.scoring import normalize

PROMPTS = ["one", "two", "hi"]


def run(args):
    return CliRunner().invoke(eval_cli, args, catch_exceptions=False)


def write_task(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(bundle, task, *extra):
    res = run(["--bundle", str(bundle), "--task", str(task), "--max-new-tokens", "8", "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def assert_bad_input(res, *words):
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: "), err
    for w in words:
        assert w in err, err


def test_help():
    res = run(["--help"])
    assert res.exit_code == 0 and "Example" in res.output and "whole words" in res.output


def test_json_report(tiny_bundles, tmp_path):
    task = write_task(tmp_path / "t.jsonl", [{"prompt": p, "answer": "Morrow"} for p in PROMPTS[:2]]
                      + [{"prompt": PROMPTS[2], "answers": ["red", "blue"]}])
    obj = evaluate(tiny_bundles["fp32"], task)
    assert obj["n"] == 3 and isinstance(obj["n"], int)
    assert obj["accuracy"] == 0.0 and obj["exact"] == 0.0  # the random tiny model says gibberish
    assert isinstance(obj["accuracy"], float) and isinstance(obj["exact"], float)
    assert isinstance(obj["median_ttft_ms"], float) and obj["median_ttft_ms"] > 0
    rows = obj["examples"]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["line"] for r in rows] == [1, 2, 3]
    assert rows[2]["answers"] == ["red", "blue"]
    for r in rows:
        assert isinstance(r["generated"], str) and "\n" not in r["generated"]
        assert r["correct"] is False and r["exact"] is False and r["entries"] == []


def test_scores_follow_the_model(tiny_bundles, tmp_path):
    """Use the model's own greedy first lines as answers: all correct; break one: 2/3."""
    bundle = tiny_bundles["fp32"]
    probe = evaluate(bundle, write_task(tmp_path / "p.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS]))
    lines = [r["generated"] for r in probe["examples"]]
    assert all(normalize(line) for line in lines), lines
    task = write_task(tmp_path / "t.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, lines)])
    obj = evaluate(bundle, task)
    assert (obj["accuracy"], obj["exact"], obj["n"]) == (1.0, 1.0, 3)
    rows = [{"prompt": p, "answers": ["nope", a]} for p, a in zip(PROMPTS, lines)]
    rows[1]["answers"] = ["nope"]
    obj = evaluate(bundle, write_task(tmp_path / "m.jsonl", rows))
    assert obj["accuracy"] == pytest.approx(2 / 3) and obj["exact"] == pytest.approx(2 / 3)
    assert [r["correct"] for r in obj["examples"]] == [True, False, True]


def test_summary_table(tiny_bundles, tmp_path):
    task = write_task(tmp_path / "t.jsonl", [{"prompt": "one", "answer": "Morrow"}])
    res = run(["--bundle", str(tiny_bundles["fp32"]), "--task", str(task), "--max-new-tokens", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    for word in ("n            1", "accuracy     0.000  (0/1)", "exact        0.000  (0/1)", "median TTFT"):
        assert word in res.stdout, res.stdout


def test_missing_task_file(tiny_bundles, tmp_path):
    assert_bad_input(run(["--bundle", str(tiny_bundles["fp32"]), "--task", str(tmp_path / "nope.jsonl")]),
                     "nope.jsonl", "does not exist")


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "two"', ["t.jsonl:2", "not valid JSON"]),
    ('{"prompt": "two"}', ["t.jsonl:2", "missing \"answer\""]),
])
def test_bad_task_line(tiny_bundles, tmp_path, line, words):
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "one", "answer": "a"}\n' + line + "\n")
    assert_bad_input(run(["--bundle", str(tiny_bundles["fp32"]), "--task", str(task)]), *words)


def test_empty_task_file(tiny_bundles, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text("\n")
    assert_bad_input(run(["--bundle", str(tiny_bundles["fp32"]), "--task", str(task)]), "no examples")


def test_missing_bundle(tmp_path):
    task = write_task(tmp_path / "t.jsonl", [{"prompt": "one", "answer": "a"}])
    assert_bad_input(run(["--bundle", str(tmp_path / "nope"), "--task", str(task)]), "nope")


def test_missing_memory(tiny_bundles, tmp_path):
    task = write_task(tmp_path / "t.jsonl", [{"prompt": "one", "answer": "a"}])
    assert_bad_input(run(["--bundle", str(tiny_bundles["fp32"]), "--memory", str(tmp_path / "bank.ikv"),
                          "--task", str(task)]), "bank.ikv")
