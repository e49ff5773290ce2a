"""The question gate of image tasks: is a query this task's kind of question?

An image query's retrieval key is mostly its image (16 image tokens and ~8 words, mean-pooled
over the first layers), so every picture of a digit sits near every other whatever is asked:
a parity bank's top-1 entry is as close to "What digit is this?" as to "Is this digit even
or odd?" (raw top-1 cosines overlap, README "Do no harm"), and neither the score nor the
retrieval margin can keep a task's entries out of questions they do not answer. The
*question* can: the key of the prompt text alone.

A learn stores, per image task, the text keys of its prompts (one for a task asked one
way; at most ``MAX_KEYS``, farthest-first)::

    catalog extra "questions": {"version": 1, "tasks": {"<task>": ["<base64 float16 key>", ...]}}

At inference, when the top-1 entry belongs to such a task, the query's text key q (one
extra key pass over the bare question, a few ms) is compared with three kinds of question
(all unit keys, cosine):

    own   = max over the task's question keys          . q
    other = max over the other tasks' question keys
                 and the REFERENCE questions below      . q

and the entries are injected only when own >= other: the query is nearer to this task's
questions than to anything else a person might ask. No threshold is fitted. REFERENCE is a
fixed set of everyday questions (the common question types of visual question answering,
"what colour", "how many", "what kind", ... about ordinary scenes, and a few chat requests),
written here, not taken from any task the project evaluates; its keys are computed once per
opened bank. Changing the list changes what a bank's gate does, so the list is versioned
(``VERSION``) and a bank written with another version is refused with a clear error.
"""
from __future__ import annotations

import base64

import numpy as np

from inducekv.core.errors import InduceKVError
from inducekv.memory.format import QUESTIONS_KEY

VERSION = 1
MAX_KEYS = 4   # question keys stored per task
REFERENCE = (
    "What is in this image?", "Describe this picture.", "What is the man holding?", "What color is the car?",
    "How many people are there?", "What kind of animal is this?", "Is there a dog in the picture?",
    "Are there any clouds?", "What number is on the bus?", "What is the woman doing?", "Where is the cat?",
    "What type of food is this?", "What shape is the table?", "Is this indoors or outdoors?",
    "What sport is being played?", "What time of day is it?", "What does the sign say?", "Which room is this?",
    "Is the light on?", "What is the weather like?", "How many cars are in the street?",
    "What colour are the flowers?", "What brand is the phone?", "Is it safe to eat?",
    "What is the capital of France?", "Translate 'good morning' into Spanish.", "Write a short poem about the sea.",
    "Who wrote Romeo and Juliet?", "What is 12 times 7?", "Summarise this in one sentence.",
    "Give a caption for this image.", "Is the person happy or sad?",
)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pack(keys: np.ndarray) -> list[str]:
    """(m, dim) keys -> base64 strings of their unit float16 vectors (the catalog's form)."""
    return [base64.b64encode(unit(k).astype("<f2").tobytes()).decode("ascii") for k in np.atleast_2d(keys)]


def questions_from(catalog: dict, dim: int) -> dict[str, np.ndarray]:
    """Per task, its question keys (m, dim) float32 unit rows; {} for a bank without any.
    A malformed or unknown-version entry raises (the bank is untrusted input)."""
    raw = (catalog.get("extra") or {}).get(QUESTIONS_KEY)
    if raw is None:
        return {}
    bad = InduceKVError("the bank's question gates are malformed; relearn an image task to refit them")
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict):
        raise bad
    if raw.get("version") != VERSION:
        raise InduceKVError(f"the bank's question gates are version {raw.get('version')!r}; this inducekv reads "
                            f"version {VERSION}: relearn its image tasks, or use the inducekv that wrote it")
    out = {}
    for task, keys in raw["tasks"].items():
        if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_KEYS or not all(isinstance(s, str) for s in keys):
            raise bad
        try:
            rows = [np.frombuffer(base64.b64decode(s, validate=True), "<f2") for s in keys]
        except ValueError:
            raise bad from None
        if any(r.shape != (dim,) or not np.all(np.isfinite(r)) for r in rows):
            raise bad
        out[str(task)] = unit(np.stack(rows).astype(np.float32))
    return out


def farthest(keys: np.ndarray, m: int = MAX_KEYS) -> np.ndarray:
    """At most ``m`` of ``keys`` (n, dim), farthest-first from the first (cosine), dropping near-copies."""
    u = unit(keys)
    picked = [0]
    near = u @ u[0]
    while len(picked) < m:
        i = int(np.argmin(near))
        if near[i] > 0.9995:   # the rest are (near) copies of what is picked
            break
        picked.append(i)
        near = np.maximum(near, u @ u[i])
    return u[picked]


def is_open(q: np.ndarray, task: str, tasks: dict[str, np.ndarray], reference: np.ndarray) -> bool:
    """Inject ``task``'s entries for a query with text key ``q``: its questions are at least as
    near as any other task's and any reference question (module docstring)."""
    q = unit(q)
    own = float(np.max(tasks[task] @ q))
    others = [reference] + [k for t, k in tasks.items() if t != task]
    return own >= max(float(np.max(o @ q)) for o in others)
