"""Tiny random-initialised LLaVA and Idefics3 (SmolVLM) checkpoints, built from configs.

Both wrap a 2-layer Llama text model and the byte tokenizer of ``conftest.tiny_tokenizer``
plus the architecture's image special tokens. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

IMAGE_SPECIALS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def _tokenizer():
    from conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": IMAGE_SPECIALS})
    return tok


def _text_config(vocab: int) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=50000.0,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _scale(model):
    import torch

    with torch.no_grad():  # larger weights than init -> peaked logits, so argmax agreement means something
        for name, p in model.named_parameters():
            if p.dim() == 2 and "text_model" in name or "language_model" in name:
                p.mul_(4.0)


def make_idefics3(d: Path, splitting: bool = True) -> Path:
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = Idefics3Config(
        text_config=_text_config(len(tok)),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    _scale(model)
    proc = Idefics3Processor(
        Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                               do_image_splitting=splitting),
        tok, image_seq_len=4)  # (32 / 8)^2 patches / scale_factor^2
    model.save_pretrained(d, safe_serialization=True)
    proc.save_pretrained(d)
    return d


def make_llava(d: Path) -> Path:
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = LlavaConfig(
        text_config=_text_config(len(tok)),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=28, patch_size=7, projection_dim=32),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    _scale(model)
    proc = LlavaProcessor(
        CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tok, patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.save_pretrained(d, safe_serialization=True)
    proc.save_pretrained(d)
    return d


# LLaVA-OneVision: tiles of 32 px (SigLIP, patch 8: 4 x 4 = 16 features per tile); grids up to 3 x 2
# tiles; ``anyres_max_2`` so larger grids are pooled (bilinear) down to ~2 tiles of features,
# exercising the layout step that ``anyres_max_9`` only reaches on big images.
OV_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [96, 64]]
OV_ASPECT = "anyres_max_2"


def make_onevision(d: Path) -> Path:
    """Tiny random LLaVA-OneVision: SigLIP tower + 2-layer Qwen2 text model (q/k/v biases)."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor)

    torch.manual_seed(0)
    tok = _tokenizer()
    tok.add_special_tokens({"additional_special_tokens": IMAGE_SPECIALS + ["<video>"]})
    text = _text_config(len(tok))
    text.update(model_type="qwen2", rope_theta=30000.0)
    cfg = LlavaOnevisionConfig(
        text_config=text,
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio=OV_ASPECT,
        image_grid_pinpoints=OV_PINPOINTS, tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    _scale(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF zero-initialises biases: randomise them so a dropped q/k/v bias shows
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(d, safe_serialization=True)
    # The HF processor needs a video processor (torchvision, absent here): write its parts and
    # its processor_config.json the way LlavaOnevisionProcessor.save_pretrained does.
    LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=OV_PINPOINTS).save_pretrained(d)
    tok.save_pretrained(d)
    (d / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16, "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": OV_ASPECT, "image_token": "<image>", "video_token": "<video>"}))
    return d


def injected_vs_joint(bundle, a_image, b_image) -> tuple:
    """Logits of an image query after one injected image-bearing entry, and of the joint prefill
    of prefix + entry + query (the runtime's layout, ``facts`` template, rerotate)."""
    import numpy as np

    from inducekv.runtime import Runtime
    from inducekv.runtime.memory import TEMPLATES, Layout
    from inducekv.runtime.session import KVCache

    rt = Runtime.open(bundle)
    lay = Layout(rt, TEMPLATES["facts"], "rerotate")
    a, b = rt.encode_image(a_image), rt.encode_image(b_image)
    k, v = lay.encode_entry("What colour is the shape?", "teal", a)
    assert k.shape[2] == len(lay.entry_ids("What colour is the shape?", "teal", a)) > a.features.shape[0]
    cache, pos = lay.assemble([(k, v)])
    q = lay.query_ids("What colour is the shape?", b)
    injected, _ = rt.decoder.forward(q, cache, positions=np.arange(pos, pos + len(q)), features=b.features)
    joint_ids = lay.prefix_ids + lay.entry_ids("What colour is the shape?", "teal", a) + q
    joint, _ = rt.decoder.forward(joint_ids, KVCache.empty(rt.manifest),
                                  features=np.concatenate([a.features, b.features]))
    return injected, joint[-len(q):]
