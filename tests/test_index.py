"""HNSW index over bank keys: recall vs the exact oracle, in-place updates vs a rebuild."""
import numpy as np
import pytest

from inducekv.memory.bank import Bank, NewEntry
from inducekv.memory.index import KeyIndex, exact_search


def realistic_keys(rng, n: int, dim: int = 576, clusters: int = 300) -> np.ndarray:
    """Keys shaped like pooled hidden states of a small LM: a large shared mean direction,
    a few massive-activation channels, task/topic clusters in a low-rank subspace, noise."""
    mean = rng.standard_normal(dim) * 0.5
    mean[rng.choice(dim, 4, replace=False)] = 30.0  # massive activations, shared by every key
    basis = rng.standard_normal((48, dim)) / np.sqrt(48)
    centers = rng.standard_normal((clusters, 48)) * 2.0
    which = rng.integers(0, clusters, n)
    x = mean + (centers[which] + rng.standard_normal((n, 48)) * 0.7) @ basis + rng.standard_normal((n, dim)) * 0.15
    return x.astype(np.float32)


class _FakeBank:
    """Just enough of a Bank for KeyIndex: keys by entry id, a generation counter."""

    def __init__(self, dim, slots):
        self.geo = type("G", (), {"key_dim": dim, "key_space": "cosine", "slots": slots})()
        self.gen, self.ids, self.vecs = 0, np.zeros(0, np.int64), np.zeros((0, dim), np.float32)

    def keys(self):
        return self.ids, self.vecs


def test_recall_at_4_on_10k_realistic_keys(rng):
    both = realistic_keys(rng, 10_300)
    keys, queries = both[:10_000], both[10_000:]  # queries: new points from the same topics, not copies of keys
    fake = _FakeBank(576, 10_000)
    fake.ids, fake.vecs, fake.gen = np.arange(10_000, dtype=np.int64), keys, 1
    idx = KeyIndex.build(fake, threads=2)
    hits = 0
    for q in queries:
        exact, _ = exact_search("cosine", fake.ids, keys, q, 4)
        got, scores = idx.search(q, 4)
        hits += len(set(exact) & set(got))
        assert np.all(np.diff(scores) <= 1e-6)  # best first
    recall = hits / (4 * len(queries))
    print(f"\nHNSW recall@4 on 10k realistic 576-d keys (M=16, ef=64): {recall:.4f}")
    assert recall >= 0.95


def test_index_follows_random_swaps_like_a_rebuild(tmp_path, rng):
    p = tmp_path / "b.ikv"
    dim = 32
    bank = Bank.create(p, 400_000, scheme="int4", fingerprint="m", num_layers=1, kv_heads=1, head_dim=32,
                       key_dim=dim, max_tokens=8, entry_tokens=4)
    kv = np.zeros((1, 1, 2, 32), np.float32)

    def new():
        return NewEntry(kv, kv, rng.standard_normal(dim).astype(np.float32), "t")

    with bank.transaction() as tx:
        for _ in range(150):
            tx.add(new())
    idx = KeyIndex.build(bank)
    for _ in range(60):  # random swaps, removals and adds, several per commit
        with bank.transaction() as tx:
            live = [int(s) for s in bank.slots()]
            for s in rng.choice(live, 5, replace=False):
                r = rng.random()
                if r < 0.6:
                    tx.replace(int(s), new())
                elif r < 0.8:
                    tx.remove(int(s))
                else:
                    tx.add(new())
        idx.sync(bank)
    fresh = KeyIndex.build(bank)
    ids, keys = bank.keys()
    assert idx.labels() == fresh.labels() == set(ids.tolist())
    np.testing.assert_allclose(idx.items(ids), fresh.items(ids), atol=1e-6)
    for q in rng.standard_normal((50, dim)).astype(np.float32):
        want, _ = exact_search("cosine", ids, keys, q, 4)
        assert list(idx.search(q, 4)[0]) == list(want) == list(fresh.search(q, 4)[0])


def test_search_small_and_empty(rng):
    fake = _FakeBank(8, 10)
    idx = KeyIndex.build(fake)
    ids, scores = idx.search(np.ones(8), 4)
    assert len(ids) == 0 and len(scores) == 0
    fake.ids, fake.vecs, fake.gen = np.array([7, 9]), rng.standard_normal((2, 8)).astype(np.float32), 1
    idx.sync(fake)
    assert sorted(idx.search(fake.vecs[0], 4)[0].tolist()) == [7, 9]  # k larger than the bank


@pytest.mark.parametrize("space", ["cosine", "ip", "l2"])
def test_exact_search_spaces(space, rng):
    keys = rng.standard_normal((50, 8)).astype(np.float32)
    ids = np.arange(50) * 3
    top, s = exact_search(space, ids, keys, keys[10], 1)
    if space != "ip":  # a key is its own nearest neighbour under cosine and l2
        assert top[0] == 30
    assert s.shape == (1,)
