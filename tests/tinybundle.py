"""A tiny Llama bundle built without torch or transformers, for device-side tests.

    python tests/tinybundle.py OUT_DIR        # ~1.2 MB: decoder.onnx, key.onnx, probe.onnx, tokenizer.json, manifest.json

Seeded random weights (2 layers, hidden 64, 4 query / 2 KV heads, a byte-level
vocabulary of 259) go through the exporter's own native graph builder
(``export/graph.py``, which needs only numpy and onnx) and the bundle contract's
manifest writer, so the runtime and the learn job can be tested in an environment
without torch. The exporter's torch parity checks are tested on the HF-built tiny
bundles (``conftest.tiny_bundles``); this bundle is for everything after export.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONFIG = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                         intermediate_size=128, head_dim=16, rms_norm_eps=1e-5, rope_theta=50000.0,
                         max_position_embeddings=512, rope_scaling=None, vocab_size=len(SPECIALS) + 256)


def byte_tokenizer():
    """A byte-level BPE ``tokenizers.Tokenizer`` with no merges: 3 specials + the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def weights(cfg=CONFIG, seed: int = 0) -> dict[str, np.ndarray]:
    """An HF-Llama-named state dict (fp32); large enough weights that greedy argmax is peaked."""
    rng = np.random.default_rng(seed)
    H, Hkv, D, E, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size

    def w(out, inp):  # (out, in) like nn.Linear
        return (rng.standard_normal((out, inp)) * (4.0 / np.sqrt(inp))).astype(np.float32)

    state = {"model.embed_tokens.weight": rng.standard_normal((cfg.vocab_size, E)).astype(np.float32),
             "model.norm.weight": np.ones(E, np.float32), "lm_head.weight": w(cfg.vocab_size, E)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": np.ones(E, np.float32),
                      p + "post_attention_layernorm.weight": np.ones(E, np.float32),
                      p + "self_attn.q_proj.weight": w(H * D, E), p + "self_attn.k_proj.weight": w(Hkv * D, E),
                      p + "self_attn.v_proj.weight": w(Hkv * D, E), p + "self_attn.o_proj.weight": w(E, H * D),
                      p + "mlp.gate_proj.weight": w(F, E), p + "mlp.up_proj.weight": w(F, E),
                      p + "mlp.down_proj.weight": w(E, F)})
    return state


def build(out: str | Path, seed: int = 0, probe: bool = True) -> Path:
    """Write the bundle to ``out`` (created); returns it. ``probe``: also the learn-time probe
    graph (``probe.onnx``, for ``ikv-learn --compact``); False builds a bundle from before it."""
    import onnx

    from inducekv.core import contract
    from inducekv.core.manifest import Manifest, describe_files, write_manifest
    from inducekv.export.graph import build_llama_graph

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, state = CONFIG, weights(seed=seed)
    key_layers = 1
    onnx.save_model(build_llama_graph(state, cfg), out / contract.DECODER_FILE)
    onnx.save_model(build_llama_graph(state, cfg, key_layers=key_layers), out / contract.KEY_FILE)
    if probe:
        onnx.save_model(build_llama_graph(state, cfg, query_outputs=True), out / contract.PROBE_FILE)
    (out / contract.TOKENIZER_FILE).write_text(byte_tokenizer().to_str(), encoding="utf-8")
    files = [contract.DECODER_FILE, contract.KEY_FILE, contract.TOKENIZER_FILE] + ([contract.PROBE_FILE] if probe else [])
    digest = hashlib.sha256(b"".join(state[k].tobytes() for k in sorted(state))).hexdigest()
    write_manifest(out, Manifest(
        schema_version=contract.SCHEMA_VERSION, source_model=f"tests/tinybundle.py:seed{seed}",
        fingerprint=hashlib.sha256(f"{digest}:fp32".encode()).hexdigest(), architecture="llama",
        num_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size, max_context=cfg.max_position_embeddings,
        rope={"theta": cfg.rope_theta, "scaling": None},
        special_tokens={"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 0}, add_bos_token=False,
        chat_template=CHATML, weights="fp32", files=describe_files(out, files),
        retrieval_key={"graph": contract.KEY_FILE, "layers": key_layers, "pooling": "mean", "dim": cfg.hidden_size,
                       "input": "prompt text, no chat template"},
        probe={"graph": contract.PROBE_FILE} if probe else None,
        extra={"graph": "native", "built_by": "tests/tinybundle.py"}))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tinybundle.py OUT_DIR")
    print(build(sys.argv[1]))
