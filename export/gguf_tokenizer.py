"""A `tokenizers` BPE tokenizer rebuilt from a SentencePiece-BPE GGUF vocabulary (Gemma 3).

Why: transformers 4.57 turns the GGUF of Gemma 3 into a *Unigram* tokenizer, which
splits common words wrongly ("capital" -> c|ap|it|al). Gemma's SentencePiece model is
BPE, and a GGUF stores it as tokens + scores + token types (no merge list). SentencePiece
BPE encodes by repeatedly merging the adjacent pair whose concatenation is a normal
piece with the highest score (leftmost on ties); a `tokenizers` BPE does the same when
its merges are every split ``(left, right)`` of every normal piece, both halves pieces
themselves, ranked by the merged piece's score. The rest of the pipeline:

- normalizer: spaces become ``▁`` (no dummy prefix: the GGUF says ``add_space_prefix`` false);
- no pre-tokenizer: SentencePiece does not split on whitespace (pieces such as ``>▁</`` exist);
- control tokens (type 3) are special added tokens; user-defined ones (type 4: ``\\n``,
  runs of newlines, spaces and tabs, image markers) are matched whole in the raw text first;
- characters outside the vocabulary fall back to ``<0xXX>`` byte tokens (type 6);
- decoder: ``▁`` back to spaces, bytes fused back into UTF-8.

``tests/test_gguf_tokenizer.py`` checks it against a direct SentencePiece-BPE encoder.
"""
from __future__ import annotations

from pathlib import Path

from inducekv.core.errors import InduceKVError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6   # GGUF token types
SPACE = "\u2581"     # ▁, SentencePiece's escaped space
BPE_ARCHS = ("gemma3",)   # GGUF architectures whose tokenizer this module builds


def needs_rebuild(reader) -> bool:
    """True for a GGUF whose tokenizer transformers would build wrongly (SentencePiece BPE
    stored as scores, architecture in ``BPE_ARCHS``)."""
    arch = _field(reader, "general.architecture")
    return arch in BPE_ARCHS and _field(reader, "tokenizer.ggml.model") == "llama" and \
        reader.fields.get("tokenizer.ggml.merges") is None


def _field(reader, key):
    f = reader.fields.get(key)
    return f.contents() if f is not None else None


def merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) split of every normal piece whose halves are normal pieces, ordered
    by the merged piece's score (high first), then its id, then the split point."""
    normal = {t for t, ty in zip(tokens, types) if ty == NORMAL}
    ranked = []
    for i, (piece, score, ty) in enumerate(zip(tokens, scores, types)):
        if ty != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build(tokens: list[str], scores: list[float], types: list[int], bos: str | None, unk: str):
    """The `tokenizers.Tokenizer` for a SentencePiece-BPE vocabulary (see the module doc)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

    if not (len(tokens) == len(scores) == len(types)):
        raise InduceKVError("the GGUF's tokenizer tables have different lengths; the file is corrupt")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_scores(tokens, scores, types), unk_token=unk,
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(Regex(" "), SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    return tok


def from_gguf(path: str | Path):
    """(tokenizer, bos, eos, unk, pad token strings) rebuilt from the GGUF at ``path``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if tokens is None or scores is None or types is None:
        raise InduceKVError(f"{path} has no SentencePiece vocabulary (tokens, scores, token types)")

    def name(key):
        i = _field(reader, key)
        return tokens[int(i)] if i is not None else None

    bos, eos, unk, pad = (name(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding"))
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    tok = build(list(tokens), [float(s) for s in scores], [int(t) for t in types],
                bos if add_bos else None, unk or "<unk>")
    return tok, bos, eos, unk, pad
