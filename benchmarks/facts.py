"""Helpers shared by the benchmarks on the made-up fact tasks (examples/tasks)."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

TASKS = Path(__file__).resolve().parent.parent / "examples" / "tasks"


def words(prompt: str) -> set[str]:
    """Lower-cased words of a prompt, possessive 's dropped."""
    return {w.lower().removesuffix("'s") for w in re.findall(r"[A-Za-z']+", prompt)}


def template_words(prompts, share: float = 0.05) -> set[str]:
    """Words in more than ``share`` of the prompts: the templates' words. The rest names the subject."""
    prompts = list(prompts)
    counts = Counter(w for p in prompts for w in words(p))
    return {w for w, c in counts.items() if c > share * len(prompts)}
