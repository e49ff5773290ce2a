"""A direct SentencePiece-BPE encoder (the algorithm, not a library): the oracle for
``export/gguf_tokenizer.py``. Slow (quadratic per text) and only for tests."""
from __future__ import annotations

SPACE = "\u2581"


class Reference:
    """Encoder over one vocabulary (tokens, scores, GGUF token types)."""

    def __init__(self, tokens: list[str], scores: list[float], types: list[int]):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.normal = {t: s for t, s, ty in zip(tokens, scores, types) if ty == 1}
        self.whole: dict[str, list[str]] = {}   # control / user-defined pieces by first character, longest first
        for t in sorted((t for t, ty in zip(tokens, types) if ty in (3, 4)), key=len, reverse=True):
            self.whole.setdefault(t[0], []).append(t)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``: user-defined/control pieces matched whole (longest first), spaces escaped,
        then the highest-scoring adjacent merge into a normal piece, leftmost on ties, until none;
        characters outside the vocabulary as UTF-8 byte pieces."""
        out, buf, i = [], "", 0
        while i < len(text):
            hit = next((w for w in self.whole.get(text[i], ()) if text.startswith(w, i)), None)
            if hit is None:
                buf += text[i]
                i += 1
                continue
            out += self._bpe(buf)
            out.append(self.ids[hit])
            buf, i = "", i + len(hit)
        return out + self._bpe(buf)

    def _bpe(self, text: str) -> list[int]:
        syms = list(text.replace(" ", SPACE))
        while True:
            best = None
            for j in range(len(syms) - 1):
                s = self.normal.get(syms[j] + syms[j + 1])
                if s is not None and (best is None or s > best[0]):
                    best = (s, j)
            if best is None:
                break
            j = best[1]
            syms[j:j + 2] = [syms[j] + syms[j + 1]]
        out = []
        for s in syms:
            if s in self.ids:
                out.append(self.ids[s])
            else:
                out += [self.ids[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
        return out
