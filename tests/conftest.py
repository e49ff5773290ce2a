"""Session fixtures: tiny random-config models built from real architectures (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tinybundle import CHATML, SPECIALS, byte_tokenizer


def tiny_tokenizer():
    """A byte-level tokenizer: 3 specials + the 256 byte symbols, no merges."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def tiny_llama_config(**over):
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(SPECIALS) + 256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rope_theta=50000.0,  # not the library default, so a dropped theta shows up
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(over)
    return LlamaConfig(**kw)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """An HF directory with a random tiny Llama (2 layers, GQA 4/2 heads) and a byte tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():  # larger weights than init -> peaked logits, so argmax is a meaningful check
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d, safe_serialization=True)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_bundles(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """fp32, int8 and int4 bundles of the tiny Llama."""
    from inducekv.export.build import export_bundle

    root = tmp_path_factory.mktemp("tiny-bundles")
    out = {}
    for w in ("fp32", "int8", "int4"):
        export_bundle(str(tiny_llama_dir), root / w, weights=w, progress=False)
        out[w] = root / w
    return out


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def device_bundle(tmp_path_factory) -> Path:
    """The tiny Llama bundle built without torch (``tests/tinybundle.py``): for runtime and learn
    tests that need no comparison with the torch model."""
    from tinybundle import build

    return build(tmp_path_factory.mktemp("device-bundle") / "fp32")


@pytest.fixture(scope="module")
def rt(device_bundle):
    """A Runtime on the torch-free tiny bundle, one per test module (a module that needs
    another bundle defines its own ``rt``)."""
    from inducekv.runtime.api import Runtime

    return Runtime.open(device_bundle)


@pytest.fixture(scope="module")
def layout(rt):
    """The default memory layout (``facts`` template, ``rerotate``) over ``rt``."""
    from inducekv.runtime.memory import TEMPLATES, Layout

    return Layout(rt, TEMPLATES["facts"], "rerotate")
