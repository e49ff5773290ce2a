"""runtime/images.py reproduces the HF slow image processors (CLIP/LLaVA, Idefics3) and their prompt expansion.

HF processors are built from small explicit configs and a tiny word-level
tokenizer (no downloads). The file imports without transformers: HF tests skip.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from inducekv.runtime import images as I
from inducekv.export.hfimages import settings_from_hf
from inducekv.core.errors import InduceKVError

TOL = 1e-5
ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SPECIALS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *ROW_COL]
WORDS = ["User", ":", "Assistant", "Describe", "this", "picture", "and", "that", "."]


# ---------------------------------------------------------------------------- images

def noise(h, w, seed, mode="RGB"):
    """Random pixels with a smooth ramp mixed in (noise stresses the resampling filters)."""
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    ramp = (np.add.outer(np.arange(h), np.arange(w)) * 255 // max(h + w - 2, 1)).astype(np.int64)
    a = (rng.integers(0, 256, (h, w, ch)) + ramp[:, :, None]) // 2
    a = a.astype(np.uint8)
    return Image.fromarray(a[:, :, 0] if mode == "L" else a)


CASES = {  # name -> input image (PIL unless noted)
    "small": noise(20, 17, 1),
    "tall": noise(150, 40, 2),
    "wide": noise(37, 160, 3),
    "square": noise(64, 64, 4),
    "large": noise(300, 260, 5),  # larger than longest_edge (128)
    "odd": noise(33, 99, 6),
    "gray": noise(45, 70, 7, "L"),
    "rgba": noise(90, 50, 8, "RGBA"),
    "array": np.asarray(noise(41, 77, 9)),  # uint8 HxWx3
}


def hf_input(name, kind):
    """What HF is given for a case; the HF slow Idefics3 processor raises on 2-D (grayscale) images,
    so for it grayscale is compared against the RGB conversion (what we do, and what HF's load_image does)."""
    image = CASES[name]
    if kind == "idefics3" and name == "gray":
        return image.convert("RGB")
    return image


# ---------------------------------------------------------------------------- HF fixtures

def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def llava_processor(image_processor, **kw):
    from transformers import LlavaProcessor

    kw = {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1, **kw}
    return LlavaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), **kw)


def idefics3_processor(**kw):
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    kw = {"size": {"longest_edge": 4 * 32}, "max_image_size": {"longest_edge": 32}, **kw}
    return Idefics3Processor(image_processor=Idefics3ImageProcessor(**kw), tokenizer=tiny_tokenizer(),
                             image_seq_len=4)


def make_processor(config):
    pytest.importorskip("transformers")
    from transformers import CLIPImageProcessor, LlavaImageProcessor
    from transformers.image_utils import PILImageResampling

    clip = {"size": {"shortest_edge": 30}, "crop_size": {"height": 28, "width": 28}}
    return {
        "clip": lambda: llava_processor(CLIPImageProcessor(**clip)),
        # crop larger than the resized image: HF zero-pads the crop
        "clip-pad-crop": lambda: llava_processor(
            CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 28, "width": 40})),
        # fixed (h, w) resize, no crop, bilinear, no extra token: token count follows the image
        "clip-fixed": lambda: llava_processor(
            CLIPImageProcessor(size={"height": 28, "width": 42}, do_center_crop=False,
                               resample=PILImageResampling.BILINEAR, image_mean=[0.5, 0.5, 0.5],
                               image_std=[0.5, 0.5, 0.5]),
            num_additional_image_tokens=0, vision_feature_select_strategy="full"),
        # no rescale (normalize casts uint8 -> float32), per-channel mean/std
        "clip-norescale": lambda: llava_processor(
            CLIPImageProcessor(do_rescale=False, image_mean=[120.0, 110.5, 100.25], image_std=[60.0, 61.0, 62.5],
                               **clip)),
        "llava-pad": lambda: llava_processor(LlavaImageProcessor(do_pad=True, **clip)),
        "idefics3": lambda: idefics3_processor(),
        "idefics3-nosplit": lambda: idefics3_processor(do_image_splitting=False),
        "idefics3-noresize": lambda: idefics3_processor(do_resize=False),
        "idefics3-bicubic": lambda: idefics3_processor(resample=PILImageResampling.BICUBIC,
                                                       size={"longest_edge": 3 * 32 + 10}),
    }[config]()


CONFIGS = ["clip", "clip-pad-crop", "clip-fixed", "clip-norescale", "llava-pad", "idefics3", "idefics3-nosplit",
           "idefics3-noresize", "idefics3-bicubic"]


def hf_run(proc, text, image, monkeypatch):
    """Run the full HF processor; return (pixel_values, pixel_attention_mask, expanded prompt, input_ids)."""
    seen = []
    tok_cls = type(proc.tokenizer)
    original = tok_cls.__call__

    def spy(self, text=None, *args, **kwargs):  # the processors tokenize the expanded prompt strings
        seen.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tok_cls, "__call__", spy)
    out = proc(text=text, images=[image], return_tensors="np")
    monkeypatch.setattr(tok_cls, "__call__", original)
    (prompts,) = seen
    pv = np.asarray(out["pixel_values"])
    mask = out.get("pixel_attention_mask")
    if pv.ndim == 5:  # Idefics3: (batch, tiles, 3, H, W)
        pv, mask = pv[0], np.asarray(mask)[0]
    return pv, mask, prompts[0], list(out["input_ids"][0])


@pytest.fixture(scope="module")
def settings_cache():
    return {}


def settings_for(config, settings_cache):
    if config not in settings_cache:
        proc = make_processor(config)
        s = settings_from_hf(proc)
        assert json.loads(json.dumps(s)) == s  # JSON-serialisable, round-trips exactly
        settings_cache[config] = (proc, s)
    return settings_cache[config]


# ---------------------------------------------------------------------------- parity

@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_hf(config, case, settings_cache, monkeypatch):
    proc, s = settings_for(config, settings_cache)
    kind = s["processor"]
    text = "User: Describe this picture <image> and that .<end_of_utterance>"
    hf_pv, hf_mask, hf_prompt, hf_ids = hf_run(proc, text, hf_input(case, kind), monkeypatch)

    pv, mask, image_text = I.preprocess(CASES[case], s)
    assert pv.dtype == np.float32 and pv.ndim == 4 and pv.shape[1] == 3
    assert pv.shape == hf_pv.shape, (pv.shape, hf_pv.shape)
    diff = float(np.max(np.abs(pv - hf_pv.astype(np.float32))))
    assert diff <= TOL, diff
    if kind == "clip":
        assert mask is None and pv.shape[0] == 1
    else:
        assert mask.dtype == bool and mask.shape == (pv.shape[0], *pv.shape[2:])
        np.testing.assert_array_equal(mask, np.asarray(hf_mask).astype(bool))

    prompt = text.replace("<image>", image_text)
    assert prompt == hf_prompt
    assert list(proc.tokenizer(prompt)["input_ids"]) == hf_ids
    expanded, pixels, masks = I.expand_prompt(text, [CASES[case]], s)
    assert expanded == hf_prompt and np.array_equal(pixels[0], pv)


def test_idefics3_tile_layout(settings_cache):
    """A 300x260 image: longest edge 128 -> 128x110 -> 128x128 -> 4x4 tiles + global, 32x32 each."""
    pytest.importorskip("transformers")
    _, s = settings_for("idefics3", settings_cache)
    pv, mask, text = I.preprocess(CASES["large"], s)
    assert pv.shape == (17, 3, 32, 32) and mask.all()
    assert text.count("<image>") == 17 * 4 and text.count("<fake_token_around_image>") == 17 + 1
    assert text.startswith("<fake_token_around_image><row_1_col_1><image>")
    assert text.endswith("\n\n<fake_token_around_image><global-img>" + "<image>" * 4 + "<fake_token_around_image>")
    small, _, small_text = I.preprocess(noise(10, 10, 0), {**s, "do_resize": False})  # fits one tile: not split
    assert small.shape == (1, 3, 32, 32) and "<row_" not in small_text


def test_multiple_images_in_one_prompt(settings_cache, monkeypatch):
    """Idefics3 with two images of different sizes: same prompt and tiles as HF (padding stays a no-op)."""
    proc, s = settings_for("idefics3", settings_cache)
    text = "User: <image> Describe this and that <image> ."
    imgs = [CASES["tall"], CASES["small"]]
    seen = []
    tok_cls = type(proc.tokenizer)
    original = tok_cls.__call__
    monkeypatch.setattr(tok_cls, "__call__", lambda self, t=None, *a, **k: seen.append(t) or original(self, t, *a, **k))
    out = proc(text=text, images=imgs, return_tensors="np")
    expanded, pixels, masks = I.expand_prompt(text, imgs, s)
    assert expanded == seen[0][0]
    ours = np.concatenate(pixels)
    assert ours.shape == out["pixel_values"][0].shape
    assert float(np.max(np.abs(ours - out["pixel_values"][0]))) <= TOL
    assert np.array_equal(np.concatenate(masks), out["pixel_attention_mask"][0].astype(bool))
    with pytest.raises(I.ImageError, match="2 <image> placeholders but 1 images"):
        I.expand_prompt(text, imgs[:1], s)


@pytest.mark.parametrize("config", ["clip", "idefics3"])
def test_paths_match_hf_load_image(config, settings_cache, tmp_path):
    """A file path is loaded like HF's processors load one (load_image: EXIF rotation, convert("RGB"))."""
    proc, s = settings_for(config, settings_cache)
    for name in ("gray", "rgba", "odd"):
        path = tmp_path / f"{name}.png"
        CASES[name].save(path)
        ours, _, _ = I.preprocess(path, s)
        hf = np.asarray(proc.image_processor(images=str(path), return_tensors="np")["pixel_values"])
        hf = hf[0] if hf.ndim == 5 else hf
        assert ours.shape == hf.shape and float(np.max(np.abs(ours - hf))) <= TOL


def test_exif_orientation_applied(tmp_path):
    im = noise(20, 30, 11)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif)
    assert I.load_image(path).size == (20, 30)
    assert I.load_image(str(path)).mode == "RGB"


def test_settings_shapes(settings_cache):
    _, clip = settings_for("clip", settings_cache)
    assert clip["processor"] == "clip" and clip["image_token"] == "<image>"
    assert clip["image_seq_len"] == (28 // 14) ** 2 + 1 - 1
    assert clip["resample"] == 3 and clip["crop_size"] == {"height": 28, "width": 28}
    _, ide = settings_for("idefics3", settings_cache)
    assert ide["processor"] == "idefics3" and ide["image_seq_len"] == 4 and ide["resample"] == 1
    assert ide["max_image_size"] == {"longest_edge": 32} and ide["do_image_splitting"] is True
    assert ide["global_image_token"] == "<global-img>"
    assert ide["fake_image_token"] == "<fake_token_around_image>"


# ---------------------------------------------------------------------------- sizes (no HF needed)

@pytest.mark.parametrize("hw,longest,expected", [
    ((300, 260), 128, (128, 110)),  # 128 * (260/300) = 110.9 -> 110
    ((20, 17), 128, (128, 108)),    # small images are upscaled; 108.8 -> 108
    ((37, 160), 128, (30, 128)),    # 29.6 -> 29 -> odd -> 30
    ((64, 64), 128, (128, 128)),
])
def test_idefics3_resize_size(hw, longest, expected):
    assert I._idefics3_resize_size(*hw, {"longest_edge": longest}) == expected


def test_output_sizes_match_hf():
    """The size arithmetic (int truncation, even rounding, 4096 cap) agrees with HF's on many shapes."""
    pytest.importorskip("transformers")
    from transformers.image_transforms import get_resize_output_image_size as clip_size
    from transformers.models.idefics3 import image_processing_idefics3 as hf

    rng = np.random.default_rng(0)
    shapes = [tuple(int(x) for x in rng.integers(1, 3000, 2)) for _ in range(3000)]
    shapes += [(1, 1), (1, 2999), (2999, 1), (4095, 4097), (364, 364), (365, 364)]
    for h, w in shapes:
        dummy = np.zeros((h, w, 3), np.uint8)
        for longest in (32, 128, 1456, 5000):
            assert I._idefics3_resize_size(h, w, {"longest_edge": longest}) == \
                hf.get_resize_output_image_size(dummy, longest, input_data_format="channels_last")
        for short in (30, 224, 336):
            assert I._clip_resize_size(h, w, {"shortest_edge": short}) == \
                clip_size(dummy, short, default_to_square=False, input_data_format="channels_last")
    proc = hf.Idefics3ImageProcessor()
    for h, w in [tuple(int(x) for x in rng.integers(1, 200, 2)) for _ in range(300)]:
        resized = proc.resize_for_vision_encoder(np.zeros((h, w, 3), np.uint8), 32, input_data_format="channels_last")
        assert I._idefics3_encoder_size(h, w, 32) == resized.shape[:2]


def test_idefics3_encoder_size():
    assert I._idefics3_encoder_size(30, 128, 32) == (32, 128)
    assert I._idefics3_encoder_size(128, 34, 32) == (128, 64)
    assert I._idefics3_encoder_size(32, 32, 32) == (32, 32)


# ---------------------------------------------------------------------------- bad inputs

CLIP_MIN = {"processor": "clip", "image_token": "<image>", "image_seq_len": 1, "do_resize": False, "size": {},
            "resample": 3, "do_center_crop": False, "crop_size": None, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": False, "image_mean": None, "image_std": None}


def assert_one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg, msg
    assert isinstance(exc_info.value, InduceKVError)
    for n in needles:
        assert n in msg, msg


def test_non_image_file(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n" * 20)
    with pytest.raises(I.ImageError) as e:
        I.load_image(p)
    assert_one_line(e, "cannot read image", str(p))


def test_truncated_png(tmp_path):
    p = tmp_path / "cut.png"
    noise(200, 200, 3).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(I.ImageError) as e:
        I.load_image(str(p))
    assert_one_line(e, "cannot read image", "cut.png")
    with Image.open(p) as lazy, pytest.raises(I.ImageError) as e:  # opened by the caller, decoded by us
        I.preprocess(lazy, CLIP_MIN)
    assert_one_line(e, "cannot read image")


def test_missing_and_directory(tmp_path):
    with pytest.raises(I.ImageError) as e:
        I.load_image(tmp_path / "nope.jpg")
    assert_one_line(e, "no such file")
    with pytest.raises(I.ImageError) as e:
        I.load_image(tmp_path)
    assert_one_line(e, "directory")


def test_too_many_pixels(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    noise(100, 100, 1).save(p)
    monkeypatch.setattr(I, "MAX_PIXELS", 99 * 100)
    for image in (p, str(p), Image.open(p), np.zeros((100, 100, 3), np.uint8)):
        with pytest.raises(I.ImageError) as e:
            I.load_image(image)
        assert_one_line(e, "10,000 pixels", "9,900")
    with pytest.raises(I.ImageError):
        I.preprocess(p, CLIP_MIN)


def test_bad_arrays_and_types():
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)):
        with pytest.raises(I.ImageError) as e:
            I.load_image(bad)
        assert_one_line(e)
    with pytest.raises(I.ImageError) as e:
        I.load_image(12)
    assert_one_line(e, "int")
    assert I.load_image(np.zeros((5, 6), np.uint8)).mode == "RGB"
    assert I.load_image(np.zeros((5, 6, 4), np.uint8)).size == (6, 5)


def test_bad_settings():
    with pytest.raises(I.ImageError) as e:
        I.preprocess(CASES["small"], {"processor": "siglip"})
    assert_one_line(e, "siglip")
    with pytest.raises(I.ImageError) as e:
        I.preprocess(CASES["small"], {"processor": "idefics3"})
    assert_one_line(e, "re-export")


def test_module_is_torch_free():
    code = textwrap.dedent("""
        import sys, numpy as np
        import inducekv.runtime.images as I
        s = {"processor": "idefics3", "image_token": "<image>", "image_seq_len": 2,
             "fake_image_token": "<f>", "global_image_token": "<g>", "do_resize": True,
             "size": {"longest_edge": 64}, "resample": 1, "do_image_splitting": True,
             "max_image_size": {"longest_edge": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        pv, mask, text = I.preprocess(np.zeros((40, 50, 3), np.uint8), s)
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        print(pv.shape, heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(5, 3, 32, 32) []"
