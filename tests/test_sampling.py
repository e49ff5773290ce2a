"""Sampling: seeded determinism, and the cut-offs reduce to greedy at their limits."""
from __future__ import annotations

import numpy as np
import pytest

from inducekv.runtime import Runtime
from inducekv.core.errors import InduceKVError
from inducekv.runtime.sampling import SamplingConfig, choose


def test_greedy_is_argmax(rng):
    logits = rng.normal(size=100)
    assert choose(logits, SamplingConfig(), rng) == int(np.argmax(logits))


def test_top_k_1_and_tiny_top_p_are_greedy(rng):
    logits = rng.normal(size=100)
    best = int(np.argmax(logits))
    for _ in range(20):
        assert choose(logits, SamplingConfig(temperature=1.5, top_k=1), rng) == best
        assert choose(logits, SamplingConfig(temperature=1.5, top_p=1e-6), rng) == best


def test_top_k_never_leaves_the_top_set(rng):
    logits = rng.normal(size=50)
    top = set(np.argsort(-logits)[:5].tolist())
    draws = {choose(logits, SamplingConfig(temperature=5.0, top_k=5), rng) for _ in range(300)}
    assert draws <= top and len(draws) > 1


def test_sampling_follows_the_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    draws = np.array([choose(logits, SamplingConfig(temperature=1.0), rng) for _ in range(4000)])
    assert np.allclose(np.bincount(draws, minlength=3) / 4000, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_options(bad):
    with pytest.raises(InduceKVError):
        SamplingConfig(**bad)


def test_seeded_generation_is_reproducible(tiny_bundles):
    rt = Runtime.open(tiny_bundles["fp32"])
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, ignore_eos=True)
    a = rt.generate("hello", seed=7, **kw).token_ids
    assert a == rt.generate("hello", seed=7, **kw).token_ids
    assert any(rt.generate("hello", seed=s, **kw).token_ids != a for s in range(8, 12))


def test_stop_string_cuts_the_text(tiny_bundles):
    rt = Runtime.open(tiny_bundles["fp32"])
    full = rt.generate("hello", max_new_tokens=12, ignore_eos=True)
    stop = full.text[3:5]
    cut = rt.generate("hello", max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert cut.stop_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
