"""The bundle I/O contract: one table imported by the exporter and the runtime (core leaf).

The decoder graph uses the names optimum and onnxruntime-genai use::

    inputs   input_ids                 int64  (batch, seq)
             attention_mask            int64  (batch, past + seq)   1 = attend, 0 = hidden
             position_ids              int64  (batch, seq)
             past_key_values.{i}.key   float  (batch, kv_heads, past, head_dim)
             past_key_values.{i}.value float  (batch, kv_heads, past, head_dim)
             attention_bias            float  (batch, layers, past + seq)   native graph only: added to the
                                                attention scores of every head of each layer (0 = no change)
    outputs  logits                    float  (batch, seq, vocab)
             present.{i}.key           float  (batch, kv_heads, past + seq, head_dim)
             present.{i}.value         float  (batch, kv_heads, past + seq, head_dim)

This module must stay importable without torch.
"""
from __future__ import annotations

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
BUNDLE_KIND = "inducekv-bundle"

DECODER_FILE = "decoder.onnx"
TOKENIZER_FILE = "tokenizer.json"

# The retrieval-key graph: the first layers of the same model, no past KV.
#   inputs  input_ids, attention_mask, position_ids   int64 (batch, seq)
#   output  key                                        float (batch, hidden)
# Its weights are the decoder's: it references the decoder's external data file.
KEY_FILE = "key.onnx"
KEY_OUTPUT = "key"

# The learn-time probe graph (native graph only; optional: bundles before it lack it): the
# decoder with the same inputs and outputs plus each layer's post-RoPE queries
#   query.{i}   float (batch, seq, heads * head_dim)
# ``ikv-learn --compact genv`` reads them to score entry tokens. Like key.onnx it references
# the decoder's external data file; the manifest names it in ``probe`` ({"graph": PROBE_FILE}).
PROBE_FILE = "probe.onnx"

INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"   # multimodal decoders: float (batch, seq, hidden) instead of input_ids
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
ATTENTION_BIAS = "attention_bias"  # weighted memory injection (README, "Memory"); bundles before it lack it
LOGITS = "logits"
# Optional decoder/probe input (a graph input with a default initializer, [0]; bundles before it
# lack it): int64 (1,) ``from``; ``logits`` then holds only rows from..S-1: (batch, S - from, vocab).
# onnxruntime lists it among a session's overridable initializers, not its inputs.
LOGITS_FROM = "logits_from"
# Decoder/probe graph metadata (onnx metadata_props; optional, bundles before it lack it): "shared"
# when each present.{i} may be bound to the buffer of past_key_values.{i} (B, kv_heads, capacity,
# head_dim): a step then writes its new slots after the attention_mask's past length in place,
# and present has the buffer's shape (export/fuse.py: GroupQueryAttention).
KV_BUFFER_KEY = "inducekv.kv_buffer"
# Model metadata: "attention" when the attention op applies RoPE itself (export/fuse.py:
# GroupQueryAttention do_rotary). Such a graph honours any position_ids after a past, but with
# an empty past only the first one (positions[0] + arange(S)): the runtime feeds a prompt whose
# positions do not count up by one after a hidden past slot (runtime/session.py Decoder._run).
ROTARY_KEY = "inducekv.rotary"

WEIGHT_FORMATS = ("fp32", "int8", "int4")

# Multimodal bundles (manifest["image"] is set) add:
#   vision.onnx              pixel_values float (tiles, 3, H, W) -> image_features float (tiles, n, hidden)
#                            (vision tower + projector/connector; n image tokens per tile)
#   embed_tokens.safetensors tensor "embed_tokens" (vocab, hidden): the token-embedding table the
#                            runtime gathers from (fp32 for fp32 bundles, fp16 otherwise)
# and their decoder and key graphs take inputs_embeds instead of input_ids. LLaVA-OneVision
# bundles also carry
#   image_newline.safetensors tensor "image_newline" (hidden,): the vector the runtime appends
#                            after each row of an image's feature map (runtime/anyres.py)
VISION_FILE = "vision.onnx"
EMBED_FILE = "embed_tokens.safetensors"
EMBED_TENSOR = "embed_tokens"
PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
NEWLINE_FILE = "image_newline.safetensors"
NEWLINE_TENSOR = "image_newline"


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


def decoder_inputs(num_layers: int, embeds: bool = False, bias: bool = False, rows: bool = False) -> list[str]:
    """The decoder's graph inputs in order (``rows``: with the optional ``LOGITS_FROM`` last,
    as the ONNX file lists it; onnxruntime sessions do not list it)."""
    names = [INPUTS_EMBEDS if embeds else INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    for i in range(num_layers):
        names += [past_key(i), past_value(i)]
    return names + ([ATTENTION_BIAS] if bias else []) + ([LOGITS_FROM] if rows else [])


def decoder_outputs(num_layers: int) -> list[str]:
    names = [LOGITS]
    for i in range(num_layers):
        names += [present_key(i), present_value(i)]
    return names


def query_output(layer: int) -> str:
    return f"query.{layer}"


def probe_outputs(num_layers: int) -> list[str]:
    """The probe graph's outputs: the decoder's, then every layer's queries."""
    return decoder_outputs(num_layers) + [query_output(i) for i in range(num_layers)]
