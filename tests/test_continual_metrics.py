"""The continual benchmark's metrics (benchmarks/continual/run.py) on hand-made matrices."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "continual"))
run = pytest.importorskip("run")


def test_metrics_of_a_known_matrix():
    m = [[0.8, None, None],
         [0.6, 0.9, None],
         [0.4, 0.9, 0.5]]
    r = run.metrics(m)
    assert r["final_avg"] == pytest.approx((0.4 + 0.9 + 0.5) / 3)
    assert r["avg_incremental"] == pytest.approx((0.8 + 0.75 + 0.6) / 3)
    assert r["forgetting"] == pytest.approx(((0.8 - 0.4) + (0.9 - 0.9)) / 2)
    assert r["bwt"] == pytest.approx(((0.4 - 0.8) + (0.9 - 0.9)) / 2)


def test_no_forgetting_when_nothing_drops():
    r = run.metrics([[0.5, None], [0.7, 1.0]])
    assert r["forgetting"] == pytest.approx(-0.2) and r["bwt"] == pytest.approx(0.2)
    assert run.metrics([[0.3]])["forgetting"] == 0.0


def _results(caps, methods, seed=0):
    seq = {"tasks": ["a"], "n_train": 4, "n_test": 2, "wall_s": 1.0,
           "caps": {str(c): {m: {"final_avg": 0.5} for m in methods} for c in caps}}
    return {"seed": seed, "quick": False, "caps": list(caps), "sequences": {"value": seq}, "wall_s": 1.0}


def test_merge_lays_a_rerun_of_some_caps_over_the_earlier_results():
    old = _results([2, 4, 16], ["inducekv", "random"])
    new = _results([2, 4], ["inducekv"])
    new["sequences"]["value"]["caps"]["2"]["inducekv"]["final_avg"] = 0.75
    got = run.merge(old, new)
    assert got["caps"] == [2, 4, 16]
    per = got["sequences"]["value"]["caps"]
    assert per["2"]["inducekv"]["final_avg"] == 0.75 and per["16"]["inducekv"]["final_avg"] == 0.5
    assert set(per["2"]) == {"inducekv", "random"}
    with pytest.raises(SystemExit, match="caps"):
        run.merge(_results([2], ["random"]), _results([2, 8], ["inducekv"]))
    with pytest.raises(SystemExit, match="seed"):
        run.merge(_results([2], ["random"]), _results([2], ["inducekv"], seed=1))
