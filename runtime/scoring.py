"""Scoring generated answers against a task's answers (README, "Task files and scoring").

Both sides are normalised (lower-case, whitespace collapsed, punctuation
dropped at the ends) and only the first non-empty line of the generated text
counts. **correct**: a normalised answer occurs in that line as whole words
("rome" in "the capital is rome"); **exact**: the line equals an answer.
"""
from __future__ import annotations

import re
import unicodedata


def _is_edge_junk(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip punctuation (and spaces) at both ends."""
    text = " ".join(text.lower().split())
    start, end = 0, len(text)
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
    return text[start:end]


def first_line(text: str) -> str:
    """The first line with something besides whitespace in it ("" when none)."""
    return next((line for line in text.splitlines() if line.strip()), "")


def score(generated: str, answers) -> tuple[bool, bool]:
    """(correct, exact) for one generated text against any of ``answers``."""
    line = normalize(first_line(generated))
    targets = [a for a in (normalize(a) for a in answers) if a]
    exact = any(line == a for a in targets)
    correct = any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", line) for a in targets)
    return correct, exact


def summarize(scores) -> dict:
    """``{"accuracy", "exact", "n"}`` over a list of (correct, exact) pairs (0.0 when empty)."""
    scores = list(scores)
    n = len(scores)
    return {"accuracy": sum(c for c, _ in scores) / n if n else 0.0,
            "exact": sum(e for _, e in scores) / n if n else 0.0,
            "n": n}
