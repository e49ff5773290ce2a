"""benchmarks/continual/seeds.py: the table over seeds pairs differences and pools the
do-no-harm column (questions the bare model answers)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "continual_seeds", Path(__file__).resolve().parents[1] / "benchmarks" / "continual" / "seeds.py")
seeds = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(seeds)


def _run(zero_hits, rows):
    cap = str(2 ** 21)
    return {"tasks": ["a", "b"], "zero-shot": {"final_avg": 0.25, "final_hits": zero_hits, "matrix": [[0.0, None], [0.0, 0.5]]},
            "caps": {cap: {m: {"final_avg": avg, "final_hits": hits, "matrix": [[1.0, None], [avg, avg]]}
                           for m, (avg, hits) in rows.items()}}}


def test_known_is_pooled_over_seeds_and_differences_are_paired():
    runs = {
        0: _run({"a": [1, 0], "b": [0, 1]}, {"inducekv": (0.5, {"a": [1, 1], "b": [0, 0]}),
                                             "random": (0.25, {"a": [0, 1], "b": [1, 1]}),
                                             "fifo": (0.0, {"a": [0, 0], "b": [0, 0]})}),
        1: _run({"a": [1, 1], "b": [0, 0]}, {"inducekv": (0.75, {"a": [1, 1], "b": [1, 1]}),
                                             "random": (0.5, {"a": [1, 0], "b": [0, 0]}),
                                             "fifo": (0.25, {"a": [0, 0], "b": [1, 0]}),
                                             "inducekv-no-gate": (1.0, {"a": [0, 0], "b": [1, 1]})}),
    }
    lines = seeds.table(runs)
    row = {line.split(" | ")[1]: line.split(" | ") for line in lines[2:]}
    assert row["zero-shot"][-1].strip(" |") == "1.00 (4)"
    # inducekv: known questions (seed 0: a0, b1; seed 1: a0, a1) answered 1, 0, 1, 1
    assert row["inducekv"][-1].strip(" |") == "0.75 (4)"
    assert row["inducekv"][6] == "+0.250 (+0.250..+0.250)" and row["inducekv"][7] == "+0.500 (+0.500..+0.500)"
    # a method run on seed 1 only: its difference and its known column use seed 1 alone
    assert row["inducekv-no-gate"][2] == "-" and row["inducekv-no-gate"][6] == "+0.500 (+0.500..+0.500)"
    assert row["inducekv-no-gate"][-1].strip(" |") == "0.00 (2)"
