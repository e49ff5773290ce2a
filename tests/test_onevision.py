"""LLaVA-OneVision on a tiny random checkpoint (SigLIP tower + Qwen2 text, ``vlmutil``): the
numpy anyres tiling and feature layout against transformers' processor and model, the whole
image path's logits and greedy tokens, image-bearing memory entries, refusals, no torch."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from inducekv.core import contract
from inducekv.core.errors import UnsupportedModelError
from inducekv.runtime import anyres
from inducekv.runtime.api import Runtime
from inducekv.runtime.session import KVCache
from inducekv.runtime.vision import with_image

PROMPT = "<image>What is in the picture?"
# (H, W): grids 2x2, 3x1, 1x3, 1x1, 3x2, 2x2 (square), 1x3; the first and the 3x2 are pooled
SIZES = [(45, 60), (90, 31), (20, 100), (32, 32), (100, 90), (64, 64), (33, 97)]


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    """(hf dir, fp32 bundle, export report, HF model, processor)."""
    from vlmutil import make_onevision

    from inducekv.export.build import export_bundle
    from inducekv.export.vlm import load

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("onevision")
    d = make_onevision(root / "hf")
    _, report = export_bundle(str(d), root / "bundle", progress=False, threads=1)
    model, proc = load(d)
    return d, root / "bundle", report, model, proc


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _hf_batch(proc, img):
    batch = proc(text=[PROMPT], images=[Image.fromarray(img)], return_tensors="pt")
    batch.pop("token_type_ids", None)
    return batch


def _hf_greedy(model, batch, n: int) -> list[int]:
    """Greedy by full forwards (HF generate's min_new_tokens would forbid EOS; the runtime's
    ignore_eos does not)."""
    ids = batch["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            b = {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            ids = torch.cat([ids, model(**b).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, batch["input_ids"].shape[1]:].tolist()


def test_export_check_and_bundle_files(ov):
    _, bundle, report, _, _ = ov
    assert report["max_abs_logit_diff"] < 1e-4 and report["argmax_agreement"] == 1.0
    assert report["vision_tiles"] == 5 and report["image_tokens"] == 44   # 40 x 52 validation image: 2x2 grid, pooled
    m = json.loads((bundle / contract.MANIFEST_NAME).read_text())
    assert m["architecture"] == "llava_onevision"
    assert {contract.VISION_FILE, contract.EMBED_FILE, contract.NEWLINE_FILE} <= set(m["files"])
    assert m["image"]["processor"] == "llava_onevision" and m["image"]["vision_aspect_ratio"] == "anyres_max_2"


@pytest.mark.parametrize("hw", SIZES)
def test_tiles_and_token_count_match_hf_processor(ov, hw):
    """Pixel values bit-identical to the slow HF image processor; the placeholder expands to
    HF's number of image tokens, so the prompt ids are HF's."""
    _, bundle, _, _, proc = ov
    rt = Runtime.open(bundle)
    img = _image(sum(hw), *hw)
    batch = _hf_batch(proc, img)
    prep = anyres.prepare(img, rt.manifest.image)
    np.testing.assert_array_equal(prep.pixel_values, batch["pixel_values"][0].numpy())
    assert prep.size == tuple(batch["image_sizes"][0].tolist()) == hw
    ids = rt.tokenizer.encode(with_image(PROMPT, rt.encode_image(img), rt.manifest))
    assert ids == batch["input_ids"][0].tolist()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_alpha_and_palette_images_match_hf(ov, mode):
    """Non-RGB PIL images: converted to RGB first (alpha dropped), as HF's convert_to_rgb does."""
    _, bundle, _, _, proc = ov
    s = Runtime.open(bundle).manifest.image
    rgba = np.random.default_rng(5).integers(0, 256, (50, 70, 4), dtype=np.uint8)
    im = Image.fromarray(rgba).convert(mode)
    batch = proc(text=[PROMPT], images=[im], return_tensors="pt")
    prep = anyres.prepare(im, s)
    np.testing.assert_array_equal(prep.pixel_values, batch["pixel_values"][0].numpy())
    assert prep.text.count("<image>") == int((batch["input_ids"] == proc.image_token_id).sum())


def test_sizes_cover_pooled_and_unpooled_layouts(ov):
    s = Runtime.open(ov[1]).manifest.image
    pooled = {hw: anyres.layout(*hw, s).pooled for hw in SIZES}
    assert pooled[(45, 60)] == (4, 6) and pooled[(100, 90)] is not None
    assert pooled[(32, 32)] is None and pooled[(20, 100)] is None
    assert anyres.layout(20, 100, s).crop == (1, 3, 0, 12)   # black bars above and below cropped away


@pytest.mark.parametrize("hw", SIZES)
def test_layout_matches_hf_pack_image_features(ov, hw, rng):
    """``anyres.pack`` (numpy, after the vision graph) == HF ``pack_image_features`` on the same
    per-tile features: base tile, unpadding, bilinear pooling, newline rows, order."""
    _, bundle, _, model, _ = ov
    s = Runtime.open(bundle).manifest.image
    lay = anyres.layout(*hw, s)
    feats = rng.standard_normal((1 + lay.rows * lay.cols, 16, 64)).astype(np.float32)
    newline = model.model.image_newline.detach().numpy()
    with torch.no_grad():
        (want,), _ = model.model.pack_image_features([torch.from_numpy(feats)], torch.tensor([hw]),
                                                     image_newline=model.model.image_newline,
                                                     vision_aspect_ratio=s["vision_aspect_ratio"])
    got = anyres.pack(feats, hw, s, newline)
    assert got.shape == tuple(want.shape) and got.shape[0] == anyres.num_image_tokens(*hw, s)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(3, 12, 12, 5, 7), (2, 8, 12, 7, 9), (4, 5, 3, 9, 2), (1, 6, 6, 6, 6)])
def test_bilinear_matches_torch_interpolate(rng, shape):
    c, h, w, oh, ow = shape
    x = rng.standard_normal((c, h, w)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[None], [oh, ow], mode="bilinear")[0].numpy()
    np.testing.assert_allclose(anyres._bilinear(x, oh, ow), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw", [(45, 60), (90, 31), (100, 90)])
def test_runtime_image_path_matches_hf(ov, hw):
    """Runtime (numpy tiling, vision.onnx, numpy layout, embedding splice, Qwen2 decoder) vs the
    HF processor + model: logits within 1e-4, same 6 greedy tokens."""
    _, bundle, _, model, proc = ov
    rt = Runtime.open(bundle)
    img = _image(sum(hw), *hw)
    batch = _hf_batch(proc, img)
    enc = rt.encode_image(img)
    ids = rt.tokenizer.encode(with_image(PROMPT, enc, rt.manifest))
    assert enc.features.shape[0] == int((batch["input_ids"] == model.config.image_token_index).sum())
    got, _ = rt.decoder.forward(ids, KVCache.empty(rt.manifest), features=enc.features)
    with torch.no_grad():
        ref = model(**batch).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-4
    res = rt.generate(PROMPT, image=img, chat=False, max_new_tokens=6, ignore_eos=True)
    assert res.token_ids == _hf_greedy(model, batch, 6)


def test_image_entry_injected_equals_joint_prefill(ov):
    """An image-bearing entry (its tiles' features in the payload) injected where it was
    computed reproduces a joint prefill of prefix + entry + image query."""
    from vlmutil import injected_vs_joint

    injected, joint = injected_vs_joint(ov[1], _image(1, 45, 60), _image(2, 90, 31))
    assert np.abs(injected - joint).max() <= 1e-3
    assert (injected.argmax(-1) == joint.argmax(-1)).all()


@pytest.mark.parametrize("change, message", [
    (dict(vision_aspect_ratio="anyres_max_9"), "vision_aspect_ratio 'anyres_max_9'"),
    (dict(vision_feature_select_strategy="default"), "vision_feature_select_strategy must be 'full'"),
    (dict(image_grid_pinpoints=[[32, 32]]), "image_grid_pinpoints differ"),
])
def test_inconsistent_checkpoints_are_refused_in_one_line(ov, change, message):
    import copy

    from inducekv.export import vlm

    _, _, _, model, proc = ov
    bad = copy.copy(model)
    bad.config = copy.deepcopy(model.config)
    for key, value in change.items():
        setattr(bad.config, key, value)
    with pytest.raises(UnsupportedModelError, match=message) as e:
        vlm.image_settings(bad, proc)
    assert "\n" not in str(e.value)


def test_missing_newline_file_is_a_bundle_error(ov, tmp_path):
    import shutil

    from inducekv.core.errors import BundleError

    bundle = tmp_path / "b"
    shutil.copytree(ov[1], bundle)
    (bundle / contract.NEWLINE_FILE).write_bytes(b"\0" * (bundle / contract.NEWLINE_FILE).stat().st_size)
    rt = Runtime.open(bundle)
    with pytest.raises(BundleError, match="image_newline"):
        rt.encode_image(_image(0, 40, 40))


def test_onevision_image_path_runs_without_torch(ov):
    import subprocess
    import sys
    import textwrap

    from test_torch_free import BLOCKER

    script = BLOCKER + textwrap.dedent("""
        import json
        import numpy as np
        from inducekv.runtime import Runtime
        rt = Runtime.open(sys.argv[1])
        img = np.random.default_rng(3).integers(0, 256, (100, 90, 3), dtype=np.uint8)
        r = rt.generate("What?", image=img, max_new_tokens=3, ignore_eos=True)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({"tokens": len(r.token_ids), "heavy": heavy}))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(ov[1])], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"tokens": 3, "heavy": []}
