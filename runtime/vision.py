"""Images on the device: the vision graph, and token embeddings with image features spliced in.

A multimodal bundle's decoder and key graphs take ``inputs_embeds``. The prompt is
tokenized as text in which each image became its placeholder expansion
(``images.preprocess``: e.g. 64 ``<image>`` tokens between ``<fake_token_around_image>``
markers); ``Embedder`` looks the ids up in the token-embedding table and overwrites the
rows of the image-token ids, in order, with the vision graph's output::

    ids       (T,)           int   <- tokenizer, image tokens included
    features  (n_img, hidden) float <- Vision.encode: vision.onnx over the image's tiles
    embeds    (1, T, hidden)  float <- table[ids]; embeds[ids == image_token_id] = features

LLaVA-OneVision features are laid out after the vision graph (``anyres.pack``: base tile,
unpadded and pooled tile grid, a newline vector after each row).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inducekv.core import contract
from inducekv.runtime import anyres, images
from inducekv.core.errors import BundleError, InduceKVError


@dataclass
class ImageInput:
    features: np.ndarray   # (n_image_tokens, hidden) float32, in prompt order
    text: str              # the placeholder expansion that stands for the image in the prompt
    preprocess_ms: float
    vision_ms: float


@functools.lru_cache(maxsize=2)
def _table(path: str, size: int) -> np.ndarray:
    """The embedding table, read once per process (decoder and key pass share it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            if list(f.keys()) != [contract.EMBED_TENSOR]:
                raise BundleError(f"{path} must hold exactly one tensor {contract.EMBED_TENSOR!r}; re-export the bundle")
            table = f.get_tensor(contract.EMBED_TENSOR)
    except SafetensorError as e:
        raise BundleError(f"cannot read {path}: {e}; re-export the bundle") from None
    return table


class Embedder:
    """ids (+ image features) -> inputs_embeds for a multimodal bundle."""

    def __init__(self, bundle_dir: Path, manifest):
        spec = manifest.image or {}
        path = Path(bundle_dir) / spec.get("embeddings", contract.EMBED_FILE)
        if not path.is_file():
            raise BundleError(f"multimodal bundle {bundle_dir} has no {path.name}; re-export it")
        self.table = _table(str(path), path.stat().st_size)
        if self.table.ndim != 2 or self.table.shape[1] != manifest.hidden_size:
            raise BundleError(f"{path.name} is {self.table.shape}, the manifest says hidden {manifest.hidden_size}; "
                              "re-export the bundle")
        self.image_token_id = int(spec["image_token_id"])

    def __call__(self, ids, features: np.ndarray | None = None) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.table.shape[0]):
            raise InduceKVError(f"token id out of range for a vocabulary of {self.table.shape[0]}")
        x = self.table[ids].astype(np.float32, copy=False)                  # (T, hidden), a fresh array
        slots = ids == self.image_token_id
        n = int(slots.sum())
        have = 0 if features is None else features.shape[0]
        if n != have:
            raise InduceKVError(f"the prompt has {n} image tokens but {have} image features were given; "
                                "pass the image with image=..., and do not type image tokens in the text")
        if n:
            x[slots] = features
        return x[None]                                                       # (1, T, hidden)


class Vision:
    """The vision graph over one image: preprocessing (numpy/Pillow) + vision.onnx."""

    def __init__(self, bundle_dir: Path, manifest, profile):
        from inducekv.runtime.session import _session

        if not manifest.image:
            raise InduceKVError("this bundle is text-only; images need a multimodal bundle "
                                "(ikv-export default-vlm, or a LLaVA / Idefics3 / LLaVA-OneVision checkpoint)")
        self.settings = manifest.image
        self.sess = _session(Path(bundle_dir) / self.settings.get("vision_graph", contract.VISION_FILE), profile,
                             spinning=False)
        self.hidden = manifest.hidden_size
        self.newline = None
        if self.settings.get("processor") == anyres.KIND:
            self.newline = _newline(Path(bundle_dir) / self.settings.get("image_newline", contract.NEWLINE_FILE),
                                    self.hidden)

    def encode(self, image) -> ImageInput:
        t0 = time.perf_counter()
        size = None
        if self.newline is not None:
            prepared = anyres.prepare(image, self.settings)
            pixels, size, text = prepared.pixel_values, prepared.size, prepared.text   # (tiles, 3, S, S)
        else:
            pixels, _, text = images.preprocess(image, self.settings)           # (tiles, 3, H, W)
        t1 = time.perf_counter()
        feats = self.sess.run([contract.IMAGE_FEATURES], {contract.PIXEL_VALUES: pixels})[0]  # (tiles, n, hidden)
        if feats.ndim != 3 or feats.shape[-1] != self.hidden:
            raise BundleError(f"vision graph returned {feats.shape}, expected (tiles, n, {self.hidden}); re-export")
        feats = anyres.pack(feats, size, self.settings, self.newline) if size else feats.reshape(-1, self.hidden)
        t2 = time.perf_counter()
        return ImageInput(feats, text, (t1 - t0) * 1e3, (t2 - t1) * 1e3)


def _newline(path: Path, hidden: int) -> np.ndarray:
    """LLaVA-OneVision's image_newline vector (hidden,) from its safetensors file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise BundleError(f"LLaVA-OneVision bundle has no {path.name}; re-export it")
    try:
        with safe_open(str(path), framework="np") as f:
            if list(f.keys()) != [contract.NEWLINE_TENSOR]:
                raise BundleError(f"{path} must hold exactly one tensor {contract.NEWLINE_TENSOR!r}; re-export the bundle")
            vec = f.get_tensor(contract.NEWLINE_TENSOR)
    except SafetensorError as e:
        raise BundleError(f"cannot read {path}: {e}; re-export the bundle") from None
    if vec.shape != (hidden,):
        raise BundleError(f"{path.name} is {vec.shape}, the manifest says hidden {hidden}; re-export the bundle")
    return vec.astype(np.float32)


def with_image(prompt: str, image, manifest) -> str:
    """The prompt text with the image's placeholder expansion spliced in (first image token
    in the text, else at the start)."""
    if image is None:
        return prompt
    token = (manifest.image or {}).get("image_token", "<image>")
    if token in prompt:
        return prompt.replace(token, image.text, 1)
    return image.text + prompt
