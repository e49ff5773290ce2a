"""Device profiles: the bundled targets, provider fallback with one notice, bad profiles, ikv-run --list-devices."""
from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from inducekv.core.errors import InduceKVError
from inducekv.devices import profile as prof_mod
from inducekv.devices.profile import CPU, available_profiles, describe_profiles, load_profile
from inducekv.runtime.cli import cli as run_cli

CUDA, XNN, COREML = "CUDAExecutionProvider", "XnnpackExecutionProvider", "CoreMLExecutionProvider"


@pytest.fixture()
def fresh_notices(monkeypatch):
    monkeypatch.setattr(prof_mod, "_noticed", set())


def only_cpu(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", CPU])


def test_bundled_targets():
    assert {"cpu", "rpi5", "jetson", "android", "apple"} <= set(available_profiles())
    rpi5, jetson, android, apple = (load_profile(n) for n in ("rpi5", "jetson", "android", "apple"))
    assert (rpi5.intra_op_threads, rpi5.weights, rpi5.kv_bits, rpi5.execution_providers) == (4, "int8", 4, (CPU,))
    assert jetson.execution_providers == (CUDA, CPU)
    assert android.execution_providers == (XNN, CPU)
    assert apple.execution_providers == (COREML, CPU)
    assert all(load_profile(n).description for n in available_profiles())


@pytest.mark.parametrize("name,available,uses,missing", [
    ("jetson", [CUDA, CPU], [CUDA, CPU], []),
    ("jetson", [CPU], [CPU], [CUDA]),
    ("android", [XNN, CPU], [XNN, CPU], []),
    ("apple", ["AzureExecutionProvider", CPU], [CPU], [COREML]),
    ("cpu", [CPU], [CPU], []),
])
def test_split_providers(name, available, uses, missing):
    assert load_profile(name).split_providers(available) == (uses, missing)


def test_missing_provider_falls_back_with_one_notice(monkeypatch, caplog, fresh_notices):
    only_cpu(monkeypatch)
    jetson = load_profile("jetson")
    with caplog.at_level(logging.WARNING, logger="inducekv.devices.profile"):
        for _ in range(3):  # a runtime opens several sessions (decoder, key, vision)
            assert jetson.providers() == [CPU]
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "'jetson'" in msg and CUDA in msg and f"falling back to {CPU}" in msg and "\n" not in msg


def test_runtime_on_a_missing_provider_notices_once(device_bundle, monkeypatch, caplog, fresh_notices):
    from inducekv.runtime.api import Runtime

    only_cpu(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="inducekv.devices.profile"):
        rt = Runtime.open(device_bundle, device="jetson")
        rt.generate("hi", max_new_tokens=2)
        Runtime.open(device_bundle, device="jetson")
    notices = [r for r in caplog.records if r.name == "inducekv.devices.profile"]
    assert len(notices) == 1 and CUDA in notices[0].getMessage()
    assert rt.decoder.sess.get_providers() == [CPU]


def test_provider_options_pass_through(monkeypatch, fresh_notices):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [COREML, CPU])
    assert load_profile("apple").providers() == [(COREML, {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"}), CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [XNN, CPU])
    assert load_profile("android").providers() == [(XNN, {"intra_op_num_threads": "4"}), CPU]


@pytest.mark.parametrize("body,words", [
    ('execution_providers = ["CUDAProvider", "CPUExecutionProvider"]\n', ["unknown execution provider", "CUDAProvider"]),
    ('execution_providers = []\n', ["non-empty"]),
    ('execution_providers = "CPUExecutionProvider"\n', ["execution_providers", "list"]),
    ('intra_op_threads = "4"\n', ["intra_op_threads", "integer"]),
    ('k = true\n', ["k must be an integer"]),
    ('weights = "int3"\n', ["weights", "int8"]),
    ('[provider_options.CoreMLExecutionProvider]\nModelFormat = ["x"]\n', ["provider_options.CoreMLExecutionProvider"]),
    ('[provider_options.CoreMLProvider]\nModelFormat = "MLProgram"\n', ["unknown execution provider", "CoreMLProvider"]),
    ('threads = 4\n', ["unknown keys", "threads"]),
    ('k = \n', ["cannot read device profile"]),
])
def test_bad_profiles_are_one_clear_error(tmp_path, body, words):
    p = tmp_path / "bad.toml"
    p.write_text(body)
    with pytest.raises(InduceKVError) as e:
        load_profile(p)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_profile_on_the_command_line(device_bundle, tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('execution_providers = ["GPU"]\n')
    res = CliRunner().invoke(run_cli, ["--bundle", str(device_bundle), "--prompt", "hi", "--device", str(p)])
    assert res.exit_code == 2 and res.stderr.strip().count("\n") == 0 and "unknown execution provider" in res.stderr


def test_list_devices(monkeypatch):
    only_cpu(monkeypatch)
    res = CliRunner().invoke(run_cli, ["--list-devices"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["profile", "threads", "providers,", "in"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) == set(available_profiles())
    assert "CUDA, CPU" in rows["jetson"] and rows["jetson"].split()[4] == "CPU"  # used here: the fallback
    assert lines[-1].startswith("this machine: ") and "providers Azure, CPU" in lines[-1]


def test_list_devices_json(monkeypatch):
    only_cpu(monkeypatch)
    res = CliRunner().invoke(run_cli, ["--list-devices", "--json"], catch_exceptions=False)
    obj = json.loads(res.stdout)
    assert obj["available_providers"] == ["AzureExecutionProvider", CPU] and obj["machine"]
    by_name = {r["name"]: r for r in obj["profiles"]}
    assert by_name["jetson"]["uses_here"] == [CPU] and by_name["jetson"]["missing_here"] == [CUDA]
    assert by_name == {r["name"]: r for r in describe_profiles()}


def test_run_still_requires_a_bundle():
    res = CliRunner().invoke(run_cli, ["--prompt", "hi"])
    assert res.exit_code == 2 and "Missing option '--bundle'" in res.output
