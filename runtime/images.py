"""Image preprocessing for vision-language bundles: numpy + Pillow, no torch, no transformers.

Reproduces the Hugging Face *slow* image processors bit for bit (pixel values
are computed with the same Pillow calls and the same float32/float64 steps):

* ``"clip"``     -- ``CLIPImageProcessor`` / ``LlavaImageProcessor`` (LLaVA):
  convert to RGB -> [LLaVA ``do_pad``: pad to a square with the mean colour]
  -> resize (shortest edge, or fixed height x width) -> center crop (zero-padded
  when the crop is larger than the image) -> rescale -> normalize.
  One tile; the prompt's ``<image>`` becomes ``<image> * image_seq_len``.
* ``"idefics3"`` -- ``Idefics3ImageProcessor`` (Idefics3):
  resize so the longest edge is ``size["longest_edge"]`` (small images are
  *upscaled*; the other edge is rounded up to an even number) -> either
  (splitting) resize both edges up to multiples of ``max_image_size`` and cut
  ``rows x cols`` square tiles plus a global tile, or (no splitting) squash to
  one ``max_image_size`` square -> alpha over white -> rescale -> normalize.
* ``"llava_onevision"`` -- ``LlavaOnevisionImageProcessor`` (LLaVA-OneVision):
  "anyres" tiling (best grid pinpoint, fit + black pad, square tiles, the
  squashed whole image first) and its feature layout: ``runtime/anyres.py``.

The settings are a plain JSON dict exported from the HF processor with
``export/hfimages.py`` (workstation side: the only code that reads an HF object).

HF behaviours that matter for parity, all reproduced here:

* Every resize is ``PIL.Image.resize`` on uint8 pixels, so each step of a
  chain (longest edge -> multiple of the tile -> global tile) re-quantises to
  uint8, and RGBA images are resized premultiplied (Pillow's ``RGBa``).
* Output sizes use ``int()`` truncation of float expressions, evaluated in the
  same order as HF (e.g. ``int(width / (width0 / height0))``), then Idefics3
  bumps an odd short edge by one.
* Rescale is ``uint8 -> float64 * factor -> float32``; normalize is
  ``(x - mean) / std`` in float32.
* Idefics3 keeps an RGBA image's alpha through the resizes and composites it
  over white at the end; CLIP drops alpha (``convert("RGB")``) first. A path
  is opened like ``transformers.image_utils.load_image`` (EXIF rotation, then
  ``convert("RGB")``, which drops alpha) for both.

Where HF has no usable behaviour we convert to RGB first: grayscale and
palette images (the slow Idefics3 processor raises on 2-D images, and resizes
HxWx1 arrays with NEAREST because it routes them through a palette-mode PIL
image), and images with alpha for CLIP given as arrays.

Padding: the HF Idefics3 processor pads a *batch* to its largest tile and
returns a ``pixel_attention_mask``. Every Idefics3 tile is exactly
``max_image_size`` square (tiles are cut from an image whose edges are
multiples of it; the global / unsplit image is resized to it), so padding is a
no-op and the mask is all ones. :func:`preprocess` still pads the tiles of one
image to their largest size (bottom/right, zeros after normalisation, like HF)
and always returns the mask (bool) for Idefics3, also when ``do_pad`` is off.
"""
from __future__ import annotations

import io

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inducekv.core.errors import InduceKVError

__all__ = ["ImageError", "MAX_PIXELS", "load_image", "preprocess", "expand_prompt",
           "idefics3_image_text"]

MAX_PIXELS = 64_000_000  # width * height; bigger inputs are refused (decompression bombs)
IDEFICS3_MAX_SIDE = 4096  # HF Idefics3's absolute cap on a resized edge (MAX_IMAGE_SIZE)
PROCESSORS = ("clip", "idefics3", "llava_onevision")


class ImageError(InduceKVError):
    """An image cannot be read or is unusable (missing, corrupt, too large, bad array)."""


# ---------------------------------------------------------------------------- loading

def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(f"image {what} is {width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{MAX_PIXELS:,}; downscale it first")
    if width < 1 or height < 1:
        raise ImageError(f"image {what} is empty ({width}x{height})")


def _read_file(path) -> Image.Image:
    """Open, decode, EXIF-rotate and convert a file (a path, or an image file's bytes) to RGB;
    any failure is a one-line ImageError."""
    what = "(bytes)" if isinstance(path, bytes) else str(path)
    try:
        if isinstance(path, bytes):
            path = io.BytesIO(path)
        elif not path.exists():
            raise ImageError(f"cannot read image {path}: no such file")
        elif path.is_dir():
            raise ImageError(f"cannot read image {path}: it is a directory")
        with Image.open(path) as im:  # reads the header only
            # Check the declared size before decoding any pixels. Pillow's own guard
            # (Image.MAX_IMAGE_PIXELS, process-global) only raises at twice its limit.
            _check_pixels(im.width, im.height, what)
            im.load()  # truncated / corrupt data fails here
            return ImageOps.exif_transpose(im).convert("RGB")  # a new image: the file can close
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError,
            EOFError, MemoryError) as e:  # SyntaxError/EOFError: some plugins' "bad file" errors
        raise ImageError(f"cannot read image {what}: {_one_line(e)}") from None


def _from_array(a: np.ndarray) -> Image.Image:
    """uint8 HxW, HxWx1, HxWx3 or HxWx4 -> PIL image in mode L / RGB / RGBA."""
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8, got {getattr(a, 'dtype', type(a).__name__)}; "
                         "convert with (x * 255).round().astype(np.uint8)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"image arrays must be HxW, HxWx1, HxWx3 or HxWx4 (channels last), got shape {a.shape}")
    _check_pixels(a.shape[1], a.shape[0], f"array {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a))


def load_image(image) -> Image.Image:
    """A path, an image file's bytes, PIL image or uint8 array -> RGB PIL image (like transformers' ``load_image``).

    Files get their EXIF orientation applied, as do PIL images (HF does both);
    alpha is dropped, not composited (``convert("RGB")``).
    """
    if isinstance(image, (str, Path)):
        return _read_file(Path(image))
    if isinstance(image, bytes):   # an image file's bytes (a bank's source entry)
        return _read_file(image)
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, "(PIL)")
        try:
            return ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # e.g. a lazily opened, truncated file
            raise ImageError(f"cannot read image (PIL): {_one_line(e)}") from None
    if isinstance(image, np.ndarray):
        return _from_array(image).convert("RGB")
    raise ImageError(f"an image must be a path, a PIL image or a uint8 numpy array, got {type(image).__name__}")


def _working_image(image, keep_alpha: bool) -> Image.Image:
    """Input -> PIL image in mode RGB, or RGBA when ``keep_alpha`` and the input has alpha.

    Paths behave like HF's processors given a path (load_image: RGB). In-memory
    images are not EXIF-rotated (HF's processors do not rotate them either).
    """
    if isinstance(image, (str, Path, bytes)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        im = _from_array(image)
    elif isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, "(PIL)")
        try:
            image.load()  # a lazily opened file decodes here; corrupt data fails here, not mid-pipeline
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageError(f"cannot read image (PIL): {_one_line(e)}") from None
        im = image
    else:
        raise ImageError(f"an image must be a path, a PIL image or a uint8 numpy array, got {type(image).__name__}")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
    if keep_alpha and has_alpha:
        return im if im.mode == "RGBA" else im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


# ---------------------------------------------------------------------------- shared steps

def _normalize(tiles: np.ndarray, s: dict) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), exactly as HF's rescale + normalize.

    HF computes ``float32(float64(x) * factor)`` then ``(x - mean) / std`` in
    float32. A uint8 channel has only 256 values, so the same float operations
    are done once on ``arange(256)`` (a (3, 256) table) and then looked up --
    bit-identical, and ~10x faster than doing them per pixel.
    """
    levels = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)  # (3, 256)
    if s["do_rescale"]:
        table = (levels.astype(np.float64) * float(s["rescale_factor"])).astype(np.float32)
    else:
        table = levels.astype(np.float32)
    if s["do_normalize"]:
        mean = np.asarray(s["image_mean"], dtype=np.float32)[:, None]  # (3, 1)
        std = np.asarray(s["image_std"], dtype=np.float32)[:, None]
        table = (table - mean) / std
    planes = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))  # uint8 (N, 3, H, W)
    out = np.empty(planes.shape, dtype=np.float32)
    for c in range(3):
        out[:, c] = table[c][planes[:, c]]
    return out


def _resize(im: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    return im.resize((width, height), resample=Image.Resampling(resample))


# ---------------------------------------------------------------------------- clip / llava

def _clip_resize_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """(H, W) after CLIP's resize: shortest edge -> n (long edge truncated), or a fixed (h, w)."""
    if "shortest_edge" in size:
        n = int(size["shortest_edge"])
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(n * long / short)  # same evaluation order as HF: (n * long) / short
        return (new_long, n) if width <= height else (n, new_long)
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ImageError(f"clip settings: size must have 'shortest_edge' or 'height' and 'width', got {size}")


def _pad_to_square(a: np.ndarray, mean: list) -> np.ndarray:
    """uint8 (H, W, 3) -> (M, M, 3), M = max(H, W), centred on the mean colour (LLaVA do_pad)."""
    h, w = a.shape[:2]
    if h == w:
        return a
    m = max(h, w)
    out = np.empty((m, m, 3), dtype=np.uint8)
    out[:] = np.array([int(x * 255) for x in mean], dtype=np.uint8)
    if w > h:
        top = (m - h) // 2
        out[top:top + h] = a
    else:
        left = (m - w) // 2
        out[:, left:left + w] = a
    return out


def _center_crop(a: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (crop_h, crop_w, 3); an axis shorter than the crop is centred in zeros."""
    h, w = a.shape[:2]

    def axis(size, crop):  # -> (source start, destination start, length)
        if crop <= size:
            return (size - crop) // 2, 0, crop
        return 0, (crop - size + 1) // 2, size  # HF: ceil((crop - size) / 2) of padding before

    sy, dy, ly = axis(h, crop_h)
    sx, dx, lx = axis(w, crop_w)
    if dy == 0 and dx == 0:
        return a[sy:sy + ly, sx:sx + lx]
    out = np.zeros((crop_h, crop_w, a.shape[2]), dtype=a.dtype)
    out[dy:dy + ly, dx:dx + lx] = a[sy:sy + ly, sx:sx + lx]
    return out


def clip_image_seq_len(height: int, width: int, s: dict) -> int:
    """Number of <image> tokens for one (height, width) tile, as LlavaProcessor counts them."""
    p = s.get("patch_size")
    if not p:
        if s.get("image_seq_len") is None:
            raise ImageError("clip settings have neither patch_size nor image_seq_len; re-export the bundle")
        return int(s["image_seq_len"])
    n = (height // p) * (width // p) + int(s.get("num_additional_image_tokens") or 0)
    return n - 1 if s.get("vision_feature_select_strategy") == "default" else n


def _preprocess_clip(image, s: dict):
    im = _working_image(image, keep_alpha=False)  # RGB
    if s.get("pad_to_square"):
        im = Image.fromarray(_pad_to_square(np.asarray(im), s["image_mean"]))
    if s["do_resize"]:
        h, w = _clip_resize_size(im.height, im.width, s["size"])
        im = _resize(im, h, w, s["resample"])
    a = np.asarray(im)  # (H, W, 3) uint8
    if s["do_center_crop"]:
        a = _center_crop(a, int(s["crop_size"]["height"]), int(s["crop_size"]["width"]))
    pixel_values = _normalize(a[None], s)  # (1, 3, H, W)
    n = clip_image_seq_len(a.shape[0], a.shape[1], s)
    return pixel_values, None, s["image_token"] * n


# ---------------------------------------------------------------------------- idefics3

def _idefics3_resize_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """(H, W) after Idefics3's do_resize: longest edge -> L (also upscaling), short edge even."""
    if "longest_edge" not in size:
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        raise ImageError(f"idefics3 settings: size must have 'longest_edge' or 'height' and 'width', got {size}")
    longest = int(size["longest_edge"])
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2  # odd -> next even
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # Then scale down below HF's 4096 cap (a no-op unless longest_edge > 4096).
    aspect = width / height
    if width >= height and width > IDEFICS3_MAX_SIDE:
        width = IDEFICS3_MAX_SIDE
        height = int(width / aspect)
    elif height > width and height > IDEFICS3_MAX_SIDE:
        height = IDEFICS3_MAX_SIDE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _idefics3_encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of the tile edge, keeping roughly the aspect ratio."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def idefics3_image_text(rows: int, cols: int, s: dict) -> str:
    """The text one <image> placeholder expands to for a rows x cols split (0, 0: not split)."""
    fake, image, glob = s["fake_image_token"], s["image_token"], s["global_image_token"]
    run = image * int(s["image_seq_len"])
    parts = []
    for r in range(rows):
        for c in range(cols):
            parts.append(f"{fake}<row_{r + 1}_col_{c + 1}>{run}")
        parts.append("\n")
    if rows or cols:
        parts.append("\n")  # a blank line between the tile grid and the global image
    parts.append(f"{fake}{glob}{run}{fake}")
    return "".join(parts)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """PIL RGB/RGBA -> uint8 (H, W, 3); alpha is composited over white (HF Idefics3's convert_to_rgb)."""
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im).convert("RGB")
    return np.asarray(im)


def _preprocess_idefics3(image, s: dict):
    tile = int(s["max_image_size"]["longest_edge"])
    resample = s["resample"]
    im = _working_image(image, keep_alpha=True)  # RGB or RGBA
    if s["do_resize"]:
        im = _resize(im, *_idefics3_resize_size(im.height, im.width, s["size"]), resample)
    rows = cols = 0
    if s["do_image_splitting"]:
        im = _resize(im, *_idefics3_encoder_size(im.height, im.width, tile), resample)
        h, w = im.height, im.width
        if h > tile or w > tile:
            rows, cols = math.ceil(h / tile), math.ceil(w / tile)
            th, tw = math.ceil(h / rows), math.ceil(w / cols)  # == tile, as h and w are multiples of it
            frames = [im.crop((c * tw, r * th, min((c + 1) * tw, w), min((r + 1) * th, h)))
                      for r in range(rows) for c in range(cols)]  # row-major, like the prompt
            frames.append(_resize(im, tile, tile, resample))  # the global image comes last
        else:
            frames = [im]  # already exactly tile x tile
    else:
        frames = [_resize(im, tile, tile, resample)]
    arrays = [_to_rgb_array(f) for f in frames]  # N x (h_i, w_i, 3) uint8

    # Pad to the largest tile (bottom/right) like HF's batch padding; a no-op for real
    # settings, where every tile is tile x tile.
    ph, pw = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    if all(a.shape[:2] == (ph, pw) for a in arrays):
        pixel_values = _normalize(np.stack(arrays), s)  # (N, 3, ph, pw)
        mask = np.ones((len(arrays), ph, pw), dtype=bool)
    else:
        pixel_values = np.zeros((len(arrays), 3, ph, pw), dtype=np.float32)
        mask = np.zeros((len(arrays), ph, pw), dtype=bool)
        for i, a in enumerate(arrays):
            pixel_values[i, :, :a.shape[0], :a.shape[1]] = _normalize(a[None], s)[0]
            mask[i, :a.shape[0], :a.shape[1]] = True
    return pixel_values, mask, idefics3_image_text(rows, cols, s)


# ---------------------------------------------------------------------------- public

_REQUIRED = {
    "clip": ("image_token", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
             "rescale_factor", "do_normalize", "image_mean", "image_std"),
    "idefics3": ("image_token", "image_seq_len", "fake_image_token", "global_image_token", "do_resize", "size",
                 "resample", "do_image_splitting", "max_image_size", "do_rescale", "rescale_factor",
                 "do_normalize", "image_mean", "image_std"),
    "llava_onevision": ("image_token", "do_resize", "size", "resample", "do_rescale", "rescale_factor",
                        "do_normalize", "image_mean", "image_std", "image_grid_pinpoints", "num_image_tokens",
                        "vision_aspect_ratio"),
}


def _check_settings(settings) -> str:
    kind = settings.get("processor") if isinstance(settings, dict) else None
    if kind not in PROCESSORS:
        raise ImageError(f"image settings name processor {kind!r}; expected one of {', '.join(PROCESSORS)}")
    missing = [k for k in _REQUIRED[kind] if k not in settings]
    if missing:
        raise ImageError(f"{kind} image settings lack {', '.join(missing)}; re-export the bundle")
    return kind


def preprocess(image, settings: dict) -> tuple[np.ndarray, np.ndarray | None, str]:
    """One image -> (pixel_values, pixel_attention_mask, image_text).

    pixel_values: float32 (N, 3, H, W); N = 1 for clip, rows * cols + 1 for a
    split Idefics3 image, 1 for an unsplit one, 1 + rows * cols for
    LLaVA-OneVision (its base tile first).
    pixel_attention_mask: bool (N, H, W) for idefics3 (all True in practice),
    None for clip and llava_onevision.
    image_text: what replaces ONE image placeholder in the prompt, exactly as
    the HF processor expands it.
    """
    kind = _check_settings(settings)
    if kind == "llava_onevision":
        from inducekv.runtime import anyres   # it builds on this module's steps

        prepared = anyres.prepare(image, settings)
        return prepared.pixel_values, None, prepared.text
    return {"clip": _preprocess_clip, "idefics3": _preprocess_idefics3}[kind](image, settings)


def expand_prompt(text: str, images: list, settings: dict) -> tuple[str, list[np.ndarray], list]:
    """Replace each image placeholder in ``text`` by its expansion, in order.

    Returns (expanded text, pixel_values per image, pixel_attention_mask per
    image (None entries for clip)). LlavaProcessor sizes every placeholder
    from the *first* image; this uses each image's own size, which is the same
    whenever the processor center-crops (the LLaVA default).
    """
    _check_settings(settings)
    token = settings["image_token"]
    pieces = text.split(token)
    if len(pieces) - 1 != len(images):
        raise ImageError(f"the prompt has {len(pieces) - 1} {token} placeholders but {len(images)} images were "
                         "given; use one placeholder per image")
    out, pixels, masks = [pieces[0]], [], []
    for image, rest in zip(images, pieces[1:]):
        pv, mask, image_text = preprocess(image, settings)
        pixels.append(pv)
        masks.append(mask)
        out += [image_text, rest]
    return "".join(out), pixels, masks
