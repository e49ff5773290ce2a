"""``examples/kiosk.py`` driven by a script on the tiny bundle, with torch and transformers blocked."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from inducekv.memory.bank import Bank
from test_torch_free import BLOCKER

KIOSK = Path(__file__).resolve().parents[1] / "examples" / "kiosk.py"
RUN = BLOCKER + textwrap.dedent("""
    import runpy
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")
SCRIPT = """\
# comments and blank lines are skipped

What is the code of item 3?
!fix code3
!wait
What is the code of item 3?
!fix
!bogus
What is the code of item 5?
!fix code5
"""


def _kiosk(bundle, bank, script: Path, *extra):
    out = subprocess.run([sys.executable, "-c", RUN, str(KIOSK), "--bundle", str(bundle), "--memory", str(bank),
                          "--script", str(script), "--json", "--budget", "1MiB", "--max-new-tokens", "4", *extra],
                         capture_output=True, text=True, timeout=300)
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()], out.stderr


@pytest.mark.parametrize("mode", ["background", "inline"])
def test_kiosk_answers_learns_corrections_and_keeps_serving(device_bundle, tmp_path, mode):
    script = tmp_path / "session.txt"
    script.write_text(SCRIPT, encoding="utf-8")
    bank = tmp_path / "kiosk.ikv"
    rc, lines, err = _kiosk(device_bundle, bank, script, *(["--inline"] if mode == "inline" else []))
    assert rc == 0, err
    kinds = [next(iter(o)) for o in lines]
    assert kinds == ["question", "learned", "question", "error", "error", "question", "learned"], lines
    first, learned, again, no_answer, bogus, other, last = lines
    assert first["entries"] == []                                     # a new, empty bank
    assert learned["learned"] == {"prompt": "What is the code of item 3?", "answer": "code3"} and learned["entries"] == 1
    assert [e["task"] for e in again["entries"]] == ["corrections"]   # the correction is served
    assert "ANSWER" in no_answer["error"] and "unknown command !bogus" in bogus["error"]
    assert last["learned"]["answer"] == "code5" and last["entries"] == 2   # pending work finished before exit
    with Bank.open(bank) as b:
        assert b.tasks() == {"corrections": 2}


def test_kiosk_bad_input_is_one_line(device_bundle, tmp_path):
    script = tmp_path / "s.txt"
    script.write_text("!fix too early\n", encoding="utf-8")
    rc, lines, _ = _kiosk(device_bundle, tmp_path / "k.ikv", script)
    assert rc == 0 and lines == [{"error": "!fix needs a question first"}]
    rc, lines, err = _kiosk(tmp_path / "nope", tmp_path / "k2.ikv", script)
    assert rc == 2 and lines == [] and err.startswith("Error: ") and len(err.strip().splitlines()) == 1
    rc, lines, err = _kiosk(device_bundle, tmp_path / "k3.ikv", tmp_path / "missing.txt")
    assert rc == 2 and "missing.txt" in err and len(err.strip().splitlines()) == 1
