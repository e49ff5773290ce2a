"""In-context episodes for the default VLM: image entries laid out as the runtime injects them.

Used by ``export/train_vlm.py`` so the vision tower learns to make image entries the frozen
LM can read. One episode, in tokens after the memory layout's shared prefix (P0 tokens: the
chat start and the memory template's system text, computed once as past KV)::

    [entry 1: image text + "Fact: {q} The answer is {w}.\n"] ... [entry k]   each sees prefix + itself
    [query: end of system turn, user turn (image text + q), assistant start]  sees prefix + all entries
    [answer + <|im_end|>]                                                     the loss

Positions run on from P0 (the runtime's ``rerotate`` policy: entry j starts where j-1
ended), and the query's rows add ``log(alpha_j)`` on entry j's slots, the runtime's
retrieval weighting. So a batch of episodes is one forward with a block mask, equal to
encoding each entry on its own after the prefix and injecting it as past KV.

Answers are made-up words drawn fresh for every episode (``word``), never one of the
evaluation vocabularies (``imagedata.EVAL_WORDS``), so the tower cannot learn an answer,
only to make the matching entry's answer the one to copy. Question kinds:

- *name*: each value of an attribute (colour, shape, count, digit) gets its own word;
  "What is this colour called in Dorvish?"
- *binary*: the values are split in two groups, one word each (like parity or side);
  "Is this digit zell or mopa?"
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inducekv.export import imagedata as data

_C, _V = "bdfgklmnprstvz", "aeiou"
NOUNS = {"colour": "colour", "shape": "shape", "count": "number of shapes", "digit": "digit"}
VALUES = {"colour": tuple(data.COLOURS), "shape": data.SHAPES, "count": data.NUMBERS,
          "digit": tuple(str(d) for d in range(10))}
NAME_QUESTIONS = ("What is this {noun} called in {lang}?", "In {lang}, what is this {noun}?",
                  "Which {lang} word names this {noun}?")
BINARY_QUESTIONS = ("Is this {noun} {a} or {b}?", "In {lang}, is this {noun} {a} or {b}?")
K_CHOICES, K_PROBS = (1, 2, 3, 4), (0.35, 0.25, 0.2, 0.2)


def word(rng: np.random.Generator, banned=frozenset()) -> str:
    """A made-up lowercase word of 2-3 syllables, never in ``banned`` or the evaluation words."""
    while True:
        n = int(rng.integers(2, 4))
        w = "".join(_C[rng.integers(len(_C))] + _V[rng.integers(len(_V))] for _ in range(n))
        if rng.random() < 0.4:
            w += _C[rng.integers(len(_C))]
        if w not in banned and w not in data.EVAL_WORDS and not w.startswith("vex"):
            return w


def language(rng: np.random.Generator) -> str:
    return word(rng).capitalize() + str(rng.choice(["ish", "ese", "ic", "an"]))


@dataclass
class Episode:
    entries: list[tuple[np.ndarray, str, str]]   # (image (S, S, 3) uint8, question, answer), injection order
    query: tuple[np.ndarray, str, str]           # the question asked and the answer to produce
    log_alpha: np.ndarray | None                 # (k,) the entries' weighting, or None (unweighted)


def _image(family: str, value: str, rng: np.random.Generator) -> np.ndarray:
    if family == "digit":
        return data.digit(rng, "train", label=int(value), varied=True).image
    kw = {"count": None if family != "count" else data.NUMBERS.index(value) + 1}
    if family == "colour":
        kw["colour"] = value
    if family == "shape":
        kw["shape"] = value
    if family != "count":
        kw["count"] = int(rng.integers(1, 3))
    return data.shapes(rng, varied=True, **kw).image


def episode(rng: np.random.Generator) -> Episode:
    """One seeded episode: k entries of one made-up task, a query whose value one of them shares."""
    family = str(rng.choice(list(VALUES)))
    values = VALUES[family]
    lang, noun = language(rng), NOUNS[family]
    if rng.random() < 0.7:
        words: list[str] = []
        for _ in values:
            words.append(word(rng, frozenset(words)))
        answer = dict(zip(values, words))
        question = str(rng.choice(NAME_QUESTIONS)).format(noun=noun, lang=lang)
    else:
        a = word(rng)
        b = word(rng, frozenset([a]))
        side = rng.permutation(len(values)) % 2          # a random split into two non-empty groups
        answer = {v: (a, b)[int(s)] for v, s in zip(values, side)}
        question = str(rng.choice(BINARY_QUESTIONS)).format(noun=noun, lang=lang, a=a, b=b)
    k = int(rng.choice(K_CHOICES, p=K_PROBS))
    v = str(rng.choice(values))
    others = [str(rng.choice(values)) for _ in range(k - 1)]
    at = k - 1 if rng.random() < 0.6 else int(rng.integers(k))   # the runtime puts the best entry last
    order = others[:at] + [v] + others[at:]
    entries = [(_image(family, x, rng), question, answer[x]) for x in order]
    log_alpha = None
    if k > 1 and rng.random() < 0.5:
        z = rng.normal(0, 2, k)
        z[at] += 2.0
        z = z - z.max()
        log_alpha = (z - np.log(np.exp(z).sum())).astype(np.float32)
    return Episode(entries, (_image(family, v, rng), question, answer[v]), log_alpha)


class Layout:
    """Token ids of episodes, split as the runtime's memory ``Layout`` splits them."""

    ENTRIES, USER = "\x00IKV-ENTRIES\x00", "\x00IKV-USER\x00"

    def __init__(self, tok, image_text: str, system: str, entry: str):
        text = tok.apply_chat_template([{"role": "system", "content": system + self.ENTRIES},
                                        {"role": "user", "content": self.USER}],
                                       tokenize=False, add_generation_prompt=True)
        prefix, rest = text.split(self.ENTRIES)
        self.mid, self.tail = rest.split(self.USER)
        self.tok, self.image_text, self.entry = tok, image_text, entry
        self.prefix_ids = tok.encode(prefix, add_special_tokens=False)
        self.end = tok.convert_tokens_to_ids("<|im_end|>")

    def _enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def ids(self, ep: Episode) -> tuple[list[list[int]], list[int], list[int]]:
        """(token ids of each entry, of the query, of the answer + <|im_end|>)."""
        entries = [self._enc(self.image_text + self.entry.replace("{prompt}", q).replace("{answer}", a))
                   for _, q, a in ep.entries]
        _, q, a = ep.query
        return entries, self._enc(self.mid + self.image_text + q + self.tail), self._enc(a) + [self.end]


def batch(layout: Layout, episodes: list[Episode], pad_id: int):
    """Token ids, positions offset, block mask and targets for a batch of episodes.

    Returns (ids (B, S) long, mask (B, 1, S, P0 + S) float additive, target (B, S) long with
    -100 outside the answers, images in the order their tokens appear row by row)."""
    import torch

    P0 = len(layout.prefix_ids)
    rows = [layout.ids(ep) for ep in episodes]
    S = max(sum(len(e) for e in ents) + len(q) + len(a) for ents, q, a in rows)
    B = len(episodes)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    target = torch.full((B, S), -100, dtype=torch.long)
    neg = torch.finfo(torch.float32).min
    mask = torch.full((B, 1, S, P0 + S), neg)
    mask[:, :, :, :P0] = 0.0
    causal = torch.triu(torch.full((S, S), neg), diagonal=1)
    images = []
    for b, ((ents, q, a), ep) in enumerate(zip(rows, episodes)):
        at, spans = 0, []
        for j, e in enumerate(ents):
            ids[b, at:at + len(e)] = torch.tensor(e)
            mask[b, 0, at:at + len(e), P0 + at:P0 + at + len(e)] = causal[:len(e), :len(e)]
            spans.append((at, at + len(e)))
            images.append(ep.entries[j][0])
            at += len(e)
        qa = q + a
        q0 = at
        ids[b, q0:q0 + len(qa)] = torch.tensor(qa)
        images.append(ep.query[0])
        for j, (s, e) in enumerate(spans):
            mask[b, 0, q0:q0 + len(qa), P0 + s:P0 + e] = 0.0 if ep.log_alpha is None else float(ep.log_alpha[j])
        mask[b, 0, q0:q0 + len(qa), P0 + q0:P0 + q0 + len(qa)] = causal[:len(qa), :len(qa)]
        a0 = q0 + len(q)
        target[b, a0 - 1:a0 - 1 + len(a)] = torch.tensor(a)        # logits at t predict token t+1
        mask[b, 0, q0 + len(qa):, :P0] = 0.0                        # padding rows: prefix only (no NaN)
    return ids, mask, target, images
