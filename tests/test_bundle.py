"""Hostile or damaged manifests: one clear BundleError each, nothing else."""
from __future__ import annotations

import json
import shutil

import pytest

from inducekv.core.manifest import MAX_MANIFEST_BYTES, read_manifest
from inducekv.core.errors import BundleError


@pytest.fixture()
def bundle(tiny_bundles, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundles["fp32"], b)
    return b


def edit(bundle, fn):
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(kind="something-else"), "not an inducekv bundle"),
    (lambda m: m.update(schema_version=99), "schema_version 99"),
    (lambda m: m.pop("num_layers"), "num_layers"),
    (lambda m: m.update(num_layers="2"), "num_layers"),
    (lambda m: m.update(add_bos_token=1), "add_bos_token"),
    (lambda m: m.update(weights="int3"), "int3"),
    (lambda m: m["files"].update({"../../etc/passwd": {"size": 1, "sha256": "x"}}), "outside the bundle"),
    (lambda m: m["files"].pop("tokenizer.json"), "tokenizer.json"),
    (lambda m: m.update(attention_scale="0.25"), "attention_scale"),
    (lambda m: m.update(attention_scale=-1.0), "attention_scale"),
])
def test_bad_manifest_fields(bundle, change, words):
    edit(bundle, change)
    with pytest.raises(BundleError, match=words):
        read_manifest(bundle)


def test_huge_manifest_is_refused_before_reading(bundle):
    with open(bundle / "manifest.json", "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(BundleError, match="more than a manifest can be"):
        read_manifest(bundle)


def test_hash_check_catches_a_flipped_byte(bundle):
    read_manifest(bundle, verify_hashes=True)
    tok = bundle / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    data[100] ^= 1
    tok.write_bytes(bytes(data))
    read_manifest(bundle)  # sizes still match: the cheap check passes
    with pytest.raises(BundleError, match="sha256"):
        read_manifest(bundle, verify_hashes=True)


def test_layer_count_mismatch_with_graph(bundle):
    from inducekv.runtime import Runtime

    edit(bundle, lambda m: m.update(num_layers=3))
    with pytest.raises(BundleError, match="does not match the manifest"):
        Runtime.open(bundle)


def test_attention_scale_defaults_to_inverse_sqrt_head_dim(bundle):
    """Bundles from before the field read as 1/sqrt(head_dim); a recorded scale wins."""
    edit(bundle, lambda m: m.pop("attention_scale", None))
    m = read_manifest(bundle)
    assert m.attention_scale is None and m.score_scale == m.head_dim ** -0.5
    edit(bundle, lambda m: m.update(attention_scale=0.125))
    assert read_manifest(bundle).score_scale == 0.125
