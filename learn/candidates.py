"""Phase 1 of a learn: task examples become candidate entries, each measured once.

A candidate is what the bank would store for one example, plus what selection needs::

    payload  bytes      the entry's K/V after the shared prefix, packed with the bank's scheme
    tokens   int        its length (L, H_kv, tokens, D before packing)
    key      (K,)       the frozen retrieval key of its prompt (and image)
    base     float      mean log p(answer | prompt) per answer token, no memory
    gain     float      the same with this entry in memory, minus ``base``
    neighbours, neighbour_gains   held-out value: its answer's gain with other entries (``value.py``)

Likelihoods come from the ONNX decoder (``Scorer``); no torch. With a ``Spool``, payloads
go to a temporary file as they are made and are read back when needed (calibration, the
write), so a learn's RAM does not grow with its payloads (keys and scores stay in RAM).
"""
from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from inducekv.learn.defaults import SCORE_BATCH
from inducekv.learn.progress import steps

from inducekv.core.errors import InduceKVError
from inducekv.kernels import kvquant
from inducekv.memory.bank import NewEntry, example_hash
from inducekv.memory.source import pack_source
from inducekv.runtime.memory import Layout, entry_bias, image_of
from inducekv.runtime.vision import with_image
from inducekv.runtime.session import KeyEncoder
from inducekv.runtime.tasks import Example


@dataclass
class Candidate:
    prompt: str
    answer: str
    payload: bytes       # packed with the bank's scheme
    tokens: int
    key: np.ndarray      # (K,)
    base: float = 0.0    # mean log p(answer | prompt) with no memory
    gain: float = 0.0    # ... with this entry in memory, minus base
    image: str | None = None  # the example's image file (image-bearing entries), absolute
    neighbours: tuple = ()       # indices of its nearest other candidates (``learn.value``)
    neighbour_gains: tuple = ()  # its answer's gain with each of them injected instead
    value: float | None = None   # what selection credits it with (stored as its gain; None: ``gain``)
    answered: bool | None = None  # the bare model already answers its prompt (``value.answered``; None: not asked)

    def example(self) -> dict:
        """The example as anchors and ``example_hash`` record it."""
        return {"prompt": self.prompt, "answer": self.answer, **({"image": self.image} if self.image else {})}

    def source_bytes(self) -> bytes:
        """The example as a source entry stores it (``memory/source.py``): prompt, answer, image file."""
        image = Path(self.image).read_bytes() if self.image else None
        return pack_source(self.prompt, self.answer, image)

    def entry(self, task: str) -> NewEntry:
        """The bank entry for this candidate."""
        return NewEntry(None, None, self.key, task, example_hash(self.example()), payload=self.payload,
                        tokens=self.tokens)


class Spool:
    """An unlinked temporary file that candidate payloads are appended to and read back from
    (``os.pread``: nothing stays mapped, so reading does not grow the process's RSS)."""

    def __init__(self, directory: str | None = None):
        fd, path = tempfile.mkstemp(prefix="ikv-learn-", suffix=".spool", dir=directory)
        os.unlink(path)                      # freed by the OS when closed, also after a kill
        self.fd, self.size = fd, 0

    def put(self, data: bytes) -> tuple[int, int]:
        off = self.size
        os.pwrite(self.fd, data, off)
        self.size += len(data)
        return off, len(data)

    def get(self, where: tuple[int, int]) -> bytes:
        off, n = where
        return os.pread(self.fd, n, off)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


class SpooledCandidate(Candidate):
    """A ``Candidate`` whose payload lives in a ``Spool`` (set and read like the plain one)."""

    def __init__(self, spool: Spool, *args, **kw):
        self._spool, self._where = spool, None
        super().__init__(*args, **kw)

    @property
    def payload(self) -> bytes:
        return self._spool.get(self._where)

    @payload.setter
    def payload(self, data: bytes) -> None:
        self._where = self._spool.put(data)


def as_example(ex, n: int = 0) -> Example:
    """A task-file ``Example`` or a ``{"prompt", "answer" | "answers", "image"?}`` dict as an Example."""
    if isinstance(ex, Example):
        return ex
    if not isinstance(ex, dict):
        raise InduceKVError(f"example {n}: expected a dict with \"prompt\" and \"answer\", got {type(ex).__name__}")
    answers = ex.get("answers") or ([ex["answer"]] if isinstance(ex.get("answer"), str) else [])
    prompt = ex.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or not answers or not all(isinstance(a, str) for a in answers):
        raise InduceKVError(f"example {n}: a memory entry needs a non-empty text prompt and an answer")
    image = ex.get("image")
    return Example(prompt, tuple(answers), Path(image) if image is not None else None, n)


@dataclass
class Ask:
    """One scoring request: mean log p(answer | prompt) with ``entries`` in memory (a list as
    ``Scorer.logp`` takes, or a callable that makes it when its batch is built, so only one
    batch of entries is in RAM at a time)."""
    prompt: str
    answer: str
    entries: object = ()
    image: object = None
    weights: np.ndarray | None = None
    gates: object = None


def lead_of(template) -> str:
    """A memory template's words between the prompt and the answer ("The answer is" in
    ``facts``; "" when the answer follows the prompt directly)."""
    return template.entry.split("{answer}")[0].split("{prompt}")[-1].strip()


class Scorer:
    """Mean log-probability of an answer's tokens after a prompt, with entries in memory,
    scored ``batch`` requests per decoder pass (padded; each row attends to what it would
    alone: ``runtime.session.batch_feed``). ``lead``: words the reply starts with before the
    answer ("The answer is"), fed but not scored: the answer is then read where a model that
    copies an entry writes it (``lead_of``; "" reads it as the reply's first tokens)."""

    def __init__(self, rt, layout: Layout, batch: int = SCORE_BATCH, lead: str = ""):
        self.rt, self.layout, self.batch = rt, layout, max(1, int(batch))
        self.lead = lead.strip()

    def _answer_ids(self, answer: str) -> tuple[list[int], int]:
        """(token ids fed after the prompt, how many of them lead the answer and are not scored)."""
        tok = self.rt.tokenizer
        if not self.lead:
            return tok.encode(answer, bos=False), 0
        head, ids = tok.encode(self.lead, bos=False), tok.encode(f"{self.lead} {answer}", bos=False)
        if ids[:len(head)] != head or len(ids) == len(head):   # the lead's tokens merged into the answer's
            return ids, 0
        return ids, len(head)

    def logp(self, prompt: str, answer: str, entries: list[tuple[np.ndarray, np.ndarray]], image=None,
             weights: np.ndarray | None = None, gates=None) -> float:
        """``entries``: float K/V (L, H_kv, T, D) each, with a third item (L, T) for a
        sparse entry's mask (``unpack``); ``image``: the query's ``vision.ImageInput``;
        ``weights``/``gates``: the injection weighting (``runtime.memory.Injection``)."""
        return self._batch([Ask(prompt, answer, entries, image, weights, gates)])[0]

    def logp_many(self, asks: Iterable[Ask]) -> Iterator[float]:
        """``logp`` of each request, in order, ``batch`` at a time (a lazy iterable is consumed
        one batch ahead)."""
        it = iter(asks)
        while chunk := list(itertools.islice(it, self.batch)):
            yield from self._batch(chunk)

    def _batch(self, asks: list[Ask]) -> list[float]:
        lay, m = self.layout, self.rt.manifest
        entries = [a.entries() if callable(a.entries) else list(a.entries) for a in asks]
        qs = [lay.query_ids(a.prompt, a.image) for a in asks]
        fed = [self._answer_ids(a.answer) for a in asks]
        ans = [x for x, _ in fed]                                    # lead + answer, fed
        ids = [q + x for q, x in zip(qs, ans)]
        past = [lay.p0 + sum(e[0].shape[2] for e in es) for es in entries]           # each row's past slots
        B, P, S, L = len(asks), max(past), max(len(x) for x in ids), m.num_layers
        past_k = [np.zeros((B, m.num_kv_heads, P, m.head_dim), np.float32) for _ in range(L)]
        past_v = [np.zeros_like(x) for x in past_k]
        bias = np.zeros((B, L, P + S), np.float32)
        positions = []
        for r, (a, es) in enumerate(zip(asks, entries)):
            cache, pos = lay.assemble(es, a.gates)       # the layout's buffers: copied out before the next row
            for i in range(L):
                past_k[i][r, :, :past[r]] = cache.keys[i][0]
                past_v[i][r, :, :past[r]] = cache.values[i][0]
            b = entry_bias(lay.p0, [e[0].shape[2] for e in es], a.weights, [e[2] if len(e) > 2 else None for e in es])
            if b is not None:                                                          # (past,) or (L, past)
                bias[r, :, :past[r]] = b
            positions.append(np.arange(pos, pos + len(ids[r])))
        first = min(len(q) for q in qs) - 1             # logits only from the first answer-predicting row
        logits, _ = self.rt.decoder.forward_batch(ids, past_k, past_v, past, positions,
                                                  [a.image.features if a.image is not None else None for a in asks],
                                                  bias if bias.any() else None, logits_from=first)  # (B, S - first, V)
        out = []
        for r, (q, (x, skip)) in enumerate(zip(qs, fed)):
            rows = logits[r, len(q) - 1 - first + skip: len(q) + len(x) - 1 - first].astype(np.float64)  # (answer, V)
            rows -= rows.max(axis=1, keepdims=True)
            lse = np.log(np.exp(rows).sum(axis=1))
            out.append(float(np.mean(rows[np.arange(len(x) - skip), x[skip:]] - lse)))
        return out


def unpack(geo, payload: bytes, tokens: int, key_scale: np.ndarray | None = None) -> tuple:
    """A packed payload as float K/V, each (L, H_kv, tokens, D); a sparse scheme's as
    ``(k, v, mask)`` expanded to its span (``kvquant.expand``), ready for ``Scorer.logp``."""
    if geo.scheme in kvquant.SPARSE:
        return kvquant.expand(payload, geo.scheme, geo.num_layers, geo.kv_heads, tokens, geo.head_dim, key_scale)
    return kvquant.unpack(payload, geo.scheme, geo.num_layers, geo.kv_heads, tokens, geo.head_dim, key_scale)


FIT_EXAMPLES = 16   # examples whose keys fit a new bank's shared key scales


def fit_key_scales(rt, layout: Layout, examples, scheme: str, any_position: bool = False) -> np.ndarray:
    """Shared key scales (L, H_kv, D) for a bank that has none, from the first examples' keys.
    ``any_position``: scales that hold the keys rotated to any position (compacted entries
    store re-rotated keys): each rotary channel pair (d, d + D/2) gets the pair's largest norm."""
    keys = []
    for n, ex in enumerate(examples[:FIT_EXAMPLES], start=1):
        ex = as_example(ex, n)
        k = layout.encode_entry(ex.prompt, ex.answers[0], image_of(rt, ex))[0]
        if any_position:
            h = k.shape[-1] // 2
            norm = np.sqrt(k[..., :h] ** 2 + k[..., h:] ** 2)                      # (L, H, T, D/2)
            k = np.concatenate([norm, norm], axis=-1)
        keys.append(k)
    return kvquant.fit_key_scale(keys, scheme)


def encode_candidates(rt, geo, layout: Layout, keys: KeyEncoder, examples, progress=False,
                      key_scale: np.ndarray | None = None, compactor=None, spool: Spool | None = None,
                      batch: int = SCORE_BATCH) -> list[Candidate]:
    """One candidate per example (``Example`` or dict), packed for a bank of geometry ``geo``
    (``key_scale``: its shared key scales, for the schemes that have them; ``compactor``: a
    ``learn.compact.Compactor`` that keeps some of each entry's tokens, None keeps all;
    ``spool``: keep the payloads there, not in RAM; ``batch``: examples per pass)."""
    scorer, out = Scorer(rt, layout, batch), []
    made = Candidate if spool is None else (lambda *a, **kw: SpooledCandidate(spool, *a, **kw))
    it = iter(steps([as_example(ex, n) for n, ex in enumerate(examples, start=1)], "encode", "ex", progress))
    while chunk := list(itertools.islice(it, scorer.batch)):
        items = [(ex.prompt, ex.answers[0], image_of(rt, ex)) for ex in chunk]
        if getattr(compactor, "encodes", False):                    # perlayer: one probe pass, slot maps
            kvs = compactor.encode_many(items)
        else:
            kvs = []
            for (prompt, answer, image), (k, v) in zip(items, layout.encode_entries(items)):
                if compactor is not None:
                    k, v, _ = compactor(prompt, answer, k, v, image)
                kvs.append((k, v, {}))
        keyv = keys.batch([rt.tokenizer.encode(with_image(p, im, rt.manifest)) for p, _, im in items],
                          [im.features if im is not None else None for _, _, im in items])       # (B, K)
        fresh = []
        for ex, (prompt, answer, image), (k, v, extra), key in zip(chunk, items, kvs, keyv):
            if extra.get("span", k.shape[2]) > geo.max_tokens and not geo.sources:   # (a source can hold it)
                raise InduceKVError(f"example {prompt[:40]!r} renders to {extra.get('span', k.shape[2])} tokens; "
                                    f"this bank holds entries of at most {geo.max_tokens}")
            try:
                payload = kvquant.pack(k, v, geo.scheme, key_scale, **extra)
            except ValueError as e:  # e.g. values outside the scheme's range
                raise InduceKVError(f"example {prompt[:40]!r} cannot be stored as {geo.scheme}: {e}") from None
            fresh.append(made(prompt, answer, payload, k.shape[2], key,
                              image=str(Path(ex.image).resolve()) if ex.image is not None else None))
        asks = [Ask(c.prompt, c.answer, [], im) for c, (_, _, im) in zip(fresh, items)]
        asks += [Ask(c.prompt, c.answer, [unpack(geo, c.payload, c.tokens, key_scale)], im)
                 for c, (_, _, im) in zip(fresh, items)]
        scores = list(scorer.logp_many(asks))
        for c, base, with_entry in zip(fresh, scores[:len(fresh)], scores[len(fresh):]):
            c.base, c.gain = base, with_entry - base
        out.extend(fresh)
    return out
