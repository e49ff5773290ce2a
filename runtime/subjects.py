"""The subject gate of a text task: a query is answered from a fact entry only when it names
what the entry is about.

Retrieval keys are the mean of early hidden states over the whole prompt, so the wording of
a question weighs more than its subject: "Which city is Japan's capital?" scores 0.989
against the entry "Which city is Vuroresh's capital? The answer is Danedith." and stands
out from the next entry by a larger margin (0.006) than most paraphrases of a held fact do
(value sequence, seed 0, 2 MiB: 4 of 5 capitals the bare model knew came out "Danedith";
the margin gate, ``learn/gate.py``, cannot tell). What can tell is the words: a question
about a fact names its subject.

An entry's **subject words** are the words of its prompt that are not the task's template
words and occur with the fewest distinct answers (``subject_words``): a template word occurs
in the prompts of at least ``TEMPLATE_ANSWERS`` distinct answers ("capital", "which"); a
subject occurs with one answer, or two where labels are noisy. Words are compared by their first ``PREFIX``
letters, lowercased, possessive "'s" dropped, so "zibbles" meets "zibble" and "Japan's"
meets "Japan". A learn decides per task whether the gate is on (``learn/gate.py``: on unless
at least 3 of its held-out asks whose top entry is about another subject got an answer the
bare model does not give from that entry: the task's answers repeat across subjects); then a query
whose top-1 entry is of that task and shares none of its subject words is answered
without memory (``runtime.memory.Memory``). Stored in the catalog (``memory/FORMAT.md``)::

    "subjects": {"version": 1, "tasks": [task name, ...], "entries": {"<entry id>": "w1 w2"}}

Only entries of gated tasks are listed; an entry with no subject words is never closed.
"""
from __future__ import annotations

import re

from inducekv.core.errors import InduceKVError

VERSION = 1
PREFIX = 5             # letters a word is compared by (not tuned: long enough for made-up names,
                       # short enough for plurals and "Japan"/"Japanese")
MIN_LETTERS = 3        # shorter words are ignored ("a", "of", "is")
TEMPLATE_ANSWERS = 3   # a word in the prompts of this many distinct answers is template (not tuned)
MAX_WORDS = 6          # subject words kept per entry (catalog bytes)
MIN_PROMPTS = 8        # a task with fewer distinct prompts gets no subject gate (too few to tell templates)

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


def words(text: str) -> set[str]:
    """The comparable words of a text: lowercased, "'s" dropped, cut to ``PREFIX`` letters."""
    out = set()
    for w in _WORD.findall(text.lower()):
        w = w.split("'")[0]
        if len(w) >= MIN_LETTERS:
            out.add(w[:PREFIX])
    return out


def answers_of(prompts: list[str], answers: list[str]) -> dict[str, int]:
    """Word -> how many distinct answers the prompts it occurs in have."""
    seen: dict[str, set[str]] = {}
    for p, a in zip(prompts, answers):
        for w in words(p):
            seen.setdefault(w, set()).add(a.strip().lower())
    return {w: len(a) for w, a in seen.items()}


def template_words(prompts: list[str], answers: list[str]) -> set[str]:
    """Words that occur in the prompts of at least ``TEMPLATE_ANSWERS`` distinct answers."""
    return {w for w, n in answers_of(prompts, answers).items() if n >= TEMPLATE_ANSWERS}


def subject_words(prompts: list[str], answers: list[str]) -> list[set[str]] | None:
    """Per prompt, its subject words: of its words that are not template, those with the
    fewest distinct answers (a rare wording, "Tell me ...", seen with two answers, is not the
    subject of a prompt that also names one seen with one), at most ``MAX_WORDS``, the longest
    first; None when the task is too small to tell its template (``MIN_PROMPTS``) or no prompt
    names a subject ("Code word number 3?": digits are not words)."""
    if len(set(prompts)) < MIN_PROMPTS:
        return None
    count = answers_of(prompts, answers)
    out = []
    for p in prompts:
        own = [w for w in words(p) if count[w] < TEMPLATE_ANSWERS]
        least = min((count[w] for w in own), default=0)
        out.append(set(sorted((w for w in own if count[w] == least), key=lambda w: (-len(w), w))[:MAX_WORDS]))
    return out if any(out) else None


def names(query_words: set[str], entry_words: set[str] | None) -> bool:
    """Whether a query names an entry's subject (an entry without subject words: always)."""
    return not entry_words or bool(query_words & entry_words)


def pack(tasks, entries: dict[int, set[str]]) -> dict:
    """The catalog record (module docstring)."""
    return {"version": VERSION, "tasks": sorted(tasks),
            "entries": {str(e): " ".join(sorted(w)) for e, w in entries.items() if w}}


def unpack(raw) -> tuple[set[str], dict[int, set[str]]]:
    """(gated task names, entry id -> subject words) of a catalog record; a bank without one:
    nothing gated. Malformed: a one-line error."""
    if not raw:
        return set(), {}
    try:
        if raw.get("version") != VERSION:   # another version: not understood, so not applied
            return set(), {}
        tasks = {str(t) for t in raw["tasks"]}
        entries = {int(e): set(str(w).split()) for e, w in raw["entries"].items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise InduceKVError("the bank's subject gate is malformed; relearn a task to refit it") from None
    return tasks, entries
