"""Progress off a terminal (plain lines, not silence) and a quiet ikv-export."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings

from tqdm import tqdm

from inducekv.core import cli as core_cli
from inducekv.core.cli import PlainProgress, progress_enabled


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def bar_lines(steps: int, seconds_per_step: float, interval: float = 10.0, **kw) -> list[str]:
    """Drive a real tqdm bar through PlainProgress with a fake clock; the lines it printed."""
    out, clock = io.StringIO(), Clock()
    stream = PlainProgress(out, interval=interval, clock=clock)
    bar = tqdm(total=steps, file=stream, mininterval=0, **kw)
    for _ in range(steps):
        clock.t += seconds_per_step
        bar.update()
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text and "|" not in text
    return text.splitlines()


def test_a_quick_bar_prints_only_its_completion():
    lines = bar_lines(5, 0.1, desc="ikv-eval", unit="example")
    assert len(lines) == 1 and lines[0].startswith("ikv-eval: 100% 5/5 [")


def test_a_long_bar_prints_every_interval_and_at_the_end():
    lines = bar_lines(20, 3.0, desc="encode", unit="ex")  # 60 s, a line every >= 10 s
    counts = [line.split(" [")[0].split()[-1] for line in lines]
    assert counts == ["4/20", "8/20", "12/20", "16/20", "20/20"]
    assert all(line.startswith("encode: ") for line in lines)


def test_a_bar_that_fails_early_prints_nothing_and_text_passes_through():
    out, clock = io.StringIO(), Clock()
    stream = PlainProgress(out, clock=clock)
    bar = tqdm(total=7, file=stream, mininterval=0, desc="ikv-export")
    clock.t += 1
    bar.update()
    stream.write("Error: something is wrong")
    stream.write("\n")
    assert out.getvalue() == "Error: something is wrong\n"
    bar.disable = True  # never closed, as when an exception ends the command


def test_bars_without_description_and_nested_bars():
    out, clock = io.StringIO(), Clock()
    stream = PlainProgress(out, interval=1.0, clock=clock)
    outer = tqdm(total=3, file=stream, mininterval=0)  # left open: the next bar is drawn one row down
    inner = tqdm(total=2, file=stream, mininterval=0, desc="inner")
    for _ in range(2):
        clock.t += 2
        inner.update()
    inner.close()
    first, last = out.getvalue().splitlines()
    assert first.startswith("inner:  50% 1/2 [") and last.startswith("inner: 100% 2/2 [")
    outer.disable = True


def test_progress_enabled_wraps_a_non_terminal_stderr_once(monkeypatch):
    fake = io.StringIO()
    monkeypatch.setattr(sys, "stderr", fake)
    assert progress_enabled(quiet=True) is False and sys.stderr is fake
    assert progress_enabled(quiet=False) is True
    wrapped = sys.stderr
    assert isinstance(wrapped, PlainProgress) and wrapped.stream is fake and not wrapped.isatty()
    assert progress_enabled(quiet=False) is True and sys.stderr is wrapped


def test_progress_enabled_leaves_a_terminal_alone(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert progress_enabled(quiet=False) is True and sys.stderr is tty


def _eval(bundle, task, *extra):
    code = "from inducekv.runtime.eval_cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, "--bundle", str(bundle), "--task", str(task),
                           "--max-new-tokens", "2", "--json", *extra], capture_output=True, text=True, timeout=300)


def test_ikv_eval_in_a_log_prints_plain_progress_lines(device_bundle, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "a"}) + "\n" for i in range(3)))
    out = _eval(device_bundle, task)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["n"] == 3
    assert "\r" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("ikv-eval")]
    assert len(lines) == 1 and lines[0].startswith("ikv-eval: 100% 3/3 [")  # quicker than one interval
    quiet = _eval(device_bundle, task, "--quiet")
    assert quiet.returncode == 0 and "ikv-eval" not in quiet.stderr


def test_interval_is_seconds_not_minutes():
    assert 1 <= core_cli.PLAIN_PROGRESS_INTERVAL_S <= 60


def test_ikv_export_is_quiet_by_default(tiny_llama_dir, tmp_path):
    code = "from inducekv.export.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code, str(tiny_llama_dir), "-o", str(tmp_path / "b"), "--no-validate"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stderr.splitlines() if not line.startswith("ikv-export: ")] == [], out.stderr
    assert "ikv-export: 100% 7/7" in out.stderr


def test_export_loads_with_dtype_not_the_deprecated_torch_dtype(tiny_llama_dir, monkeypatch):
    """transformers 4.57 logs "`torch_dtype` is deprecated! Use `dtype` instead!" for the old name."""
    import torch
    import transformers

    from inducekv.export import source

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = source.load(source.resolve(str(tiny_llama_dir)))
    assert seen.get("dtype") is torch.float32 and "torch_dtype" not in seen
    assert next(model.parameters()).dtype == torch.float32


def test_quiet_libraries_hides_and_restores():
    import transformers.modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as hf_logging

    from inducekv.export.cli import quiet_libraries

    level, bar = hf_logging.get_verbosity(), gguf.tqdm
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            assert hf_logging.get_verbosity() == hf_logging.ERROR and gguf.tqdm is not bar
            warnings.warn_explicit("old", FutureWarning, "x.py", 1, module="transformers.configuration_utils")
            warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="inducekv.export.build")
    assert [str(w.message) for w in seen] == ["ours"]
    assert hf_logging.get_verbosity() == level and gguf.tqdm is bar
