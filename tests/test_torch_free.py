"""The device side imports and generates with torch and transformers unavailable."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"torch", "transformers", "optimum", "accelerate", "onnx"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
""")

SCRIPT = BLOCKER + textwrap.dedent("""
    import json
    from inducekv.runtime import Runtime
    rt = Runtime.open(sys.argv[1])
    r = rt.generate("Hello there", max_new_tokens=5, ignore_eos=True)
    from inducekv.runtime.api import Result
    res = Result("", [], "length")
    pieces = list(rt.stream("Hello there", max_new_tokens=5, ignore_eos=True, result=res))
    import inducekv.runtime.cli, inducekv.devices.profile, inducekv.runtime.tasks
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    # random byte-level tokens: the stream holds back a trailing incomplete UTF-8 character
    same = res.token_ids == r.token_ids and r.text.startswith("".join(pieces)) and res.text == r.text
    print(json.dumps({"tokens": len(r.token_ids), "stream": same, "heavy": heavy}))
""")


def test_runtime_runs_without_torch(device_bundle):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(device_bundle)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"tokens": 5, "stream": True, "heavy": []}


LEARN_SCRIPT = BLOCKER + textwrap.dedent("""
    import json, tempfile
    from pathlib import Path
    from inducekv.runtime import Runtime
    from inducekv.learn import absorb, open_or_create, read_examples
    import inducekv.memory.cli, inducekv.learn.cli, inducekv.runtime.eval_cli
    d = Path(tempfile.mkdtemp())
    (d / "t.jsonl").write_text('{"prompt": "Capital of Vexland?", "answer": "Morrow"}\\n'
                               '{"prompt": "Colour of a zibble?", "answer": "teal"}\\n')
    rt = Runtime.open(sys.argv[1])
    with open_or_create(d / "b.ikv", rt, 200_000, "int8", max_tokens=96) as bank:
        plan = absorb(rt, bank, read_examples(d / "t.jsonl"), "facts", n_anchors=1, strategy="full")   # keep both
    r = Runtime.open(sys.argv[1], memory=d / "b.ikv").generate("Capital of Vexland?", max_new_tokens=3, k=1)
    mem = rt.open_memory(d / "b.ikv")                      # memory chosen per call
    r2 = rt.generate("Capital of Vexland?", max_new_tokens=3, k=1, memory=mem)
    prep = rt.prepare("Capital of Vexland?", k=1, memory=mem)
    from inducekv.runtime.api import Result
    res = Result("", [], "length")
    list(rt.decode(prep, max_new_tokens=3, result=res))
    with open_or_create(d / "c.ikv", rt, 200_000, "k4v4", max_tokens=96) as bank:   # compacted entries (probe graph)
        cplan = absorb(rt, bank, read_examples(d / "t.jsonl"), "facts", n_anchors=1, compact="genv", slots=10,
                       strategy="full")
    rc = rt.generate("Capital of Vexland?", max_new_tokens=3, k=1, memory=rt.open_memory(d / "c.ikv"))
    with open_or_create(d / "p.ikv", rt, 200_000, "k4v4s", max_tokens=96) as bank:  # per-layer slot maps (default)
        pplan = absorb(rt, bank, read_examples(d / "t.jsonl"), "facts", n_anchors=1, strategy="full")
    rp = rt.generate("Capital of Vexland?", max_new_tokens=3, k=2, memory=rt.open_memory(d / "p.ikv"))
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"added": len(plan.add), "entries": len(r.entries), "same": r2.token_ids == r.token_ids == res.token_ids,
                      "compact_tokens": sorted({e["tokens"] for e in rc.entries}), "heavy": heavy,
                      "perlayer": [pplan.compaction.method, len(rp.entries) > 0]}))
""")


def test_learn_and_serve_memory_without_torch(device_bundle):
    out = subprocess.run([sys.executable, "-c", LEARN_SCRIPT, str(device_bundle)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"added": 2, "entries": 1, "same": True, "compact_tokens": [10], "heavy": [],
                      "perlayer": ["perlayer", True]}


def test_blocker_really_blocks():
    out = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert out.returncode != 0 and "blocked" in out.stderr
