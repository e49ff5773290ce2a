"""``ikv-export``: HF model (default, .gguf or directory) to an inducekv bundle.

Steps: resolve source -> check architecture -> load (torch) -> save fp32 HF dir
-> optimum ONNX export -> quantize weights -> tokenizer -> validate against the
torch model -> manifest. Everything is written to a temporary directory next to
the output and renamed into place at the end, so a killed export leaves no
half-written bundle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from inducekv.core import contract
from inducekv.export import registry, source as sources, vlm
from inducekv.core.manifest import Manifest, describe_files, write_manifest
from inducekv.core.errors import InduceKVError

log = logging.getLogger(__name__)

INLINE_LIMIT = 64 << 20  # larger models keep weights in decoder.onnx.data, which key.onnx shares
VALIDATION_TEXT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital"
# An fp32 export must give the torch model's logits up to summation order: the largest
# |dlogit| may be this share of the largest |logit| (the default VLM on an AMD EPYC: 1.6e-3 of
# 31.5, 5e-5, where the earlier absolute limit of 1e-3 failed it; a wrong graph, e.g. the
# rope_theta trap of notes/feasibility.md, is off by 6.6, about 0.3).
FP32_TOLERANCE = 5e-4


def check_fp32(report: dict, weights: str, where: str = "") -> None:
    """Raise when an fp32 export's logits are further from torch's than summation order explains."""
    limit = FP32_TOLERANCE * max(1.0, report["max_abs_logit"])
    if weights == "fp32" and report["max_abs_logit_diff"] > limit:
        raise InduceKVError(
            f"export check failed: ONNX logits differ from the torch model by {report['max_abs_logit_diff']:.3g} "
            f"(> {limit:.3g}, {FP32_TOLERANCE:g} of the largest logit){where}; the exported graph is wrong, "
            "please report it")


def _tokenizer_json(tokenizer, add_bos: bool) -> str:
    """The fast tokenizer as a `tokenizers` JSON; BOS insertion follows the source's flag."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if not add_bos and spec.get("post_processor", {}) and spec["post_processor"].get("type") == "TemplateProcessing":
        spec["post_processor"] = None  # transformers 4.57 adds BOS although the GGUF says not to
    return json.dumps(spec, ensure_ascii=False)


def _special_tokens(tokenizer, config) -> dict:
    eos = config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    return {
        "bos_token_id": config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id,
        "eos_token_ids": eos_ids,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0),
    }


def _save_decoder(onnx_model, out_dir: Path) -> list[str]:
    import onnx

    path = out_dir / contract.DECODER_FILE
    if onnx_model.ByteSize() < INLINE_LIMIT:
        onnx.save_model(onnx_model, path)
        return [contract.DECODER_FILE]
    data = contract.DECODER_FILE + ".data"
    onnx.save_model(onnx_model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    os.chmod(out_dir / data, 0o644)  # onnx creates it owner-only; a bundle is meant to be shared
    return [contract.DECODER_FILE, data]


def _validate(model, tokenizer_json: str, decoder: Path, weights: str, threads: int) -> dict:
    """Compare ORT logits with the torch model on a fixed prompt."""
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json).encode(VALIDATION_TEXT, add_special_tokens=False).ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3   # errors only: the optional logits_from input is an initializer by design
    sess = ort.InferenceSession(str(decoder), so, providers=["CPUExecutionProvider"])
    cfg = model.config
    kvh = cfg.num_key_value_heads
    hd = registry.lookup(cfg.model_type).head_dim(cfg)
    feed = {
        contract.INPUT_IDS: np.array([ids], dtype=np.int64),
        contract.ATTENTION_MASK: np.ones((1, len(ids)), dtype=np.int64),
        contract.POSITION_IDS: np.arange(len(ids), dtype=np.int64)[None],
    }
    for i in range(cfg.num_hidden_layers):
        feed[contract.past_key(i)] = np.zeros((1, kvh, 0, hd), np.float32)
        feed[contract.past_value(i)] = np.zeros((1, kvh, 0, hd), np.float32)
    feed.update(zero_bias(sess, cfg.num_hidden_layers, len(ids)))
    got = sess.run([contract.LOGITS], feed)[0][0]
    report = {
        "tokens": len(ids),
        "max_abs_logit_diff": float(np.abs(got - ref).max()),
        "max_abs_logit": float(np.abs(ref).max()),
        "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }
    check_fp32(report, weights)
    return report


GRAPHS = ("native", "optimum")


def zero_bias(sess, num_layers: int, total: int) -> dict:
    """The all-zero ``attention_bias`` feed of a native decoder session (none for optimum graphs)."""
    if contract.ATTENTION_BIAS not in {i.name for i in sess.get_inputs()}:
        return {}
    return {contract.ATTENTION_BIAS: np.zeros((1, num_layers, total), np.float32)}


def _optimum_graph(hf_model, tokenizer, spec, tmp: Path):
    """The decoder through optimum-onnx (any architecture optimum knows)."""
    import onnx
    from optimum.exporters.onnx import main_export

    hf_dir = tmp / "hf"
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    onnx_dir = tmp / "onnx"
    main_export(str(hf_dir), onnx_dir, task=spec.optimum_task, device="cpu",
                do_validation=False, local_files_only=True)
    return onnx.load(onnx_dir / "model.onnx")


def _state_of(hf_model) -> dict:
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _native_graph(state: dict, cfg, weights: str, key_layers: int | None = None, embeds: bool = False,
                  query_outputs: bool = False):
    from inducekv.export.graph import build_llama_graph

    flavour = registry.lookup(getattr(cfg, "model_type", "llama")).flavour(cfg)
    return build_llama_graph(state, cfg, share_tied=(weights == "fp32"), key_layers=key_layers,
                             embeds_input=embeds, query_outputs=query_outputs, flavour=flavour)


def key_layers_for(num_layers: int) -> int:
    """Depth of the retrieval-key pass: the first quarter of the model (early-to-middle layers)."""
    return max(1, round(num_layers / 4))


def _save_sharing_weights(model, stage: Path, name: str) -> None:
    """Write graph ``model`` to ``stage/name``; every weight it shares with the decoder points
    into the decoder's external data file (checked byte for byte), so it costs no extra disk."""
    import onnx

    dec = onnx.load(stage / contract.DECODER_FILE, load_external_data=False)
    shared = {t.name: t for t in dec.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    data_path = stage / (contract.DECODER_FILE + ".data")
    with open(data_path, "rb") if data_path.exists() else open(os.devnull, "rb") as data:
        for t in model.graph.initializer:
            ref = shared.get(t.name)
            if ref is None:
                continue
            info = {e.key: e.value for e in ref.external_data}
            data.seek(int(info.get("offset", 0)))
            if data.read(int(info["length"])) != onnx.numpy_helper.to_array(t).tobytes():
                continue  # same name, different bytes: keep this graph's own copy inline
            t.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data"):
                t.ClearField(field)
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.extend(ref.external_data)
    onnx.save_model(model, stage / name)


def _save_key_graph(state: dict, cfg, weights: str, stage: Path, key_layers: int, embeds: bool = False) -> list[str]:
    """Write ``key.onnx`` (weights shared with the decoder's data file)."""
    key_model = _native_graph(state, cfg, weights, key_layers, embeds)
    if weights != "fp32":
        key_model = quantize_weights_checked(key_model, weights)
    _save_sharing_weights(key_model, stage, contract.KEY_FILE)
    return [contract.KEY_FILE]


def _save_probe_graph(state: dict, cfg, weights: str, stage: Path, embeds: bool = False) -> list[str]:
    """Write ``probe.onnx``: the decoder plus every layer's queries (``ikv-learn --compact``),
    weights shared with the decoder's data file."""
    probe = _native_graph(state, cfg, weights, embeds=embeds, query_outputs=True)
    if weights != "fp32":
        probe = quantize_weights_checked(probe, weights)
    _save_sharing_weights(probe, stage, contract.PROBE_FILE)
    return [contract.PROBE_FILE]


def export_bundle(model: str, out: str | os.PathLike, weights: str = "fp32", force: bool = False,
                  progress: bool = True, validate: bool = True, threads: int = 2,
                  graph: str = "native") -> tuple[Manifest, dict]:
    """Build a bundle at ``out``; return (manifest, validation report).

    ``graph``: ``native`` (compact opset-23 graph, export/graph.py) or
    ``optimum`` (optimum-onnx's export).
    """
    import torch

    if graph not in GRAPHS:
        raise InduceKVError(f"--graph {graph!r} is not one of {', '.join(GRAPHS)}")
    if weights not in contract.WEIGHT_FORMATS:
        raise InduceKVError(f"--weights {weights!r} is not one of {', '.join(contract.WEIGHT_FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InduceKVError(f"output {out} exists and is not empty; pass --force to replace it")
    torch.set_num_threads(threads)
    steps = ["resolve", "load", "onnx export", "quantize", "tokenizer", "validate", "manifest"]
    bar = tqdm(total=len(steps), desc="ikv-export", unit="step", disable=not progress)

    def step(name):
        bar.set_postfix_str(name)

    step("resolve")
    built = None
    if model == sources.DEFAULT_VLM_NAME:  # assemble the HF Idefics3 directory from the wheel + trained tower
        from inducekv.export import default_vlm

        out.parent.mkdir(parents=True, exist_ok=True)
        built = tempfile.TemporaryDirectory(prefix=".ikv-default-vlm-", dir=out.parent)
        digest = default_vlm.build_hf_dir(Path(built.name))
        src = sources.Source(default_vlm.SOURCE_ID, Path(built.name), None, digest)
    else:
        src = sources.resolve(model)
    try:
        return _export(src, out, weights, graph, bar, step, threads, validate)
    finally:
        if built is not None:
            built.cleanup()


def _export(src, out: Path, weights: str, graph: str, bar, step, threads: int, validate: bool):
    spec = registry.lookup(sources.read_model_type(src))
    if graph == "native" and not spec.native:
        raise InduceKVError(f"architecture {spec.model_type!r} has no native graph yet; pass --graph optimum")
    bar.update()
    step("load")
    multimodal = spec.model_type in vlm.VLM_TYPES
    if multimodal:
        if graph != "native":
            raise InduceKVError("multimodal models export with the native graph only; drop --graph optimum")
        hf_model, processor = vlm.load(src.directory)
        tokenizer = processor.tokenizer
        state, cfg = vlm.text_view(hf_model)
    else:
        hf_model, tokenizer = sources.load(src)
        cfg = hf_model.config
        state = _state_of(hf_model) if graph == "native" else None
    bar.update()

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ikv-export-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        step("onnx export")
        onnx_model = _native_graph(state, cfg, weights, embeds=multimodal) if graph == "native" else \
            _optimum_graph(hf_model, tokenizer, spec, tmp)
        names_in = [i.name for i in onnx_model.graph.input]
        names_out = [o.name for o in onnx_model.graph.output]
        L = cfg.num_hidden_layers
        native = graph == "native"
        if names_in != contract.decoder_inputs(L, multimodal, bias=native, rows=native) \
                or names_out != contract.decoder_outputs(L):
            raise InduceKVError(f"the {graph} export produced a graph with inputs {names_in[:4]}... that do not "
                                "match the bundle contract; this architecture cannot be exported yet")
        bar.update()

        step("quantize")
        if weights != "fp32":
            onnx_model = quantize_weights_checked(onnx_model, weights)
        stage = tmp / "bundle"
        stage.mkdir()
        files = _save_decoder(onnx_model, stage)
        del onnx_model
        key_layers = key_layers_for(L)
        if graph == "native":
            files += _save_key_graph(state, cfg, weights, stage, key_layers, multimodal)
            files += _save_probe_graph(state, cfg, weights, stage, multimodal)
        image = None
        if multimodal:
            image = vlm.image_settings(hf_model, processor)
            vlm.export_vision(hf_model, stage / contract.VISION_FILE, vlm.tile_shape(image))
            vlm.write_embeddings(state, stage / contract.EMBED_FILE, weights)
            files += [contract.VISION_FILE, contract.EMBED_FILE]
            if "image_newline" in image:
                vlm.write_newline(hf_model, stage / contract.NEWLINE_FILE)
                files.append(contract.NEWLINE_FILE)
        bar.update()

        step("tokenizer")
        add_bos = sources.gguf_add_bos(src)
        if add_bos is None:
            add_bos = bool(getattr(tokenizer, "add_bos_token", False))
        tok_json = _tokenizer_json(tokenizer, add_bos)
        (stage / contract.TOKENIZER_FILE).write_text(tok_json, encoding="utf-8")
        files.append(contract.TOKENIZER_FILE)
        bar.update()

        step("validate")
        if not validate:
            report = {}
        elif multimodal:
            report = vlm.validate(hf_model, processor, stage, weights, threads)
            check_fp32(report, weights, " on an image prompt")
        else:
            report = _validate(hf_model, tok_json, stage / contract.DECODER_FILE, weights, threads)
        bar.update()

        step("manifest")
        rope_theta = getattr(cfg, "rope_theta", None)
        manifest = Manifest(
            schema_version=contract.SCHEMA_VERSION,
            source_model=src.model_id,
            fingerprint=hashlib.sha256(f"{src.digest}:{weights}".encode()).hexdigest(),
            architecture=spec.model_type,
            num_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=spec.head_dim(cfg),
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            max_context=int(getattr(cfg, "max_position_embeddings", 2048)),
            rope={"theta": float(rope_theta) if rope_theta else None,
                  "scaling": getattr(cfg, "rope_scaling", None),
                  **(spec.flavour(cfg).rope_manifest() if graph == "native" else {})},
            special_tokens=_special_tokens(tokenizer, cfg),
            add_bos_token=add_bos,
            chat_template=(vlm.chat_template(processor, tokenizer) if multimodal else _chat_template(tokenizer)),
            image=image,
            weights=weights,
            files=describe_files(stage, files),
            retrieval_key=({"graph": contract.KEY_FILE, "layers": key_layers, "pooling": "mean",
                            "dim": cfg.hidden_size,
                            "input": "image tokens + prompt text, no chat template" if multimodal
                            else "prompt text, no chat template"}
                           if graph == "native" else None),
            probe={"graph": contract.PROBE_FILE} if graph == "native" else None,
            attention_scale=_attention_scale(spec, cfg),
            extra={"export_validation": report, "graph": graph, "opset": _opset(stage)},
        )
        write_manifest(stage, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
        bar.update()
    bar.close()
    return manifest, report


def _chat_template(tokenizer) -> str | None:
    """The model's chat template; for a model with none whose vocabulary has no ChatML markers
    (a base model), the plain ``Question: ... Answer:`` template, since the runtime's ChatML
    fallback would feed it markers it never saw."""
    if isinstance(tokenizer.chat_template, str):
        return tokenizer.chat_template
    if tokenizer.convert_tokens_to_ids("<|im_start|>") in (None, tokenizer.unk_token_id):
        from inducekv.runtime.tokenizer import PLAIN_TEMPLATE

        return PLAIN_TEMPLATE
    return None


def _attention_scale(spec, cfg) -> float:
    """The decoder's q.k scale for the manifest: query_pre_attn_scalar ** -0.5 where the config has
    one (Gemma 3; ``flavour.gemma3`` gives the graph the same), else 1/sqrt(head_dim)."""
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    if scalar is not None:
        return float(scalar) ** -0.5
    return float(spec.head_dim(cfg)) ** -0.5


def _opset(stage: Path) -> int:
    import onnx

    m = onnx.load(stage / contract.DECODER_FILE, load_external_data=False)
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


def quantize_weights_checked(onnx_model, weights: str):
    """``quantize_weights``, then check that it did: the graph's inputs and outputs are
    unchanged and its MatMul weights became ``MatMulNBits`` (any MatMul with a constant
    float weight left behind is named in a warning; none quantized at all is an error)."""
    from inducekv.export import quantize as q

    io = ([i.name for i in onnx_model.graph.input], [o.name for o in onnx_model.graph.output])
    before = len(q.float_matmul_weights(onnx_model))
    out = q.quantize_weights(onnx_model, weights)
    if ([i.name for i in out.graph.input], [o.name for o in out.graph.output]) != io:
        raise InduceKVError(f"{weights} weight quantization changed the graph's inputs or outputs; please report it")
    left = q.float_matmul_weights(out)
    packed = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
    if before and not packed:
        raise InduceKVError(f"{weights} weight quantization left all {before} MatMul weights in float; "
                            "check the onnxruntime version (MatMulNBitsQuantizer) or export with --weights fp32")
    if left:
        log.warning("%s quantization left %d of %d MatMul weights in float: %s", weights, len(left), before,
                    ", ".join(left[:4]))
    return out
