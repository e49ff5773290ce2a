"""What a decoder architecture changes in the native graph, as one frozen record.

The native graph (``graph.py``) is the Llama layer; each supported family differs
from it in a few switches, read from its HF config here and nowhere else:

| family | differs from Llama by |
|---|---|
| Qwen2 / Qwen2.5 | q/k/v biases (found in the state dict, no switch needed) |
| Qwen3 | per-head RMSNorm of q and k before RoPE |
| Gemma 3 (text) | q/k norms, (1+w) RMSNorm, norms after attention and around the MLP, GeGLU (tanh gelu), embeddings times sqrt(hidden), query_pre_attn_scalar, sliding-window layers with their own RoPE base, optional final logit soft-capping |

Gemma 3's config carries ``attn_logit_softcapping`` (None in the released models), but
its attention never applies it (q/k norms replaced it; transformers 4.57 ignores it too),
so neither does this graph.

Sliding windows (any family whose config lists ``layer_types``) are a real mask:
a query at KV slot q sees slot k on a windowed layer only if ``q - W < k <= q``
(transformers' rule). The window counts KV *slots*, not position ids.
"""
from __future__ import annotations

from dataclasses import dataclass

from inducekv.core.errors import UnsupportedModelError

ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class Flavour:
    thetas: tuple[float, ...]            # RoPE base per layer (Gemma 3: local vs global layers differ)
    windows: tuple[int | None, ...]      # sliding window per layer in KV slots; None = full causal attention
    qk_norm: bool = False                # Qwen3, Gemma 3: RMSNorm over each head's q and k before RoPE
    norm_offset: float = 0.0             # Gemma: RMSNorm multiplies by (offset + w); folded into the weight
    sandwich: bool = False               # Gemma: post-attention norm, pre- and post-feedforward norms
    activation: str = "silu"             # MLP gate activation: silu (Llama, Qwen) or gelu_tanh (Gemma)
    embed_scale: float | None = None     # Gemma: token embeddings multiplied by sqrt(hidden)
    attn_scale: float | None = None      # None: 1/sqrt(head_dim); Gemma: query_pre_attn_scalar ** -0.5
    final_softcap: float | None = None   # logits = cap * tanh(logits / cap)

    @property
    def windowed(self) -> bool:
        return any(w is not None for w in self.windows)

    def rope_manifest(self) -> dict:
        """What the manifest's ``rope`` adds so the runtime re-rotates each layer's keys by its own
        base (``kernels.positions.layer_thetas``); nothing when every layer shares one."""
        out = {}
        if len(set(self.thetas)) > 1:
            out["layer_theta"] = list(self.thetas)
        if self.windowed:
            out["layer_window"] = list(self.windows)
        return out


def _check_rope(scaling) -> None:
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise UnsupportedModelError(
            f"rope scaling {scaling!r} is not supported by the native graph yet; export with --graph optimum")


def _windows(cfg, L: int) -> tuple[int | None, ...]:
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * L
    window = getattr(cfg, "sliding_window", None)
    out = []
    for t in types[:L]:
        if t == "sliding_attention":
            if not window:
                raise UnsupportedModelError("the config marks sliding-attention layers but sets no sliding_window")
            out.append(int(window))
        elif t == "full_attention":
            out.append(None)
        else:
            raise UnsupportedModelError(f"attention layer type {t!r} is not supported by the native graph")
    return tuple(out)


def llama(cfg, layers: int | None = None) -> Flavour:
    """Llama, Qwen2/2.5 (biases come with the weights) and anything else with the plain layer."""
    L = layers or cfg.num_hidden_layers
    _check_rope(getattr(cfg, "rope_scaling", None))
    return Flavour(thetas=(float(cfg.rope_theta),) * L, windows=_windows(cfg, L))


def qwen3(cfg, layers: int | None = None) -> Flavour:
    base = llama(cfg, layers)
    return Flavour(thetas=base.thetas, windows=base.windows, qk_norm=True)


def gemma3(cfg, layers: int | None = None) -> Flavour:
    L = layers or cfg.num_hidden_layers
    _check_rope(getattr(cfg, "rope_scaling", None))
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"Gemma 3 with activation {act!r} is not supported; expected gelu_pytorch_tanh")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedModelError("bidirectional Gemma 3 (an embedding model) has no causal decoder to export")
    windows = _windows(cfg, L)
    local = float(cfg.rope_local_base_freq)
    thetas = tuple(local if w is not None else float(cfg.rope_theta) for w in windows)
    return Flavour(thetas=thetas, windows=windows, qk_norm=True, norm_offset=1.0, sandwich=True,
                   activation="gelu_tanh", embed_scale=float(cfg.hidden_size) ** 0.5,
                   attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5,
                   final_softcap=getattr(cfg, "final_logit_softcapping", None))
