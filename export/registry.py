"""Architectures ikv-export supports, as a registry keyed by HF ``model_type``.

Each entry says how to read the shape facts the runtime needs from an HF
config. Adding an architecture = adding one ``ArchSpec`` and a tiny-config
parity test; nothing else branches on the architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from inducekv.core.errors import UnsupportedModelError
from inducekv.export import flavour


@dataclass(frozen=True)
class ArchSpec:
    model_type: str                   # HF config.model_type
    optimum_task: str                 # optimum export task that yields past-KV I/O
    head_dim: Callable[[Any], int]    # config -> per-head dim
    native: bool = False              # export/graph.py can build it (compact graph, faster decode)
    flavour: Callable[[Any], flavour.Flavour] = flavour.llama   # config -> what the native graph changes


def _head_dim(cfg) -> int:
    cfg = getattr(cfg, "text_config", None) or cfg   # multimodal: the text model's
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


REGISTRY: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", "text-generation-with-past", _head_dim, native=True),
        ArchSpec("qwen2", "text-generation-with-past", _head_dim, native=True),      # q/k/v biases
        ArchSpec("qwen3", "text-generation-with-past", _head_dim, native=True, flavour=flavour.qwen3),
        ArchSpec("gemma3_text", "text-generation-with-past", _head_dim, native=True, flavour=flavour.gemma3),
        # multimodal: Llama (OneVision: Qwen2) text model + vision tower, exported by export/vlm.py
        ArchSpec("llava", "image-text-to-text", _head_dim, native=True),
        ArchSpec("idefics3", "image-text-to-text", _head_dim, native=True),
        ArchSpec("llava_onevision", "image-text-to-text", _head_dim, native=True),
    )
}


def lookup(model_type: str) -> ArchSpec:
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported by ikv-export; supported: "
            f"{', '.join(sorted(REGISTRY))}") from None
