"""Selection's coverage term keeps its working memory independent of the pool's size."""
import tracemalloc

import numpy as np

from inducekv.learn.select import similarity


def test_similarity_matches_centred_cosine_and_needs_no_copy_of_the_keys():
    rng = np.random.default_rng(0)
    n, dim = 16000, 576
    keys = (rng.standard_normal((n, dim)) + 3.0).astype(np.float32)          # a shared direction, as real keys have
    points = rng.choice(n, 256, replace=False)
    tracemalloc.start()
    try:
        sim = similarity(keys, points)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    x = keys.astype(np.float64)
    x -= x.mean(axis=0, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    want = np.clip(x @ x[points].T, 0.0, None)
    assert sim.shape == (n, 256) and sim.dtype == np.float32
    np.testing.assert_allclose(sim, want, atol=1e-5)
    assert (sim[points, np.arange(256)] > 0.999).all()
    # beyond the result, O(chunk): under a quarter of one float64 copy of the keys (the
    # whole-pool version made three; measured 11.8 MiB here against 70 MiB for one copy)
    assert peak - sim.nbytes < n * dim * 2
