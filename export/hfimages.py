"""Reading an HF image processor's settings into the JSON the runtime's preprocessing takes.

Workstation side only (``ikv-export``): the device side reads the settings from the
bundle manifest (``runtime/images.py`` reproduces the processors in numpy + Pillow).
"""
from __future__ import annotations

import re

import numpy as np
from PIL import Image

from inducekv.runtime.images import ImageError, clip_image_seq_len

def _plain(value):
    """HF config values (dicts, enums, numpy scalars, tuples) -> JSON types."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) or (hasattr(value, "dtype") and np.issubdtype(value.dtype, np.floating)):
        return float(value)
    return int(value)  # ints, IntEnums (PILImageResampling), numpy ints


def _per_channel(value):
    """A mean/std (scalar or list) -> 3 floats; HF repeats a scalar over the channels."""
    if value is None:
        return None
    values = [float(x) for x in np.atleast_1d(value)]
    return values * 3 if len(values) == 1 else values


def settings_from_hf(processor) -> dict:
    """An HF LLaVA, Idefics3 or LLaVA-OneVision *Processor* -> the JSON dict :func:`preprocess` needs.

    Duck-typed on attributes, so it works without importing transformers here.
    Fast image processors are read the same way, but :func:`preprocess`
    reproduces the *slow* processor (the fast ones resize with torchvision).
    """
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        raise ImageError(f"settings_from_hf needs an HF Processor with an image_processor, got "
                         f"{type(processor).__name__}")
    name = type(ip).__name__
    base = re.sub(r"Fast$", "", name)

    def attr(key, default=None):
        return _plain(getattr(ip, key, default))

    common = {
        "hf_image_processor": name,
        "image_token": str(getattr(processor, "image_token", "<image>")),
        "do_convert_rgb": bool(attr("do_convert_rgb", True)),
        "do_resize": bool(attr("do_resize", True)),
        "size": attr("size"),
        "resample": attr("resample"),
        "do_rescale": bool(attr("do_rescale", True)),
        "rescale_factor": float(attr("rescale_factor", 1 / 255)),
        "do_normalize": bool(attr("do_normalize", True)),
        "image_mean": _per_channel(attr("image_mean")),
        "image_std": _per_channel(attr("image_std")),
    }

    if base in ("CLIPImageProcessor", "LlavaImageProcessor"):
        s = {"processor": "clip", **common,
             "do_center_crop": bool(attr("do_center_crop", False)),
             "crop_size": attr("crop_size"),
             "pad_to_square": bool(attr("do_pad", False)) if base == "LlavaImageProcessor" else False,
             "patch_size": _plain(getattr(processor, "patch_size", None)),
             "num_additional_image_tokens": int(getattr(processor, "num_additional_image_tokens", 0) or 0),
             "vision_feature_select_strategy": getattr(processor, "vision_feature_select_strategy", None)}
        if s["resample"] is None:
            s["resample"] = int(Image.Resampling.BICUBIC)
        s["image_seq_len"] = None
        if s["patch_size"] and s["do_center_crop"] and s["crop_size"]:
            s["image_seq_len"] = clip_image_seq_len(s["crop_size"]["height"], s["crop_size"]["width"], s)
        return s
    if base == "Idefics3ImageProcessor":
        s = {"processor": "idefics3", **common,
             "image_seq_len": int(processor.image_seq_len),
             "do_image_splitting": bool(attr("do_image_splitting", True)),
             "max_image_size": attr("max_image_size"),
             "do_pad": bool(attr("do_pad", True)),
             "fake_image_token": str(getattr(processor, "fake_image_token", "<fake_token_around_image>")),
             "global_image_token": str(getattr(processor, "global_image_tag", "<global-img>")),
             "end_of_utterance_token": str(getattr(processor, "end_of_utterance_token", "<end_of_utterance>"))}
        if s["resample"] is None:
            s["resample"] = int(Image.Resampling.LANCZOS)
        return s
    if base == "LlavaOnevisionImageProcessor":
        s = {"processor": "llava_onevision", **common,
             "image_grid_pinpoints": [[int(h), int(w)] for h, w in ip.image_grid_pinpoints],
             "num_image_tokens": int(processor.num_image_tokens),
             "vision_aspect_ratio": str(processor.vision_aspect_ratio),
             "vision_feature_select_strategy": getattr(processor, "vision_feature_select_strategy", None)}
        if s["resample"] is None:
            s["resample"] = int(Image.Resampling.BICUBIC)
        return s
    raise ImageError(f"image processor {name} is not supported; supported: CLIPImageProcessor, "
                     "LlavaImageProcessor, Idefics3ImageProcessor, LlavaOnevisionImageProcessor")
