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
