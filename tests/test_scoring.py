"""Scoring: normalisation, first line, whole-word accuracy vs exact match."""
from __future__ import annotations

import pytest

from inducekv.runtime.scoring import first_line, normalize, score, summarize


@pytest.mark.parametrize("text, want", [
    ("Rome", "rome"),
    ("  The  Capital\tis\n ROME. ", "the capital is rome"),
    ("\"Morrow!\"", "morrow"),
    ("...?!", ""),
    ("St. Louis.", "st. louis"),          # inner punctuation stays
    ("«Zürich»", "zürich"),               # unicode punctuation and letters
    ("", ""),
])
def test_normalize(text, want):
    assert normalize(text) == want


@pytest.mark.parametrize("text, want", [
    ("Rome\nand more", "Rome"),
    ("\n  \nRome\nParis", "Rome"),
    ("   ", ""),
    ("", ""),
])
def test_first_line(text, want):
    assert first_line(text) == want


@pytest.mark.parametrize("generated, answers, want", [
    ("Rome", ["rome"], (True, True)),
    ("ROME.", ["Rome"], (True, True)),
    ("  Rome!  ", ["rome."], (True, True)),
    ("The capital of Vexland is Morrow.", ["Morrow"], (True, False)),
    ("The capital is Rome.", ["rom"], (False, False)),          # whole words only
    ("Romeo is a name.", ["rome"], (False, False)),
    ("It is Rome, of course", ["rome"], (True, False)),
    ("It is new   York", ["New York"], (True, False)),          # multi-word answer, spaces collapsed
    ("new york city", ["York City"], (True, False)),
    ("Paris\nThe capital is Rome.", ["rome"], (False, False)),  # only the first line counts
    ("\n\nRome\nParis", ["rome"], (True, True)),                # first non-empty line
    ("Blue", ["red", "blue", "yellow"], (True, True)),          # any answer
    ("I like red and blue", ["green", "blue"], (True, False)),
    ("", ["rome"], (False, False)),
    ("\n \n", ["rome"], (False, False)),
    ("!!!", ["rome"], (False, False)),
    ("anything", ["..."], (False, False)),                      # an answer that normalises to nothing never matches
    ("a+b is c", ["a+b"], (True, False)),                       # regex characters in answers are literal
    ("axb is c", ["a.b"], (False, False)),
])
def test_score(generated, answers, want):
    assert score(generated, answers) == want


def test_summarize():
    assert summarize([(True, True), (True, False), (False, False), (False, False)]) == \
        {"accuracy": 0.5, "exact": 0.25, "n": 4}
    assert summarize([]) == {"accuracy": 0.0, "exact": 0.0, "n": 0}
