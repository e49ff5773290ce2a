"""CLI contracts: --help, JSON output, and one clear line + exit 2 on bad input."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from inducekv.export.cli import cli as export_cli
from inducekv.runtime.cli import cli as run_cli


def run(cli, args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def assert_bad_input(res, *words):
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("cli", [run_cli, export_cli])
def test_help(cli):
    res = run(cli, ["--help"])
    assert res.exit_code == 0 and "Example" in res.output


def test_run_prompt_json(tiny_bundles):
    res = run(run_cli, ["--bundle", str(tiny_bundles["fp32"]), "--prompt", "hi", "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["prompt"] == "hi" and obj["timings"]["prompt_tokens"] > 0 and obj["entries"] == []
    assert 1 <= obj["timings"]["new_tokens"] <= 4


def test_run_task_file(tiny_bundles, tmp_path):
    task = tmp_path / "q.jsonl"
    task.write_text('{"prompt": "one"}\n\n{"prompt": "two", "answer": "x"}\n')
    res = run(run_cli, ["--bundle", str(tiny_bundles["fp32"]), "--task", str(task), "--max-new-tokens", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert [json.loads(l)["prompt"] for l in res.stdout.splitlines()] == ["one", "two"]


def test_missing_bundle(tmp_path):
    assert_bad_input(run(run_cli, ["--bundle", str(tmp_path / "nope"), "--prompt", "hi"]), "not a directory", "ikv-export")


def test_truncated_decoder(tiny_bundles, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundles["fp32"], b)
    data = (b / "decoder.onnx").read_bytes()
    (b / "decoder.onnx").write_bytes(data[: len(data) // 2])
    assert_bad_input(run(run_cli, ["--bundle", str(b), "--prompt", "hi"]), "decoder.onnx", "re-export")


def test_corrupt_decoder_same_size(tiny_bundles, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundles["fp32"], b)
    size = (b / "decoder.onnx").stat().st_size
    (b / "decoder.onnx").write_bytes(b"\xff" * size)
    assert_bad_input(run(run_cli, ["--bundle", str(b), "--prompt", "hi"]), "cannot load")


def test_corrupt_manifest(tiny_bundles, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundles["fp32"], b)
    (b / "manifest.json").write_text("{not json")
    assert_bad_input(run(run_cli, ["--bundle", str(b), "--prompt", "hi"]), "manifest.json", "not valid JSON")


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(tiny_bundles, prompt):
    assert_bad_input(run(run_cli, ["--bundle", str(tiny_bundles["fp32"]), "--prompt", prompt]), "prompt is empty")


def test_over_long_prompt(tiny_bundles):
    # the tiny model has 512 positions and a byte tokenizer: 2000 characters cannot fit
    assert_bad_input(run(run_cli, ["--bundle", str(tiny_bundles["fp32"]), "--prompt", "x" * 2000]),
                     "tokens", "at most 511")


def test_prompt_and_task_are_exclusive(tiny_bundles):
    assert_bad_input(run(run_cli, ["--bundle", str(tiny_bundles["fp32"])]), "exactly one of --prompt")


def test_bad_task_line(tiny_bundles, tmp_path):
    task = tmp_path / "q.jsonl"
    task.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert_bad_input(run(run_cli, ["--bundle", str(tiny_bundles["fp32"]), "--task", str(task)]), "q.jsonl:2")


def test_image_on_text_bundle(tiny_bundles, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"not really")
    assert_bad_input(run(run_cli, ["--bundle", str(tiny_bundles["fp32"]), "--prompt", "hi", "--image", str(img)]),
                     "text-only")


def test_unknown_device_profile(tiny_bundles):
    assert_bad_input(run(run_cli, ["--bundle", str(tiny_bundles["fp32"]), "--prompt", "hi", "--device", "toaster"]),
                     "unknown device profile")


def test_export_unknown_architecture(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode"}))
    (d / "model.safetensors").write_bytes(b"")
    assert_bad_input(run(export_cli, [str(d), "-o", str(tmp_path / "out")]), "gpt_bigcode", "not supported")


def test_export_bad_model_argument(tmp_path):
    assert_bad_input(run(export_cli, [str(tmp_path / "missing"), "-o", str(tmp_path / "out")]), "neither")


def test_export_refuses_non_empty_output(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_bad_input(run(export_cli, [str(tiny_llama_dir), "-o", str(out)]), "--force")
    assert (out / "keep.txt").read_text() == "mine"
