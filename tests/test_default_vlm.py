"""The embedded default VLM: the committed vision tower on the frozen SmolLM2 backbone.

Exports ``default-vlm`` (about two minutes) unless ``$IKV_DEFAULT_VLM_BUNDLE`` points at one,
then checks that it *sees*: held-out generated images of the training distribution are
answered through the torch-free runtime. Thresholds sit well under the accuracies measured
when the weights were trained (README, "Default VLM"), and far above chance (1/6 colours,
1/4 shapes, 1/10 digits), so a broken image path or tower fails them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from inducekv.export import imagedata  # noqa: E402
from inducekv.export.default_vlm import WEIGHTS  # noqa: E402
from inducekv.runtime import Runtime  # noqa: E402
from inducekv.runtime.scoring import score  # noqa: E402

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def vlm_bundle(tmp_path_factory) -> Path:
    env = os.environ.get("IKV_DEFAULT_VLM_BUNDLE")
    if env and (Path(env) / "manifest.json").is_file():
        return Path(env)
    from inducekv.export.build import export_bundle
    from inducekv.export.source import default_gguf_path
    from inducekv.core.errors import InduceKVError

    try:
        default_gguf_path()
    except InduceKVError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("default-vlm") / "fp32"
    _, report = export_bundle("default-vlm", out, progress=False)
    from inducekv.export.build import FP32_TOLERANCE

    assert report["max_abs_logit_diff"] < FP32_TOLERANCE * report["max_abs_logit"] and report["image_tokens"] == 16
    return out


def test_weights_are_small_safetensors():
    from safetensors import safe_open

    assert WEIGHTS.stat().st_size <= 20 * 2 ** 20
    with safe_open(str(WEIGHTS), framework="np") as f:
        assert "added_embeddings" in f.keys() and any(k.startswith("model.vision_model.") for k in f.keys())


@pytest.mark.parametrize("family,n,threshold", [("colour", 24, 0.8), ("shape", 24, 0.7), ("digit", 24, 0.5)])
def test_default_vlm_sees_held_out_images(vlm_bundle, family, n, threshold):
    rt = Runtime.open(vlm_bundle)
    rng = np.random.default_rng(12345)  # not the training seed; digits come from the held-out range
    hits = []
    for _ in range(n):
        s, prompt, answer = imagedata.sample(family, rng, split="test")
        r = rt.generate(prompt, image=s.image, max_new_tokens=6, stop=["\n"])
        hits.append(score(r.text, [answer])[0])
    assert np.mean(hits) >= threshold, (family, np.mean(hits))


@pytest.mark.parametrize("family,n,threshold", [("colour", 24, 0.75), ("shape", 24, 0.7)])
def test_default_vlm_sees_images_of_a_separate_renderer(vlm_bundle, family, n, threshold):
    """Images drawn by ``tests/plainshapes.py`` (Pillow's named colours, axis-aligned shapes on
    white), code that made none of the training images (README, "The default VLM": colour 0.90,
    shape 0.90 on 200 of them; digits are printed there, handwritten in training, and not held)."""
    import plainshapes

    rt = Runtime.open(vlm_bundle)
    rng = np.random.default_rng(4321)
    hits = []
    for _ in range(n):
        image, prompt, answer = plainshapes.sample(family, rng)
        r = rt.generate(prompt, image=image, max_new_tokens=6, stop=["\n"])
        hits.append(score(r.text, [answer])[0])
    assert np.mean(hits) >= threshold, (family, np.mean(hits))
