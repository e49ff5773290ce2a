"""Inner level of the bilevel selection: which entries to keep under the byte cap.

Old entries and new candidates compete for the same bytes. The objective of a kept
set S (all terms are per entry, in nats of answer log-likelihood or in similarity)::

    f(S) = w_lik * sum(gain_e, e in S)            current-task (and stored old-task) likelihood gain
         + w_ret * sum(retention_e, e in S)       anchors of old tasks that retrieve e and gain from it
         + w_cov * mean_x max_{e in S} sim(x, e)  facility-location coverage of all keys x

maximised by a budgeted lazy greedy on marginal value per byte (the cost-benefit
greedy for submodular knapsacks), with a second budget on the bytes of *new* entries:
a commit can only write into space that is free before it (see memory/txn.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES = ("full", "likelihood", "coverage", "no-anchors", "random", "fifo")


@dataclass(frozen=True)
class Weights:
    lik: float = 1.0    # likelihood gain (nats/token of the answer)
    ret: float = 1.0    # retention gain on old tasks' anchors
    cov: float = 2.0    # coverage (mean best cosine over all keys, in [0, 1])


def weights_for(strategy: str, base: Weights) -> Weights:
    return {"full": base, "likelihood": Weights(base.lik, 0.0, 0.0), "coverage": Weights(0.0, 0.0, base.cov or 1.0),
            "no-anchors": Weights(base.lik, 0.0, base.cov)}.get(strategy, base)


@dataclass
class Pool:
    nbytes: np.ndarray     # (n,) bytes each item takes from the cap
    gain: np.ndarray       # (n,) likelihood gain
    retention: np.ndarray  # (n,) anchor retention gain (0 for new candidates)
    keys: np.ndarray       # (n, K) retrieval keys
    is_new: np.ndarray     # (n,) bool
    age: np.ndarray        # (n,) larger = older (FIFO evicts the oldest first)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)  # keys share a large common direction: center before cosine
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def select(pool: Pool, budget: int, new_budget: int, strategy: str = "full", weights: Weights = Weights(),
           seed: int = 0) -> np.ndarray:
    """Indices of the kept items: total bytes <= budget and new bytes <= new_budget."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    n = len(pool.nbytes)
    rng = np.random.default_rng(seed)
    if strategy in ("random", "fifo"):
        order = rng.permutation(n) if strategy == "random" else np.lexsort((rng.random(n), pool.age))
        return _fill(order, pool, budget, new_budget)
    w = weights_for(strategy, weights)
    unit = _unit(pool.keys.astype(np.float64))
    sim = np.clip(unit @ unit.T, 0.0, None)                                   # (n, n)
    best = np.zeros(n)                                                        # current max sim of each key to S
    base = w.lik * pool.gain + w.ret * pool.retention                         # (n,)
    chosen, used, used_new = [], 0, 0
    alive = np.ones(n, bool)
    # lazy greedy: upper bounds from the last evaluation (coverage gains only shrink)
    bound = (base + w.cov * np.maximum(sim - best[None, :], 0).sum(axis=1) / n) / pool.nbytes
    while alive.any():
        i = int(np.argmax(np.where(alive, bound, -np.inf)))
        gain_i = base[i] + w.cov * np.maximum(sim[i] - best, 0).sum() / n
        ratio = gain_i / pool.nbytes[i]
        others = np.where(alive, bound, -np.inf)
        others[i] = -np.inf
        if ratio < others.max() - 1e-12:  # stale bound: refresh and retry
            bound[i] = ratio
            continue
        alive[i] = False
        if gain_i <= 0:
            continue
        fits = used + pool.nbytes[i] <= budget and (not pool.is_new[i] or used_new + pool.nbytes[i] <= new_budget)
        if fits:
            chosen.append(i)
            used += int(pool.nbytes[i])
            used_new += int(pool.nbytes[i]) if pool.is_new[i] else 0
            best = np.maximum(best, sim[i])
    return np.array(sorted(chosen), dtype=np.int64)


def _fill(order: np.ndarray, pool: Pool, budget: int, new_budget: int) -> np.ndarray:
    chosen, used, used_new = [], 0, 0
    for i in order:
        b = int(pool.nbytes[i])
        if used + b <= budget and (not pool.is_new[i] or used_new + b <= new_budget):
            chosen.append(int(i))
            used += b
            used_new += b if pool.is_new[i] else 0
    return np.array(sorted(chosen), dtype=np.int64)
