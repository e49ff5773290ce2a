"""Next-token choice: greedy, or temperature + top-k + top-p sampling with a seed."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inducekv.core.errors import InduceKVError

DEFAULT_MAX_NEW_TOKENS = 64   # generate/stream and ikv-run


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0   # 0 = greedy (argmax)
    top_k: int = 0             # keep the k most likely tokens; 0 = all
    top_p: float = 1.0         # keep the smallest set with this much probability mass
    seed: int | None = None    # seeds numpy's generator; same seed, same text

    def __post_init__(self):
        if self.temperature < 0:
            raise InduceKVError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InduceKVError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InduceKVError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def choose(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """One token id from ``logits`` (vocab,)."""
    if cfg.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < z.shape[0]:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, cfg.top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(p.shape[0], p=p))
