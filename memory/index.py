"""Retrieval index over a bank's keys: hnswlib HNSW, kept in step with the bank in place.

The bank is the source of truth; the index is rebuilt from it at open (it is not
stored, so it costs no bytes of the cap) and then follows commits with
``mark_deleted`` / ``add_items(..., replace_deleted=True)``. Labels are entry ids,
which the bank never reuses, so a replaced slot can never alias an old entry.
``exact_search`` is the numpy oracle the tests (and small banks) use.
"""
from __future__ import annotations

import numpy as np

from inducekv.memory.bank import Bank

EXACT_BELOW = 65_536  # fewer slots: exact search (<= ~10 ms a query, perfect recall; see memory/FORMAT.md)


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def scores_from_distances(space: str, d: np.ndarray) -> np.ndarray:
    """Higher is better: cosine similarity, inner product, or negative squared L2."""
    return -d if space == "l2" else 1.0 - d


def exact_search(space: str, ids: np.ndarray, keys: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k: (ids (k',), scores (k',)) best first, k' = min(k, N)."""
    q = np.asarray(query, np.float32).reshape(-1)
    if space == "cosine":
        s = _normalize(keys) @ _normalize(q)
    elif space == "ip":
        s = keys @ q
    else:
        s = -((keys - q) ** 2).sum(axis=1)
    k = min(k, len(ids))
    if k <= 0:
        return ids[:0], np.zeros(0, np.float32)
    top = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
    top = top[np.argsort(-s[top], kind="stable")]
    return ids[top], s[top].astype(np.float32)


class ExactIndex:
    """Brute-force search with the same interface as ``KeyIndex``: perfect recall, and
    faster than HNSW's build + query for the few hundred entries an edge bank holds."""

    def __init__(self, space: str):
        self.space, self._gen = space, -1
        self._ids, self._keys = np.zeros(0, np.int64), np.zeros((0, 0), np.float32)

    @classmethod
    def build(cls, bank: Bank) -> "ExactIndex":
        idx = cls(bank.geo.key_space)
        idx.sync(bank)
        return idx

    def __len__(self) -> int:
        return len(self._ids)

    def labels(self) -> set[int]:
        return set(self._ids.tolist())

    def sync(self, bank: Bank) -> None:
        if bank.gen != self._gen:
            ids, keys = bank.keys()
            self._ids, self._keys = ids, (_normalize(keys) if self.space == "cosine" else keys)
            self._gen = bank.gen

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(query, np.float32).reshape(-1)
        if self.space == "cosine":  # keys are stored normalized: cosine = dot with the normalized query
            return exact_search("ip", self._ids, self._keys, _normalize(q), k)
        return exact_search(self.space, self._ids, self._keys, q, k)


def open_index(bank: Bank, *, exact_below: int = EXACT_BELOW, **hnsw) -> "ExactIndex | KeyIndex":
    """The index a reader should use: exact search for small banks, HNSW above ``exact_below`` slots."""
    if bank.geo.slots < exact_below:
        return ExactIndex.build(bank)
    return KeyIndex.build(bank, **hnsw)


class KeyIndex:
    """HNSW over the live entries of one bank."""

    def __init__(self, dim: int, space: str, max_elements: int, *, M: int = 16, ef_construction: int = 200,
                 ef: int = 256, seed: int = 0, threads: int = 1):
        import hnswlib

        self.space, self.dim, self.ef, self.threads = space, dim, ef, threads
        self._index = hnswlib.Index(space=space, dim=dim)
        self._index.init_index(max_elements=max(1, max_elements), M=M, ef_construction=ef_construction,
                               random_seed=seed, allow_replace_deleted=True)
        self._index.set_ef(ef)
        self._labels: set[int] = set()
        self._gen = -1

    @classmethod
    def build(cls, bank: Bank, **kw) -> "KeyIndex":
        idx = cls(bank.geo.key_dim, bank.geo.key_space, bank.geo.slots, **kw)
        idx.sync(bank)
        return idx

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> set[int]:
        return set(self._labels)

    def sync(self, bank: Bank) -> tuple[int, int]:
        """Bring the index in line with the bank's current entries. Returns (removed, added)."""
        if bank.gen == self._gen:
            return 0, 0
        ids, keys = bank.keys()
        want = {int(i): j for j, i in enumerate(ids)}
        gone = [i for i in self._labels if i not in want]
        new = [i for i in want if i not in self._labels]
        for i in gone:  # delete first: their places are reused by the adds
            self._index.mark_deleted(i)
            self._labels.discard(i)
        if new:
            rows = [want[i] for i in new]
            self._index.add_items(keys[rows], np.asarray(new, np.uint64), num_threads=self.threads, replace_deleted=True)
            self._labels.update(new)
        self._gen = bank.gen
        return len(gone), len(new)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k entry ids and scores (best first); fewer when the bank has fewer entries."""
        k = min(k, len(self._labels))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        self._index.set_ef(max(self.ef, k))
        labels, dist = self._index.knn_query(np.asarray(query, np.float32).reshape(1, -1), k=k, num_threads=1)
        return labels[0].astype(np.int64), scores_from_distances(self.space, dist[0]).astype(np.float32)

    def items(self, ids) -> np.ndarray:
        """Stored vectors for ``ids`` (normalized for the cosine space, as hnswlib stores them)."""
        return np.asarray(self._index.get_items(np.asarray(list(ids), np.uint64)), np.float32)
