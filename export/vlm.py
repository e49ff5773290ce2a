"""Multimodal export (workstation side, torch): LLaVA, Idefics3/SmolVLM and LLaVA-OneVision checkpoints.

A multimodal bundle is the text bundle plus (``contract.py``)::

    vision.onnx              pixel_values (tiles, 3, H, W) -> image_features (tiles, n, hidden)
    embed_tokens.safetensors the token-embedding table the runtime gathers from

and decoder/key graphs that take ``inputs_embeds``. The text model (Llama; Qwen2 in
LLaVA-OneVision) is the same native graph as for text models (``graph.py``); only the
vision side goes through ``torch.onnx.export`` (optimum cannot export LLaVA, its issue #1751).
LLaVA-OneVision adds ``image_newline.safetensors``: its vision graph is the per-tile
SigLIP tower + projector, and the runtime lays the tiles' features out (``runtime/anyres.py``).

The vision graphs are small wrappers around the HF modules (below), written so
the TorchScript tracer sees no data-dependent control flow: the runtime sends one
image at a time and every tile is full-size (LLaVA: one crop; Idefics3: square
tiles of ``max_image_size`` plus the global image; LLaVA-OneVision: square tiles of
the tower's ``image_size``), so the patch masks HF builds
are all ones and its position ids are a function of the tile shape alone.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from inducekv.core import contract
from inducekv.core.errors import InduceKVError, UnsupportedModelError

log = logging.getLogger(__name__)

VLM_TYPES = ("llava", "idefics3", "llava_onevision")
TEXT_TYPES = ("llama", "qwen2")   # text models the native graph runs behind a vision tower
_TEXT_PREFIX = {"llava": "model.language_model.", "idefics3": "model.text_model.",
                "llava_onevision": "model.language_model."}


def _onevision_processor(directory: Path):
    """``LlavaOnevisionProcessor`` without its video processor: HF's needs torchvision, and
    inducekv takes images only. Same image processor, tokenizer and processor_config.json."""
    from transformers import LlavaOnevisionProcessor

    class ImageOnlyProcessor(LlavaOnevisionProcessor):
        attributes = ["image_processor", "tokenizer"]   # the video_processor argument stays None

    return ImageOnlyProcessor.from_pretrained(directory, use_fast=False)


def load(directory: Path):
    """(model, processor) in fp32 on CPU from a local HF directory."""
    import json

    import torch
    from transformers import (AutoProcessor, Idefics3ForConditionalGeneration, LlavaForConditionalGeneration,
                              LlavaOnevisionForConditionalGeneration)

    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    cls = {"llava": LlavaForConditionalGeneration, "idefics3": Idefics3ForConditionalGeneration,
           "llava_onevision": LlavaOnevisionForConditionalGeneration}[model_type]
    if model_type == "llava_onevision":
        processor = _onevision_processor(directory)
    else:
        processor = AutoProcessor.from_pretrained(directory)
    if type(processor.image_processor).__name__.endswith("Fast"):  # the runtime reproduces the slow (PIL) one
        from transformers import AutoImageProcessor

        processor.image_processor = AutoImageProcessor.from_pretrained(directory, use_fast=False)
    model = cls.from_pretrained(directory, dtype=torch.float32).eval()
    return model, processor


def text_view(model) -> tuple[dict, object]:
    """(text state dict as numpy with ``model.*`` / ``lm_head.weight`` keys, text config)."""
    cfg = model.config.text_config
    if cfg.model_type not in TEXT_TYPES:
        raise UnsupportedModelError(
            f"the text model of this {model.config.model_type} checkpoint is {cfg.model_type!r}; "
            f"ikv-export supports {', '.join(TEXT_TYPES)} text models behind a vision tower")
    prefix = _TEXT_PREFIX[model.config.model_type]
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith(prefix):
            state["model." + k[len(prefix):]] = v.detach().float().numpy()
    head = model.state_dict()["lm_head.weight"].detach().float().numpy()
    emb = state["model.embed_tokens.weight"]
    if not (cfg.tie_word_embeddings and head.shape == emb.shape and np.array_equal(head, emb)):
        state["lm_head.weight"] = head
    return state, cfg


def _vision_module(model):
    import torch

    mt = model.config.model_type

    class Idefics3Vision(torch.nn.Module):
        """pixel_values (N, 3, H, W) full tiles -> connector output (N, n, hidden)."""

        def __init__(self):
            super().__init__()
            self.vm, self.connector = model.model.vision_model, model.model.connector

        def forward(self, pixel_values):
            emb = self.vm.embeddings
            x = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)          # (N, gh*gw, C)
            gh, gw = pixel_values.shape[2] // emb.patch_size, pixel_values.shape[3] // emb.patch_size
            # HF's position ids for an all-ones patch mask (same bucketing, incl. its 1e-6 shrink)
            nps = emb.num_patches_per_side
            bounds = torch.arange(1 / nps, 1.0, 1 / nps)
            bh = torch.bucketize(torch.arange(gh, dtype=torch.float32) / gh * (1 - 1e-6), bounds, right=True)
            bw = torch.bucketize(torch.arange(gw, dtype=torch.float32) / gw * (1 - 1e-6), bounds, right=True)
            x = x + emb.position_embedding((bh[:, None] * nps + bw).flatten())[None]
            h = self.vm.post_layernorm(self.vm.encoder(inputs_embeds=x).last_hidden_state)
            return self.connector(h)                                                    # (N, n, hidden)

    class LlavaVision(torch.nn.Module):
        """pixel_values (N, 3, H, W) -> projector(selected vision layer) (N, n, hidden)."""

        def __init__(self):
            super().__init__()
            self.tower, self.proj = model.model.vision_tower, model.model.multi_modal_projector
            self.layer = model.config.vision_feature_layer
            self.strategy = model.config.vision_feature_select_strategy

        def forward(self, pixel_values):
            hs = self.tower(pixel_values, output_hidden_states=True).hidden_states
            layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
            feats = [hs[i][:, 1:] if self.strategy == "default" else hs[i] for i in layers]
            return self.proj(torch.cat(feats, dim=-1))                                  # (N, n, hidden)

    if mt == "idefics3":
        return Idefics3Vision().eval()
    return LlavaVision().eval()


def tile_shape(settings: dict) -> tuple[int, int]:
    """(H, W) of one vision tile, from the runtime's image settings."""
    import inducekv.runtime.images as images

    px, _, _ = images.preprocess(np.zeros((8, 8, 3), np.uint8), settings)
    return int(px.shape[2]), int(px.shape[3])


def export_vision(model, path: Path, hw: tuple[int, int]) -> None:
    import torch

    import warnings

    module = _vision_module(model)
    dummy = torch.zeros(1, 3, *hw)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shapes: the tile shape is fixed by design
        torch.onnx.export(module, (dummy,), str(path), dynamo=False, opset_version=18,
                          input_names=[contract.PIXEL_VALUES], output_names=[contract.IMAGE_FEATURES],
                          dynamic_axes={contract.PIXEL_VALUES: {0: "tiles"}, contract.IMAGE_FEATURES: {0: "tiles"}})


def write_newline(model, path: Path) -> None:
    """LLaVA-OneVision's ``image_newline`` (hidden,) in fp32 (one vector: nothing to save)."""
    from safetensors.numpy import save_file

    save_file({contract.NEWLINE_TENSOR: model.model.image_newline.detach().float().numpy()}, str(path))


def check_onevision(model, settings: dict) -> None:
    """The runtime tiles with the processor's settings and lays features out with them; refuse
    a checkpoint whose model config disagrees (HF itself would fail on such a pair)."""
    cfg = model.config
    tile = settings["size"].get("height", settings["size"].get("shortest_edge"))
    problems = []
    if [list(map(int, p)) for p in cfg.image_grid_pinpoints] != settings["image_grid_pinpoints"]:
        problems.append("image_grid_pinpoints differ between config.json and the image processor")
    if cfg.vision_config.image_size != tile:
        problems.append(f"the vision tower takes {cfg.vision_config.image_size} px tiles, the processor cuts {tile}")
    if (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 != settings["num_image_tokens"]:
        problems.append(f"processor num_image_tokens {settings['num_image_tokens']} is not the tower's patches per tile")
    if cfg.vision_aspect_ratio != settings["vision_aspect_ratio"]:
        problems.append(f"vision_aspect_ratio {cfg.vision_aspect_ratio!r} (config) vs "
                        f"{settings['vision_aspect_ratio']!r} (processor)")
    if cfg.vision_feature_select_strategy != "full" or settings["vision_feature_select_strategy"] not in (None, "full"):
        problems.append("vision_feature_select_strategy must be 'full' (SigLIP has no CLS token to drop)")
    if problems:
        raise UnsupportedModelError(f"LLaVA-OneVision checkpoint not supported: {'; '.join(problems)}")


def write_embeddings(state: dict, path: Path, weights: str) -> None:
    from safetensors.numpy import save_file

    table = state["model.embed_tokens.weight"]
    save_file({contract.EMBED_TENSOR: table.astype(np.float32 if weights == "fp32" else np.float16)}, str(path))


def image_settings(model, processor) -> dict:
    from inducekv.export import hfimages

    s = hfimages.settings_from_hf(processor)
    s["image_token_id"] = image_token_id(model)
    s["vision_graph"] = contract.VISION_FILE
    s["embeddings"] = contract.EMBED_FILE
    if model.config.model_type == "llava_onevision":
        check_onevision(model, s)
        s["image_newline"] = contract.NEWLINE_FILE
    return s


def validate(model, processor, stage: Path, weights: str, threads: int) -> dict:
    """HF logits vs the ONNX pipeline (vision graph + embedding splice + decoder) on one
    image + prompt made by the HF processor."""
    import onnxruntime as ort
    import torch
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    from PIL import Image
    img = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    text = processor.image_token + "What is in the image?" if hasattr(processor, "image_token") else "<image>What?"
    batch = processor(text=[text], images=[[img]] if model.config.model_type == "idefics3" else [img],
                      return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).logits[0].float().numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3   # errors only: the optional logits_from input is an initializer by design
    vis = ort.InferenceSession(str(stage / contract.VISION_FILE), so, providers=["CPUExecutionProvider"])
    px = batch["pixel_values"].numpy().reshape(-1, *batch["pixel_values"].shape[-3:])
    feats = vis.run(None, {contract.PIXEL_VALUES: px})[0]
    if model.config.model_type == "llava_onevision":
        from inducekv.runtime import anyres
        from inducekv.runtime.vision import _newline

        settings = image_settings(model, processor)
        newline = _newline(stage / contract.NEWLINE_FILE, model.config.text_config.hidden_size)
        feats = anyres.pack(feats, tuple(int(x) for x in batch["image_sizes"][0]), settings, newline)[None]
    table = load_file(str(stage / contract.EMBED_FILE))[contract.EMBED_TENSOR].astype(np.float32)
    ids = batch["input_ids"][0].numpy()
    x = table[ids]
    img_id = image_token_id(model)
    if int((ids == img_id).sum()) != feats.shape[0] * feats.shape[1]:
        raise InduceKVError("export check failed: image token count does not match the vision graph's output")
    x[ids == img_id] = feats.reshape(-1, feats.shape[-1])
    dec = ort.InferenceSession(str(stage / contract.DECODER_FILE), so, providers=["CPUExecutionProvider"])
    cfg = model.config.text_config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    feed = {contract.INPUTS_EMBEDS: x[None], contract.ATTENTION_MASK: np.ones((1, len(ids)), np.int64),
            contract.POSITION_IDS: np.arange(len(ids), dtype=np.int64)[None]}
    for i in range(cfg.num_hidden_layers):
        feed[contract.past_key(i)] = np.zeros((1, cfg.num_key_value_heads, 0, hd), np.float32)
        feed[contract.past_value(i)] = np.zeros((1, cfg.num_key_value_heads, 0, hd), np.float32)
    from inducekv.export.build import zero_bias

    feed.update(zero_bias(dec, cfg.num_hidden_layers, len(ids)))
    got = dec.run([contract.LOGITS], feed)[0][0]
    return {"tokens": int(len(ids)), "image_tokens": int(feats.shape[0] * feats.shape[1]),
            "vision_tiles": int(px.shape[0]),
            "max_abs_logit_diff": float(np.abs(got - ref).max()),
            "max_abs_logit": float(np.abs(ref).max()),
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def image_token_id(model) -> int:
    """Idefics3 calls it image_token_id, LLaVA image_token_index."""
    cfg = model.config
    tid = getattr(cfg, "image_token_id", None)
    return int(tid if tid is not None else cfg.image_token_index)


def chat_template(processor, tokenizer) -> str | None:
    """Prefer the tokenizer's template (string content); fall back to the processor's."""
    t = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return t or (processor.chat_template if isinstance(getattr(processor, "chat_template", None), str) else None)


def check_supported(model_type: str) -> None:
    if model_type not in VLM_TYPES:
        raise UnsupportedModelError(f"multimodal architecture {model_type!r} is not supported; "
                                    f"supported: {', '.join(VLM_TYPES)}")
