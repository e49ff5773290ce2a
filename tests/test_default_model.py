"""The default bundle (SmolLM2-135M-Instruct) vs an independent numpy forward pass of its GGUF.

The export's own check compares ONNX with the torch model transformers loads from
the GGUF, so a config-mapping mistake both share (a dropped ``rope_theta``) passes
it. Here the reference reads the GGUF with the `gguf` package only
(tests/gguf_reference.py).

Uses the bundle at ``$IKV_DEFAULT_BUNDLE_DIR/fp32`` when it exists, else exports one
(about a minute) once per session.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

from inducekv.core.manifest import read_manifest  # noqa: E402
from inducekv.export.source import default_gguf_path  # noqa: E402
from inducekv.runtime import Runtime  # noqa: E402
from inducekv.core.errors import InduceKVError  # noqa: E402
from inducekv.runtime.session import KVCache  # noqa: E402

pytestmark = pytest.mark.default_model

GREEDY_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    try:
        return default_gguf_path()
    except InduceKVError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def default_bundle(gguf_path, tmp_path_factory) -> Path:
    env = os.environ.get("IKV_DEFAULT_BUNDLE_DIR")
    if env and (Path(env) / "fp32").is_dir():
        return Path(env) / "fp32"
    pytest.importorskip("transformers")
    from inducekv.export.build import export_bundle

    out = tmp_path_factory.mktemp("default-bundle") / "fp32"
    export_bundle("default", out, weights="fp32", progress=False)
    return out


@pytest.fixture(scope="session")
def reference(gguf_path):
    from gguf_reference import GGUFLlama

    return GGUFLlama(gguf_path)


@pytest.fixture(scope="session")
def runtime(default_bundle) -> Runtime:
    return Runtime.open(default_bundle)


def test_logits_match_numpy_reference(runtime, reference):
    ids = runtime.encode_prompt("What is the capital of France?", system="Be brief.")  # 24 tokens
    got, _ = runtime.decoder.forward(ids, KVCache.empty(runtime.manifest))           # (T, V)
    want = reference.logits(ids)                                                       # (T, V)
    # measured: max |dlogit| 4.8e-05 (logits up to ~38), every argmax equal
    assert np.abs(got - want).max() <= 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_greedy_continuation_matches_reference(runtime, reference, prompt):
    """16 greedy tokens from the runtime (cached decode) are the reference's greedy tokens:
    the reference, run once over prompt + tokens, picks each token from the prefix before it
    (by induction the same as re-running the reference step by step)."""
    ids = runtime.encode_prompt(prompt)
    out = runtime.generate(prompt, max_new_tokens=16, ignore_eos=True).token_ids
    assert len(out) == 16
    want = reference.logits(ids + out[:-1])[len(ids) - 1:].argmax(-1)                # (16,)
    assert out == want.tolist()


def test_rope_theta_from_gguf(default_bundle, reference):
    m = read_manifest(default_bundle)
    assert m.rope["theta"] == reference.rope_theta == 100000.0
    assert (m.num_layers, m.num_attention_heads, m.num_kv_heads, m.head_dim, m.hidden_size, m.vocab_size) == \
        (reference.layers, reference.heads, reference.kv_heads, reference.head_dim, reference.hidden, reference.vocab)


def test_injected_entry_matches_joint_prefill_and_int8_drift(runtime):
    """Issue 4 parity on the real model: one entry at its own positions after the shared
    prefix == the joint prefill (fp32 K/V); int8 payload drift is reported and bounded."""
    from inducekv.kernels import kvquant
    from inducekv.runtime.memory import TEMPLATES, Layout
    from inducekv.runtime.session import KVCache

    lay = Layout(runtime, TEMPLATES["facts"], "rerotate")
    fact = ("What is the capital of Vexland?", "Morrow")
    k, v = lay.encode_entry(*fact)
    q = lay.query_ids("Which city is Vexland's capital?")
    cache, pos = lay.assemble([(k, v)])
    injected, _ = runtime.decoder.forward(q, cache, positions=np.arange(pos, pos + len(q)))
    joint, _ = runtime.decoder.forward(lay.prefix_ids + lay.entry_ids(*fact) + q, KVCache.empty(runtime.manifest))
    diff = float(np.abs(injected - joint[-len(q):]).max())
    assert diff <= 1e-3, diff
    assert (injected.argmax(-1) == joint[-len(q):].argmax(-1)).all()
    k8, v8 = kvquant.unpack(kvquant.pack(k, v, "int8"), "int8", *k.shape)
    cache8, _ = lay.assemble([(k8, v8)])
    served, _ = runtime.decoder.forward(q, cache8, positions=np.arange(pos, pos + len(q)))
    drift = float(np.abs(served - injected).max())
    print(f"\ndefault model: injected vs joint max |dlogit| {diff:.2e}; int8 payload drift {drift:.3f}, "
          f"argmax same {bool((served.argmax(-1) == injected.argmax(-1)).all())}")
    assert drift < 2.0 and served[-1].argmax() == injected[-1].argmax()
