"""Phase 1b of a learn: what an entry is worth to *other* questions (held-out value).

An entry's gain on its own prompt says little about use: a served question is phrased
differently, and a second statement of a fact is worth nothing once the first is kept.
So each example is also asked as a held-out query, with each of its ``NEIGHBOURS``
nearest other candidates (the entries the index would retrieve for it, its own left out)
injected instead of its own::

    G[j, j]    gain of example j's answer with its own entry (``Candidate.gain``)
    G[j, i]    ... with candidate i instead, for i in j's NEIGHBOURS nearest keys

A neighbour i with G[j, i] >= TWIN * G[j, j] answers j's question about as well as j's
own entry does: a duplicate. Selection (``select.py``) then values a set S of entries by
the queries it serves, a facility location::

    value(S) = sum_j w_j * max(0, max_{i in S, i = j or i in N(j)} G[j, i])
    w_j      = 1 / (1 + number of j's twins)        each fact counted about once

so a duplicate adds nothing once its twin is kept, an example the model already answers
adds ~0 (its gains are ~0), and a shorter entry that serves as well costs fewer bytes.
Twins that are both kept form a *twin group* (``twin_groups``; stored in the catalog):
the relevance gate measures how far a top entry stands out from the best entry that is
not its twin, so two statements of one fact do not close it (``runtime.memory.gate_margin``).
(The weights estimate how many statements a fact has from the NEIGHBOURS nearest only:
a fact stated 5 times counts ~5/3, not 5.)

A text task whose subject gate is on (``runtime/subjects.py``) serves a query only from
entries about the subject it names, so its terms keep only the neighbours i that j's
question names (``same_subject``): an entry about another person who likes the same food
raises j's answer in the held-out ask (foods, dev seed 3: 2-3 nats, 4 of 12 candidates with
such "twins", one true statement outvoted by two of them) but is never injected for j.
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from inducekv.learn.calibrate import cosine
from inducekv.learn.candidates import Ask, Candidate, Scorer, lead_of, unpack
from inducekv.learn.progress import steps
from inducekv.runtime import subjects as subj
from inducekv.runtime.scoring import score

NEIGHBOURS = 2    # held-out neighbours each example is asked with
TWIN = 0.5        # a neighbour serving j at least this share of j's own gain is j's twin
LEAD = True       # text tasks: answers read after the template's lead-in (``value_scorer``)


def value_scorer(rt, layout, cands: list[Candidate], batch: int | None = None) -> Scorer:
    """The scorer the held-out value asks with. For a text task (``LEAD``) it reads each
    answer after the memory template's lead-in ("The answer is"), where a model that copies
    an entry writes it: as the reply's first tokens a common answer word is unlikely with or
    without its entry (text sequence, foods: 0.02 per token with its own entry, 0.42 after
    the lead-in; ``benchmarks/answer_framing.py``). Image tasks keep the first tokens."""
    lead = lead_of(layout.template) if LEAD and not any(c.image for c in cands) else ""
    return Scorer(rt, layout, **({"batch": batch} if batch else {}), lead=lead)


def neighbour_gains(geo, cands: list[Candidate], scorer: Scorer, key_scale=None, n: int = NEIGHBOURS,
                    progress=False) -> None:
    """Set each candidate's ``neighbours`` (indices into ``cands``) and ``neighbour_gains``
    (G[j, i] for each) in place. Costs ``n`` scorings per candidate; with a ``scorer`` that
    reads answers after a lead-in (``Scorer.lead``), two more, and ``gain`` (G[j, j]) is then
    set in that framing too (``base`` stays the encode pass's: the gates' unit)."""
    if len(cands) < 2 or n <= 0:
        for c in cands:
            c.neighbours, c.neighbour_gains = (), ()
        return
    keys = np.stack([c.key for c in cands])                                   # (N, K)
    near = []
    for j, c in enumerate(cands):
        s = cosine(c.key, keys)
        s[j] = -np.inf                                                        # its own entry left out
        near.append([int(i) for i in np.argsort(-s)[:min(n, len(cands) - 1)]])

    own = bool(scorer.lead)   # another framing than the encode pass's: its own base and gain asked again

    def entry_of(i: int):
        return lambda: [unpack(geo, cands[i].payload, cands[i].tokens, key_scale)]

    def asks_of(j: int) -> list[Ask]:                                         # entries made when batched
        c = cands[j]
        image = scorer.rt.encode_image(c.image) if c.image else None
        mine = [Ask(c.prompt, c.answer, [], image), Ask(c.prompt, c.answer, entry_of(j), image)] if own else []
        return mine + [Ask(c.prompt, c.answer, entry_of(i), image) for i in near[j]]

    asks = (a for j in steps(range(len(cands)), "value", "ex", progress) for a in asks_of(j))
    scores = iter(list(scorer.logp_many(asks)))   # run to the end: the last progress report
    for j, c in enumerate(cands):
        if own:
            base = next(scores)
            c.gain = next(scores) - base
        else:
            base = c.base
        c.neighbours = tuple(near[j])
        c.neighbour_gains = tuple(float(next(scores) - base) for _ in near[j])


ANSWER_TOKENS = 8    # tokens the bare model may write before its answer (as the continual benchmark reads it)
ASK_FLOOR = 1e-3     # below this per-token probability of its answer (``Candidate.base``) an example is not asked:
                     # real capitals the bare model answers score 0.004-0.27 as the reply's first tokens, made-up
                     # answers 0.000-0.002 (value sequence, seed 0); asking costs a generation each
KNOWN_P = 0.1        # at or above this per-token probability an example is known without asking (see ``answered``)


def answered(rt, cands: list[Candidate], progress=False) -> set[int]:
    """Candidates whose prompt the bare model already answers: greedy, no memory, the answer in
    the first line of the reply (README scoring, ``runtime.scoring``). Set on each candidate
    (``Candidate.answered``) and asked once. Such an entry is worth nothing and can cost: on
    the value sequence (30 facts a task, 16 MiB, seed 0) 3 of the 11 real capitals the bare
    model answered were answered wrong with their own entry injected ("Toronto", "Osaka",
    "Ayutthaya"). The answer's likelihood cannot tell: the bare model writes these answers
    inside a sentence, so as the reply's first tokens they are 0.004-0.27 likely; an example below
    ``ASK_FLOOR`` is taken as not answered without asking (a made-up answer), and so is an image
    example (text tasks only: image tasks have their own gates, ``learn/gate.py``).

    An answer at least ``KNOWN_P`` likely per token is known without asking: the bare model may
    first say something else about the subject ("Name the capital city of Poland." -> "Poland is a
    country nestled in Eastern Europe, ..."; Warsaw 0.17 per token), and the entry written for it
    then turned a rephrased question the bare model answers into a wrong one (value sequence,
    15 facts, seed 1: "Poland is a country located in Eastern Europe." with its own entry). Chosen
    on dev seeds 3-4: every such example (Portugal 0.27-0.29, Austria 0.10) is answered on its dev
    rephrasing, while real capitals the model gets wrong score <= 0.045 (Turkey -> "Istanbul",
    Spain) and made-up answers <= 0.009 (foods, colours and planets too)."""
    for c in cands:   # image examples are not asked: an image task keeps its question gate and, where the bare
        if c.answered is None and (c.base < np.log(ASK_FLOOR) or c.image):   # model sees the answers, its margin gate
            c.answered = False
        elif c.answered is None and c.base >= np.log(KNOWN_P):
            c.answered = True
    todo = [j for j, c in enumerate(cands) if c.answered is None]
    for j in steps(todo, "known", "ex", progress):
        c = cands[j]
        r = rt.generate(c.prompt, image=c.image, max_new_tokens=ANSWER_TOKENS, stop=["\n"], use_memory=False)
        c.answered = bool(score(r.text, (c.answer,))[0])
    return {j for j, c in enumerate(cands) if c.answered}


def same_subject(cands: list[Candidate], subject_words: list[set[str]]):
    """(j, i) -> whether candidate j's question names candidate i's subject (``subj.names``):
    whether the subject gate lets i serve j."""
    asked = [subj.words(c.prompt) for c in cands]
    return lambda j, i: subj.names(asked[j], subject_words[i])


def _near(c: Candidate, j: int, ok=None) -> list[tuple[int, float]]:
    """(neighbour, gain) pairs of candidate j (= c), those ``ok(j, i)`` allows (None: all)."""
    pairs = zip(getattr(c, "neighbours", ()) or (), getattr(c, "neighbour_gains", ()) or ())
    return [(i, x) for i, x in pairs if ok is None or ok(j, i)]


def _twins(c: Candidate, j: int = -1, ok=None) -> list[int]:
    """The neighbours (of candidate j = c, those ``ok`` allows) that answer c's question at
    least TWIN as well as its own entry does."""
    if c.gain <= 0:
        return []
    return [i for i, x in _near(c, j, ok) if x >= TWIN * c.gain]


def contradicted(cands: list[Candidate], ok=None) -> set[int]:
    """Candidates outvoted by their neighbours: i's two nearest candidates j and t are twins
    (one answers the other's question), both have i among their own nearest, and neither is
    i's twin nor i theirs. Three close statements of which two agree and the third does not:
    the third is most likely a wrong label (``noisy-colours``). (A fact stated once whose
    nearest are a pair of another fact that both list it looks the same, and is left out too.) Such an entry's own gain is high and it has no twin, so the
    facility location would count it as a fact of its own, worth more than the agreeing pair
    (text value sequence, dev seed 4, 4 MiB: every wrong statement was kept). On dev seed 3's
    candidates this flags 4 of the 6 wrong statements and 1 of 121 others. Image examples are
    never flagged: their nearest are other images that may share an answer or not (on the
    vqa sequence's candidates, seed 0, the rule flagged 4 of 96, none of them wrong).
    ``ok``: which neighbours count (``same_subject``; None: all)."""
    twins = [set(_twins(c, j, ok)) for j, c in enumerate(cands)]
    out = set()
    for i, c in enumerate(cands):
        near = list(getattr(c, "neighbours", ()) or ())
        if len(near) < 2 or c.image or any(cands[x].image for x in near[:2]):
            continue
        j, t = near[:2]
        if ok is not None and not (ok(i, j) and ok(i, t)):   # only statements of i's own subject can outvote it
            continue
        near_j, near_t = (set(getattr(cands[x], "neighbours", ()) or ()) for x in (j, t))
        if ((t in twins[j] or j in twins[t]) and i in near_j and i in near_t
                and i not in twins[j] | twins[t] and not {j, t} & twins[i]):
            out.add(i)
    return out


def served(cands: list[Candidate], offset: int = 0, ok=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The facility-location terms of a task's candidates, as parallel arrays
    (query, server, gain, weight), indices shifted by ``offset`` (the candidates' place in
    the selection pool). Candidates without neighbour gains serve their own query only;
    ``contradicted`` candidates serve nothing and their question counts for nothing;
    ``ok``: which neighbours may serve a query (``same_subject``; None: all)."""
    q, s, g, w = [], [], [], []
    out = contradicted(cands, ok)
    for j, c in enumerate(cands):
        if j in out:
            continue
        twins = len(_twins(c, j, ok))
        wj = 1.0 / (1 + twins)
        for i, x in [(j, c.gain), *_near(c, j, ok)]:
            if i in out:
                continue
            q.append(offset + j), s.append(offset + i), g.append(x), w.append(wj)
    return (np.array(q, np.int64), np.array(s, np.int64), np.array(g, np.float64), np.array(w, np.float64))


def twin_groups(cands: list[Candidate]) -> np.ndarray:
    """(N,) each candidate's twin group: the lowest index among the candidates linked to it
    by twin pairs (j, i): G[j, i] >= TWIN * G[j, j] > 0, either way round."""
    n = len(cands)
    pairs = [(j, i) for j, c in enumerate(cands) for i in _twins(c)]
    if not pairs:
        return np.arange(n)
    rows, cols = np.array(pairs).T
    _, label = connected_components(coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(n, n)), directed=False)
    first = {}
    for i, g in enumerate(label):
        first.setdefault(int(g), i)
    return np.array([first[int(g)] for g in label])
