"""LLaVA-OneVision images on the device: "anyres" tiling before the vision graph, and the
feature layout after it. numpy + Pillow, no torch; reproduces transformers'
``LlavaOnevisionImageProcessor`` (slow), ``LlavaOnevisionProcessor`` (token count) and
``LlavaOnevisionModel.pack_image_features`` (single-image path)::

    image (H, W) --best pinpoint (Hb, Wb)--> fit inside it, pad black --> rows x cols tiles of S
          \\------------------------------ squash to S x S -----------> base tile, sent first
    vision.onnx  (1 + rows * cols, 3, S, S) -> (1 + rows * cols, p * p, hidden)    p = S / patch
    layout       base tile's p * p features, then the tile grid as one (rows * p, cols * p)
                 feature map: cropped to the image's aspect ratio (the black padding's
                 features dropped), bilinearly pooled when it holds more than
                 ``anyres_max_N`` tiles' worth (ratio > 1.1), one ``image_newline`` vector
                 after each of its rows

The prompt's ``<image>`` becomes ``p * p + h * w + h`` image tokens (h, w: the final map).
The vision graph stays a plain per-tile graph (no data-dependent shapes); :func:`pack` does
the layout here, after it. The runtime sends one image per vision call, which is HF's
single-image path (a prompt with several images takes HF's multi-image path, pad to square
and no tiling; the runtime encodes each image, entry or query, on its own).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from inducekv.runtime import images as _images
from inducekv.runtime.images import ImageError

KIND = "llava_onevision"   # the image settings' "processor"


@dataclass(frozen=True)
class Prepared:
    pixel_values: np.ndarray    # float32 (1 + rows * cols, 3, S, S): the base tile first, then the grid row-major
    size: tuple[int, int]       # the image's (H, W) before any resize: the layout crops to its aspect ratio
    text: str                   # what one <image> placeholder expands to


@dataclass(frozen=True)
class Layout:
    rows: int                   # tile grid rows (best pinpoint height / S)
    cols: int                   # tile grid columns
    crop: tuple[int, int, int, int]   # (top, bottom, left, right) of the (rows * p, cols * p) map kept by unpadding
    pooled: tuple[int, int] | None    # (h, w) after bilinear pooling; None when not pooled

    @property
    def map_shape(self) -> tuple[int, int]:
        """(h, w) of the final feature map (newlines not counted)."""
        if self.pooled is not None:
            return self.pooled
        t, b, l, r = self.crop
        return b - t, r - l


# ---------------------------------------------------------------------------- geometry

def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint (H, W) that keeps the most of the image's pixels, then wastes the fewest
    (HF ``select_best_resolution``: first best in list order)."""
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    if best is None:
        raise ImageError("llava_onevision settings: image_grid_pinpoints is empty; re-export the bundle")
    return best


def fit_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the image resized to fit inside ``target`` keeping its aspect (HF ``get_patch_output_size``)."""
    th, tw = target
    sw, sh = tw / width, th / height
    if sw < sh:
        return min(math.ceil(height * sw), th), tw
    return th, min(math.ceil(width * sh), tw)


def _tile(s: dict) -> int:
    size = s["size"]
    if "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise ImageError(f"llava_onevision settings: tiles must be square, got size {size}; re-export the bundle")
        return int(size["height"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    raise ImageError(f"llava_onevision settings: size must have 'height' and 'width', got {size}")


def _per_side(s: dict) -> int:
    p = math.isqrt(int(s["num_image_tokens"]))
    if p * p != int(s["num_image_tokens"]):
        raise ImageError(f"llava_onevision settings: num_image_tokens {s['num_image_tokens']} is not a square")
    return p


def _max_tiles(s: dict) -> int:
    text = str(s["vision_aspect_ratio"])
    digits = text.strip("anyres_max_")   # HF's own parse of "anyres_max_9"
    if not digits.isdigit():
        raise ImageError(f"llava_onevision settings: vision_aspect_ratio {text!r} is not 'anyres_max_N'")
    return int(digits)


def layout(height: int, width: int, s: dict) -> Layout:
    """Where the image's features land (``pack_image_features`` arithmetic, the processor's count)."""
    S, p = _tile(s), _per_side(s)
    bh, bw = best_resolution(height, width, s["image_grid_pinpoints"])
    rows, cols = bh // S, bw // S
    ch, cw = rows * p, cols * p
    top, bottom, left, right = 0, ch, 0, cw
    if width / height > cw / ch:                   # wider than the grid: black bars top and bottom
        new_h = int(round(height * (cw / width), 7))
        pad = (ch - new_h) // 2
        top, bottom = pad, ch - pad
    else:
        new_w = int(round(width * (ch / height), 7))
        pad = (cw - new_w) // 2
        left, right = pad, cw - pad
    h, w = bottom - top, right - left
    ratio = math.sqrt(h * w / (_max_tiles(s) * p * p))
    pooled = (int(h // ratio), int(w // ratio)) if ratio > 1.1 else None
    return Layout(rows, cols, (top, bottom, left, right), pooled)


def num_image_tokens(height: int, width: int, s: dict) -> int:
    """Image tokens one (height, width) image takes: base tile + feature map + one newline per row."""
    h, w = layout(height, width, s).map_shape
    return int(s["num_image_tokens"]) + h * w + h


# ---------------------------------------------------------------------------- pixels

def prepare(image, s: dict) -> Prepared:
    """One image -> base tile + grid tiles, normalised, and its placeholder expansion."""
    S = _tile(s)
    im = _images._working_image(image, keep_alpha=False)        # RGB
    height, width = im.height, im.width
    bh, bw = best_resolution(height, width, s["image_grid_pinpoints"])
    fitted = np.asarray(_images._resize(im, *fit_size(height, width, (bh, bw)), s["resample"]))   # (h, w, 3)
    canvas = np.zeros((bh, bw, 3), np.uint8)                    # HF pads with 0 before normalising
    y0, x0 = (bh - fitted.shape[0]) // 2, (bw - fitted.shape[1]) // 2
    canvas[y0:y0 + fitted.shape[0], x0:x0 + fitted.shape[1]] = fitted
    grid = canvas.reshape(bh // S, S, bw // S, S, 3).transpose(0, 2, 1, 3, 4).reshape(-1, S, S, 3)   # row-major tiles
    base = np.asarray(_images._resize(im, S, S, s["resample"]))[None]                               # (1, S, S, 3)
    pixel_values = _images._normalize(np.concatenate([base, grid]), s)                              # (N, 3, S, S)
    return Prepared(pixel_values, (height, width), s["image_token"] * num_image_tokens(height, width, s))


# ---------------------------------------------------------------------------- features

def _bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, H, W) -> (C, out_h, out_w), as torch ``interpolate(mode="bilinear", align_corners=False)``."""
    def axis(n_in, n_out):
        scale = np.float32(n_in / n_out)
        src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
        i0 = src.astype(np.int64)                                # floor: src >= 0
        i1 = np.minimum(i0 + 1, n_in - 1)
        w1 = (src - i0).astype(np.float32)
        return i0, i1, np.float32(1) - w1, w1

    y0, y1, hy0, hy1 = axis(x.shape[1], out_h)
    x0, x1, wx0, wx1 = axis(x.shape[2], out_w)
    top = x[:, y0][:, :, x0] * wx0 + x[:, y0][:, :, x1] * wx1     # (C, out_h, out_w)
    bot = x[:, y1][:, :, x0] * wx0 + x[:, y1][:, :, x1] * wx1
    return (top * hy0[:, None] + bot * hy1[:, None]).astype(np.float32)


def pack(features: np.ndarray, size: tuple[int, int], s: dict, newline: np.ndarray) -> np.ndarray:
    """Vision-graph output (1 + rows * cols, p * p, hidden) -> the image's token features
    (num_image_tokens, hidden), in prompt order."""
    lay = layout(*size, s)
    p = _per_side(s)
    n, per_tile, hidden = features.shape
    if n != 1 + lay.rows * lay.cols or per_tile != p * p:
        raise ImageError(f"vision graph gave {features.shape[:2]} tiles x features, the layout needs "
                         f"({1 + lay.rows * lay.cols}, {p * p}); re-export the bundle")
    grid = features[1:].reshape(lay.rows, lay.cols, p, p, hidden)                  # (rows, cols, p, p, C)
    fmap = grid.transpose(4, 0, 2, 1, 3).reshape(hidden, lay.rows * p, lay.cols * p)   # (C, rows*p, cols*p)
    t, b, l, r = lay.crop
    fmap = fmap[:, t:b, l:r]                                                       # (C, h, w) unpadded
    if lay.pooled is not None:
        fmap = _bilinear(np.ascontiguousarray(fmap), *lay.pooled)
    h, w = fmap.shape[1:]
    rows = np.concatenate([fmap, np.broadcast_to(newline[:, None, None], (hidden, h, 1))], axis=2)  # (C, h, w+1)
    tokens = rows.reshape(hidden, h * (w + 1)).T                                   # (h*(w+1), C)
    return np.concatenate([features[0], tokens]).astype(np.float32)               # (p*p + h*(w+1), C)
