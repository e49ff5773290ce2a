"""Inner level of the bilevel selection: which entries to keep under the byte cap.

Old entries and new candidates compete for the same bytes. The objective of a kept
set S (all terms are per entry, in nats of answer log-likelihood or in similarity)::

    f(S) = sum_t sqrt(sum(w_lik * v_e + w_ret * retention_e / g_t, e in S of task t))
         + w_cov * mean_x max_{e in S} sim(x, e)    facility-location coverage of all keys x
                                                    (of a seeded sample of COVER_POINTS keys in bigger pools)
    v_e  = min(gain_e / g_t, SATURATE)              the gain in units of its task's typical gain

gain: the likelihood gain (new and stored old); retention: what anchors of old tasks
that retrieve e gain from it. With ``Pool.served`` (``value.py``) a task's new candidates
are valued by the held-out queries they serve instead of their own gains: the task's
likelihood term is then the facility location sum_j w_j max_{i in S near j} v[j, i], so
a duplicate adds nothing once its twin is kept (old entries keep their stored values).

g_t: the TASK_SCALE quantile of task t's positive gains (``_scales``). A gain in nats is
bounded by how surprising the answer is, not by how often the entry is copied: on the
text sequence (dev seed 3) a made-up name gains 7.5-8 nats per entry and a common food
word 3.2, while foods entries were copied at least as often (0.78 test hits per kept
entry vs 0.43-0.59). Counted in one unit (the pool's mean gain, strategy
``global-scale``) the newest task, foods, kept 3 entries of 27 and on the value sequence
noisy-colours 1 of 27. Saturation: above its task's typical gain an entry counts as one
copy, so one large gain does not buy the bytes of two facts; an entry the model already
answers (gain ~0) still counts ~0.

On the made-up fact tasks a plain sum of gains over-fills the task
with the largest gains and forgets the others; the square root gives each task
diminishing returns. Retention sits inside its task's square root, rescaled so that a
task's terms sum to its gains: it ranks a task's entries (those its anchors use go
first) without growing the task's share of the cap (added outside, old tasks kept
10-11 entries each of a 4 MiB bank and the fourth task 6).

The default strategy, ``likelihood-fill``, keeps the first term alone (w_ret = w_cov = 0): over
every ablation on the value and text sequences, anchor retention and coverage moved the final
accuracy by at most 1-2 questions either way, and dropping both was level on the dev seeds
(``results/continual/value-dev/README.md``). The greedy stops at entries worth nothing to it, so
the room it leaves free is then filled with those (``_fill_free``: old entries first, then new
candidates by gain; never an outvoted statement): without that, an image task whose gains on the
first answer tokens are ~0 kept 14 of its 24 entries in a bank with room for all, and an old
entry whose stored value is 0 was evicted from a bank with room. ``full`` (all three terms, the
paper's objective) stays an option.

maximised by a budgeted lazy greedy on marginal value per byte (the cost-benefit
greedy for submodular knapsacks), with a second budget on the bytes of *new* entries:
a commit can only write into space that is free before it (see memory/txn.py), and a
third on the number of items (the bank's slots).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASK_SCALE = 0.75    # a task's gains are counted in units of this quantile of its positive gains (``_scales``)
SATURATE = 1.0       # ... and count at most this much (an entry that is copied is worth one copy)
COVER_POINTS = 1024   # keys coverage is measured on (a seeded sample above this): RAM O(n * 1024), not O(n^2)
DEFAULT_STRATEGY = "likelihood-fill"   # the held-out value alone, free room filled (README "Selection ...")
STRATEGIES = ("full", "likelihood", "likelihood-fill", "coverage", "no-anchors", "no-likelihood", "no-coverage", "no-per-byte", "balanced",
              "global-scale", "random", "fifo", "all")
# "likelihood": the first term of f(S) only (w_ret = w_cov = 0): no anchor retention pass, no coverage
#               similarity matrix. Chosen on dev seeds 3-4 (results/continual/value-dev/README.md): level with
#               "full" there (+1 question over 7 runs), as every ablation of coverage and anchors had been.
#               The default on 2026-12-03 only: it evicts an entry of no value even from a bank with room
# "likelihood-fill": the default: "likelihood", then the room it leaves free filled by the entries it left out
#                    (``_fill_free``): images where all fits no longer lose entries (value-dev/README.md)
# "full": all three terms, the paper's objective (the default before 2026-12-03)
# "all": keep every old entry, add new ones in order while they fit (no selection; for building test banks)
# "no-per-byte": the full objective, greedy on marginal value per entry instead of per byte (an ablation)
# "global-scale": the full objective with every task's gains in one unit (the pool's mean), not saturated: the
#                 default before 2026-12
# "balanced": the full objective with every task's attainable value scaled to the tasks' mean (a trial)


@dataclass(frozen=True)
class Weights:
    lik: float = 1.0    # likelihood gain (nats/token of the answer)
    ret: float = 1.0    # retention gain on old tasks' anchors
    cov: float = 2.0    # coverage (mean best cosine over all keys, in [0, 1])


def weights_for(strategy: str, base: Weights) -> Weights:
    return {"full": base, "likelihood": Weights(base.lik, 0.0, 0.0), "likelihood-fill": Weights(base.lik, 0.0, 0.0),
            "coverage": Weights(0.0, 0.0, base.cov or 1.0),
            "no-anchors": Weights(base.lik, 0.0, base.cov), "no-likelihood": Weights(0.0, base.ret, base.cov),
            "no-coverage": Weights(base.lik, base.ret, 0.0)}.get(strategy, base)


@dataclass
class Pool:
    nbytes: np.ndarray     # (n,) bytes each item takes from the cap
    gain: np.ndarray       # (n,) likelihood gain
    retention: np.ndarray  # (n,) anchor retention gain (0 for new candidates)
    keys: np.ndarray       # (n, K) retrieval keys
    is_new: np.ndarray     # (n,) bool
    age: np.ndarray        # (n,) larger = older (FIFO evicts the oldest first)
    task: np.ndarray | None = None  # (n,) int task label (None: one task)
    served: tuple | None = None     # (query, server, gain, weight) arrays (``value.served``), pool indices


def _unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Rows of ``x`` centred on ``mean`` (keys share a large common direction: centre before
    cosine) and scaled to unit length, as float32."""
    x = x.astype(np.float64) - mean
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n > 0, n, 1.0)).astype(np.float32)


def similarity(keys: np.ndarray, points: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(n, len(points)) float32: each key's centred cosine to the keys at ``points``, clipped
    at 0, built ``chunk`` rows at a time so that RAM beyond the result stays O(chunk), not
    O(n) (``select`` on 10,000 keys: traced peak 100 -> 53 MiB, most of it this result)."""
    mean = keys.mean(axis=0, dtype=np.float64, keepdims=True) if len(keys) else 0.0   # (1, K)
    at = _unit(keys[points], mean)                                                     # (M, K)
    out = np.empty((len(keys), len(points)), np.float32)
    for i in range(0, len(keys), chunk):
        np.clip(_unit(keys[i:i + chunk], mean) @ at.T, 0.0, None, out=out[i:i + chunk])
    return out


def select(pool: Pool, budget: int, new_budget: int, strategy: str = DEFAULT_STRATEGY, weights: Weights = Weights(),
           seed: int = 0, max_items: int | None = None) -> np.ndarray:
    """Indices of the kept items: total bytes <= budget, new bytes <= new_budget and at most
    ``max_items`` items (None: no limit)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    n = len(pool.nbytes)
    cap = n if max_items is None else int(max_items)
    rng = np.random.default_rng(seed)
    if strategy in ("random", "fifo", "all"):
        if strategy == "all":
            order = np.concatenate([np.flatnonzero(~pool.is_new), np.flatnonzero(pool.is_new)])
        else:
            order = rng.permutation(n) if strategy == "random" else np.lexsort((rng.random(n), pool.age))
        return _fill(order, pool, budget, new_budget, cap)
    w = weights_for(strategy, weights)
    points = rng.choice(n, COVER_POINTS, replace=False) if n > COVER_POINTS else np.arange(n)
    sim = similarity(pool.keys, points) if w.cov > 0 else None                # (n, M) float32; not built without coverage
    best = np.zeros(len(points), np.float32)                                  # current max sim of each point to S
    task = pool.task if pool.task is not None else np.zeros(n, np.int64)
    one_unit = strategy == "global-scale"
    g0 = _scales(pool.gain, task, per_task=not one_unit)                      # (n,) each item's task scale
    top = np.inf if one_unit else SATURATE
    gain, ret = np.clip(pool.gain / g0, 0.0, top), pool.retention / g0
    total = {int(t): 0.0 for t in np.unique(task)}                            # sum of kept gains per task

    fl = pool.served if pool.served is not None and w.lik > 0 else None
    if fl is not None:          # servers of the facility location: their own gain is one of its terms; a new
        fq, fs, fg, fw = fl     # candidate that serves nothing there (``value.contradicted``) is worth nothing
        gain = np.where(np.isin(np.arange(n), fs) | pool.is_new, 0.0, gain)
        order = np.argsort(fs, kind="stable")
        fq, fs, fg, fw = fq[order], fs[order], np.clip(fg[order] / g0[fs[order]], 0.0, top) * w.lik, fw[order]
        lo, hi = np.searchsorted(fs, np.arange(n)), np.searchsorted(fs, np.arange(n), side="right")
        cur = np.zeros(n)                                                     # best served gain of each query

    def served(i: int) -> float:
        if fl is None or lo[i] == hi[i]:
            return 0.0
        q, g = fq[lo[i]:hi[i]], fg[lo[i]:hi[i]]
        return float((fw[lo[i]:hi[i]] * np.maximum(g - cur[q], 0.0)).sum())

    use = w.lik * gain + w.ret * np.maximum(ret, 0.0)                         # (n,) what i adds to its task
    for t in np.unique(task):   # retention ranks a task's entries; the task's share follows its gains alone
        m = task == t
        if use[m].sum() > 0 and w.lik > 0:
            use[m] *= (w.lik * gain[m]).sum() / use[m].sum()

    if strategy == "balanced":   # each task worth the same: its attainable value scaled to the tasks' mean
        worth = {int(t): float(use[task == t].sum()) for t in np.unique(task)}
        if fl is not None:      # a task's served queries: each worth its best server's weighted gain
            best_q: dict[tuple[int, int], float] = {}
            for q, s_, g, wt in zip(fq, fs, fg, fw):
                k_ = (int(task[s_]), int(q))
                best_q[k_] = max(best_q.get(k_, 0.0), float(wt * g))
            for (t, _), v in best_q.items():
                worth[t] += v
        pos = [v for v in worth.values() if v > 0]
        if pos:
            scale = np.array([np.mean(pos) / worth[int(t)] if worth[int(t)] > 0 else 1.0 for t in task])
            use = use * scale
            if fl is not None:
                fg = fg * scale[fs]

    def value(i: int) -> float:
        t = int(task[i])
        cov = 0.0 if sim is None else float(np.maximum(sim[i] - best, 0).sum()) / len(points)
        return np.sqrt(total[t] + use[i] + served(i)) - np.sqrt(total[t]) + w.cov * cov

    chosen, used, used_new = [], 0, 0
    alive = np.ones(n, bool)
    cost = np.ones(n) if strategy == "no-per-byte" else pool.nbytes.astype(np.float64)   # what a unit of value pays
    bound = np.array([value(i) for i in range(n)]) / cost                     # lazy greedy: values only shrink
    while alive.any() and len(chosen) < cap:
        i = int(np.argmax(np.where(alive, bound, -np.inf)))
        v = value(i)
        others = np.where(alive, bound, -np.inf)
        others[i] = -np.inf
        if v / cost[i] < others.max() - 1e-12:  # stale bound: refresh and retry
            bound[i] = v / cost[i]
            continue
        alive[i] = False
        if v <= 0:
            continue
        fits = used + pool.nbytes[i] <= budget and (not pool.is_new[i] or used_new + pool.nbytes[i] <= new_budget)
        if fits:
            chosen.append(i)
            used += int(pool.nbytes[i])
            used_new += int(pool.nbytes[i]) if pool.is_new[i] else 0
            if sim is not None:
                best = np.maximum(best, sim[i])
            total[int(task[i])] += use[i] + served(i)
            if fl is not None:
                cur[fq[lo[i]:hi[i]]] = np.maximum(cur[fq[lo[i]:hi[i]]], fg[lo[i]:hi[i]])
    if strategy == "likelihood-fill":
        chosen += _fill_free(pool, chosen, budget - used, new_budget - used_new, cap - len(chosen),
                             servers=None if fl is None else fs)
    return np.array(sorted(chosen), dtype=np.int64)


def _fill_free(pool: Pool, chosen: list, room: int, new_room: int, slots: int, servers=None) -> list:
    """Items the greedy left out (worth nothing to it: duplicates of kept facts, image entries whose
    gain on the first answer tokens is ~0, old entries whose stored value is 0) that fit in the room
    it left free: old entries first, newest first (what was kept stays kept while it fits), then new
    candidates by their own gain. A new candidate that serves no query (``servers``: the facility
    location's servers; ``value.contradicted``) stays out. The next learn evicts these first: their
    stored value is 0."""
    taken = set(int(i) for i in chosen)
    old = [int(i) for i in np.argsort(pool.age, kind="stable") if not pool.is_new[i] and int(i) not in taken]
    ok = np.ones(len(pool.nbytes), bool) if servers is None else np.isin(np.arange(len(pool.nbytes)), servers)
    new = [int(i) for i in np.argsort(-pool.gain, kind="stable") if pool.is_new[i] and ok[i] and int(i) not in taken]
    return _fill(np.array(old + new, np.int64), pool, room, new_room, slots).tolist()


def _scales(gain: np.ndarray, task: np.ndarray, per_task: bool = True) -> np.ndarray:
    """(n,) what a typical useful entry of each item's task gains (``TASK_SCALE`` quantile of
    the task's positive gains; per_task False: the pool's mean positive gain, as before 2026-12)."""
    pos = gain > 0
    mean = float(gain[pos].mean()) if pos.any() else 1.0
    if not per_task:
        return np.full(len(gain), mean)
    out = np.full(len(gain), mean)
    for t in np.unique(task):
        m = task == t
        if (m & pos).any():
            out[m] = float(np.quantile(gain[m & pos], TASK_SCALE))
    return out


def _fill(order: np.ndarray, pool: Pool, budget: int, new_budget: int, cap: int) -> np.ndarray:
    chosen, used, used_new = [], 0, 0
    for i in order:
        if len(chosen) >= cap:
            break
        b = int(pool.nbytes[i])
        if used + b <= budget and (not pool.is_new[i] or used_new + b <= new_budget):
            chosen.append(int(i))
            used += b
            used_new += b if pool.is_new[i] else 0
    return np.array(sorted(chosen), dtype=np.int64)


def credit(served: tuple, chosen) -> dict[int, float]:
    """What each chosen server earns in the facility location: the weighted gains of the
    queries it serves best among ``chosen`` (pool indices -> nats; the value a learn stores)."""
    fq, fs, fg, fw = served
    keep = np.isin(fs, np.asarray(list(chosen), np.int64))
    best: dict[int, tuple[float, int, float]] = {}
    for q, s, g, w in zip(fq[keep], fs[keep], fg[keep], fw[keep]):
        if int(q) not in best or g > best[int(q)][0]:
            best[int(q)] = (float(g), int(s), float(w))
    out = {int(i): 0.0 for i in chosen}
    for g, s, w in best.values():
        out[s] += w * max(g, 0.0)
    return out
