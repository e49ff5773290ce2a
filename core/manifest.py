"""Bundle manifest: schema, writing, and the checks the runtime runs at open.

Part of the core leaf (``inducekv.core``): the exporter writes it, the device side reads it.

A bundle is a directory::

    manifest.json      schema version, source, fingerprint, architecture, tokens, files
    decoder.onnx       decoder graph (names in ``contract.py``), weights inline or in
    decoder.onnx.data  an external-data file next to it
    tokenizer.json     a `tokenizers` file (no transformers needed to read it)

This module must stay importable without torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from inducekv.core import contract
from inducekv.core.errors import BundleError

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # a manifest is a few KB; refuse anything huge


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    source_model: str            # "default:SmolLM2-135M-Instruct", a path, or an id
    fingerprint: str             # sha256 over source weights + weight format; banks record it
    architecture: str            # HF model_type, a key of the export registry
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int             # max positions the model was trained for
    rope: dict                   # {"theta": float, "scaling": dict | None}
    special_tokens: dict         # {"bos_token_id", "eos_token_ids": [...], "pad_token_id"}
    add_bos_token: bool          # prepend BOS when encoding a rendered prompt
    chat_template: str | None    # jinja2 source, rendered in a sandbox
    weights: str                 # "fp32" | "int8" | "int4"
    files: dict                  # name -> {"size": int, "sha256": str}
    image: dict | None = None    # image settings for multimodal bundles
    retrieval_key: dict | None = None  # how the frozen retrieval key is computed
    probe: dict | None = None    # the learn-time probe graph {"graph": "probe.onnx"} (contract.PROBE_FILE)
    attention_scale: float | None = None   # the decoder's q.k softmax scale (Gemma 3: query_pre_attn_scalar ** -0.5);
                                           # None (bundles before it): 1 / sqrt(head_dim)
    kind: str = contract.BUNDLE_KIND
    extra: dict = field(default_factory=dict)

    @property
    def score_scale(self) -> float:
        """What attention logits are multiplied by: ``q . k * score_scale``."""
        return float(self.attention_scale) if self.attention_scale is not None else self.head_dim ** -0.5

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(bundle_dir: Path, names: list[str]) -> dict:
    return {n: {"size": (bundle_dir / n).stat().st_size, "sha256": sha256_file(bundle_dir / n)} for n in names}


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    """Write manifest.json atomically (temp file, fsync, replace)."""
    path = Path(bundle_dir) / contract.MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_REQUIRED = {
    "schema_version": int, "source_model": str, "fingerprint": str, "architecture": str,
    "num_layers": int, "num_attention_heads": int, "num_kv_heads": int, "head_dim": int,
    "hidden_size": int, "vocab_size": int, "max_context": int, "rope": dict,
    "special_tokens": dict, "add_bos_token": bool, "weights": str, "files": dict,
}


def read_manifest(bundle_dir: str | os.PathLike, verify_hashes: bool = False) -> Manifest:
    """Read and check a bundle's manifest; raise BundleError with a fix on any problem.

    Cheap checks always run (schema, types, every listed file present with its
    recorded size). ``verify_hashes`` also re-hashes every file (slow for big models).
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir} is not a directory; build one with `ikv-export default -o {bundle_dir}`")
    path = bundle_dir / contract.MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"bundle {bundle_dir} has no {contract.MANIFEST_NAME}; re-run ikv-export into an empty directory")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is {path.stat().st_size} bytes, more than a manifest can be; the bundle is corrupt, re-export it")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is corrupt, re-export it") from None
    if not isinstance(raw, dict) or raw.get("kind") != contract.BUNDLE_KIND:
        raise BundleError(f"{path} is not an inducekv bundle manifest (kind != {contract.BUNDLE_KIND!r})")
    if raw.get("schema_version") != contract.SCHEMA_VERSION:
        raise BundleError(
            f"{path} has schema_version {raw.get('schema_version')!r}; this inducekv reads "
            f"{contract.SCHEMA_VERSION}: re-export the bundle with this version")
    for key, typ in _REQUIRED.items():
        if not isinstance(raw.get(key), typ) or (typ is int and isinstance(raw.get(key), bool)):
            raise BundleError(f"{path}: field {key!r} must be {typ.__name__}, found {type(raw.get(key)).__name__}; re-export the bundle")
    scale = raw.get("attention_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise BundleError(f"{path}: field 'attention_scale' must be a positive number, found {scale!r}; re-export the bundle")
    known = set(Manifest.__dataclass_fields__)
    manifest = Manifest(**{k: v for k, v in raw.items() if k in known})
    if manifest.weights not in contract.WEIGHT_FORMATS:
        raise BundleError(f"{path}: weights {manifest.weights!r} is not one of {', '.join(contract.WEIGHT_FORMATS)}")
    for name in (contract.DECODER_FILE, contract.TOKENIZER_FILE):
        if name not in manifest.files:
            raise BundleError(f"{path} lists no {name}; re-export the bundle")
    for name, meta in manifest.files.items():
        if os.path.basename(name) != name or name.startswith("."):
            raise BundleError(f"{path} lists file {name!r} outside the bundle; refusing it")
        f = bundle_dir / name
        if not f.is_file():
            raise BundleError(f"bundle file {f} is missing; re-export the bundle")
        if f.stat().st_size != meta.get("size"):
            raise BundleError(
                f"bundle file {f} is {f.stat().st_size} bytes, manifest says {meta.get('size')}: "
                "it was truncated or replaced; re-export the bundle")
        if verify_hashes and sha256_file(f) != meta.get("sha256"):
            raise BundleError(f"bundle file {f} does not match its sha256 in the manifest; re-export the bundle")
    return manifest
