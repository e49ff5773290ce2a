"""Tiny random HF checkpoints of the non-Llama decoder families the native graph supports.

Each config uses values that differ from the library defaults and from each other
(RoPE bases, attention scale, window) so a dropped or swapped setting changes the logits.
Vector weights (biases, norm scales) are randomised too: HF initialises biases to zero and
norm scales to one, which would hide a missing bias or a wrong norm offset.
"""
from __future__ import annotations

from pathlib import Path

from tinybundle import SPECIALS

COMMON = dict(vocab_size=len(SPECIALS) + 256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
WINDOW = 6   # Gemma 3's local layers see 6 KV slots: shorter than every test prompt


def config(arch: str):
    """The HF config of tiny ``arch`` (qwen2, qwen2-swa, qwen3, gemma3, gemma3-softcap)."""
    from transformers import Gemma3TextConfig, Qwen2Config, Qwen3Config

    if arch == "qwen2":
        return Qwen2Config(num_hidden_layers=2, rope_theta=50000.0, tie_word_embeddings=False, **COMMON)
    if arch == "qwen2-swa":   # use_sliding_window: layers from max_window_layers on see WINDOW slots
        return Qwen2Config(num_hidden_layers=2, rope_theta=50000.0, tie_word_embeddings=False, use_sliding_window=True,
                           sliding_window=WINDOW, max_window_layers=1, attn_implementation="eager", **COMMON)
    if arch == "qwen3":
        return Qwen3Config(num_hidden_layers=2, head_dim=16, rope_theta=50000.0, tie_word_embeddings=True, **COMMON)
    if arch.startswith("gemma3"):
        cap = arch == "gemma3-softcap"   # the attention cap is ignored, as transformers does
        return Gemma3TextConfig(num_hidden_layers=3, head_dim=16, rope_theta=50000.0, rope_local_base_freq=700.0,
                                query_pre_attn_scalar=24, sliding_window=WINDOW,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                attn_logit_softcapping=3.0 if cap else None, final_logit_softcapping=8.0 if cap else None,
                                tie_word_embeddings=True, attn_implementation="eager", **COMMON)
    raise ValueError(arch)


def model_class(arch: str):
    from transformers import Gemma3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

    return {"qwen2": Qwen2ForCausalLM, "qwen2-swa": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}.get(arch, Gemma3ForCausalLM)


def save(arch: str, directory: Path, tokenizer) -> Path:
    """Write a seeded random tiny ``arch`` checkpoint + tokenizer to ``directory``."""
    import torch

    torch.manual_seed(0)
    model = model_class(arch)(config(arch)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)   # peaked logits, so argmax is a meaningful check
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def load(arch: str, directory: Path):
    return model_class(arch).from_pretrained(directory, attn_implementation="eager").eval()
