"""Phase 2c of a learn: the relevance gate ("do no harm"), fitted on the task's own examples.

A query whose answer the bank does not hold still retrieves *some* entry, and injecting
it can override what the model already knows (a made-up capital for "the capital of
France"). Retrieval scores alone cannot tell: raw cosines of the frozen keys sit at
0.98-0.99 for every question of a task's shape. What does tell is whether the top entry
*stands out*: the margin between the top-1 and top-2 scores. Measured on the default
model with 625 fact entries (README "Do no harm"): paraphrased questions whose entry
is top-1, median margin 0.006; questions the bank holds no answer to (real capitals),
median 0.0002.

The fit uses the only such questions a learn has: leave-one-out. Each sampled example is
asked with its own entry left out of the pool (old entries + the task's candidates):
its top-1 is then some other entry, and injecting it either raises the answer's
likelihood (a neighbour with the same answer: a colour task) or lowers it (another
fact). (A margin is measured to the best entry that is not the top one's twin: two
statements of one fact are not a near-tie.) The gate's margin for the task is the
``QUANTILE`` of the margins of the harmful
ones (fewer than ``MIN_HARMFUL`` harmful: no gate). The gate also keeps a task's entries out
of unrelated questions: a digit-parity bank with no gate turned the default VLM's colour
answers from 0.98 to 0.00 ("even"/"odd"; README). At inference, a query whose top-1 entry belongs to the
task is answered with memory only when its margin reaches the gate; otherwise without
memory, as the bare model would (``runtime.memory.Memory``).

An image task gets a question gate instead (``fit_questions``, ``runtime/questions.py``): the
text keys of its prompts, against which a query's question is tested at serve time; one whose
answers the bare model already gives (``knows``) gets both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inducekv.learn.calibrate import cosine
from inducekv.learn.candidates import Ask, Candidate, Scorer, unpack
from inducekv.learn.progress import steps
from inducekv.runtime import questions as qgate
from inducekv.runtime import subjects as subj
from inducekv.runtime.memory import TWIN_LOOK, gate_margin

QUERIES = 24      # leave-one-out queries per learn
QUANTILE = 0.75   # of the harmful queries' margins; chosen on dev splits (README "Do no harm"): the best
                  # mean accuracy on the capitals and colours dev paraphrases (0.592; 0.608 at 0.5) that
                  # keeps the real-world facts of examples/tasks/dev/known.dev.jsonl the bare model answers
                  # within 2 points (1.00; 0.93 at 0.5, 0.15 ungated)
MIN_HARMFUL = 3   # fewer harmful queries than this: no gate


@dataclass
class GateFit:
    """The fitted margin for the task (None: no margin gate), the task's question keys (an image
    task's question gate, ``runtime/questions.py``; None: none) and the report."""
    margin: float | None
    report: dict = field(default_factory=dict)
    questions: list[str] | None = None   # packed (``questions.pack``)
    subjects: bool = False               # the task's subject gate is on (``runtime/subjects.py``)

    def as_dict(self) -> dict:
        return {"margin": self.margin, **({"questions": len(self.questions)} if self.questions else {}),
                **({"subjects": True} if self.subjects else {}), **self.report}


KNOWN = 0.5       # the bare model "knows" a task when the median example's answer has at least this
                  # probability without memory (geometric mean over its tokens; not tuned)


def knows(cands: list[Candidate]) -> bool:
    """Whether the bare model already answers this task's examples (``KNOWN``): an image task
    that it does keeps the margin gate as well, so memory cannot override what it sees (the
    domain sequence: colour questions on clean images, README "Do no harm")."""
    return bool(cands) and float(np.median([c.base for c in cands])) >= np.log(KNOWN)


def fit_questions(rt, keys, cands: list[Candidate]) -> GateFit:
    """An image task's question gate: the text keys of its distinct prompts (at most
    ``questions.MAX_KEYS``, farthest-first). It replaces the margin gate for such a task: on
    images the leave-one-out margins measure how alike the task's pictures are, not whether a
    question is the task's (README "Do no harm": the margin gate closed for 90% of a parity
    task's own questions and still let colour questions through)."""
    prompts = list(dict.fromkeys(c.prompt for c in cands))
    text = np.concatenate([keys.batch([rt.tokenizer.encode(p) for p in prompts[i:i + 32]])
                           for i in range(0, len(prompts), 32)])
    picked = qgate.farthest(text)
    base = float(np.median([c.base for c in cands])) if cands else 0.0
    return GateFit(None, {"reason": "image task: the question gate decides", "prompts": len(prompts),
                          "median_base_logp": round(base, 3)}, questions=qgate.pack(picked))


def fit_gate(geo, cands: list[Candidate], old_keys: np.ndarray, old_kv, scorer: Scorer, rng, query_map,
             progress=False, key_scale=None, n_queries: int = QUERIES, quantile: float = QUANTILE,
             twins: dict[int, int] | None = None, gates_of=None, exclude=frozenset(),
             pool_words: list | None = None) -> GateFit:
    """Leave-one-out margins and answer-likelihood gains of ``n_queries`` of the task's examples.
    ``twins``: pool index (old entries, then candidates) -> twin group; margins skip the top
    entry's twins as the runtime's do (``gate_margin``); ``gates_of(j)``: the value gates entry
    j is injected with (None: unscaled), so harm is measured as the runtime would inject;
    ``exclude``: candidates that take no part, as queries or in the pool (the outvoted ones,
    ``value.contradicted``: worth nothing, so never kept; asked, a wrong label whose top entry
    is a right sibling looks harmed at a large margin and would raise the gate)."""
    pool = np.concatenate([old_keys, np.stack([c.key for c in cands])]) if cands else old_keys
    if len(pool) < 3:
        return GateFit(None, {"reason": "too few entries"})
    n_old, out = len(old_keys), sorted(int(x) for x in exclude)
    margins, asks, named = [], [], []   # named: (top is a candidate, the ask names its subject)
    for i in [int(i) for i in rng.permutation(len(cands)) if int(i) not in exclude][:n_queries]:
        c = cands[i]
        s = cosine(query_map(c.key), pool)                   # the index's scores
        s[n_old + i] = -np.inf                               # its own entry left out
        s[[n_old + x for x in out]] = -np.inf                # (and the excluded)
        order = np.argsort(-s)[:len(s) - 1 - len(out)]       # (those are last)
        j = int(order[0])
        kv = (lambda j=j: [unpack(geo, cands[j - n_old].payload, cands[j - n_old].tokens, key_scale)]) \
            if j >= n_old else old_kv(j)
        if kv is None:
            continue
        if not callable(kv):
            kv = [kv]
        margins.append(gate_margin(order[:2 + TWIN_LOOK], s[order[:2 + TWIN_LOOK]], twins or {}))
        asks.append((c, kv, gates_of(j) if gates_of is not None else None))
        words = pool_words[j] if pool_words is not None else None
        named.append((j >= n_old, words is None or subj.names(subj.words(c.prompt), words)))
    scored = list(scorer.logp_many(Ask(c.prompt, c.answer, kv, scorer.rt.encode_image(c.image) if c.image else None,
                                       gates=g) for c, kv, g in steps(asks, "gate", "query", progress)))
    gains = [x - c.base for (c, _, _), x in zip(asks, scored)]
    margins, gains = np.array(margins), np.array(gains)
    new_top = np.array([n for n, _ in named], bool)
    said = np.array([o for _, o in named], bool)
    other = new_top & ~said                             # asks whose top candidate names another subject
    after = np.asarray(scored, np.float64)     # mean log p per answer token, with the top entry
    # helped: another subject's entry makes the model give an answer it did not give bare (the
    # answer becomes the likely one, p >= KNOWN): the task's answers repeat across subjects
    # (4 made-up planets for 15 people), so closing such entries to other subjects costs answers.
    # (Not mere gains: any fact entry raises a made-up answer's likelihood a little by its form,
    # "The answer is <name>"; not answers the bare model already gives.)
    base = np.array([c.base for c, _, _ in asks], np.float64)
    helped = int(np.sum(other & (gains > 0) & (after >= np.log(KNOWN)) & (base < np.log(KNOWN)))) \
        if len(after) else 0
    on = pool_words is not None and helped < MIN_HARMFUL
    closed = ~said & (~new_top | on) if len(said) else said   # what the subject gates close
    subject = {"on": on, "other_subject": int(other.sum()), "other_subject_helped": helped,
               "closed": int(closed.sum())} if pool_words is not None else None
    asked = len(margins)
    margins, gains = margins[~closed], gains[~closed]   # the margin gate sees what those let through
    harmful = margins[gains < 0]
    report = {**({"subject": subject} if subject is not None else {}), "queries": asked, "harmful": int(len(harmful)),
              "harmful_margins": sorted(round(float(x), 5) for x in harmful),
              "margin_quartiles": [round(float(x), 5) for x in np.quantile(margins, [0.25, 0.5, 0.75])]
              if len(margins) else [],
              "gain_quartiles": [round(float(x), 3) for x in np.quantile(gains, [0.25, 0.5, 0.75])] if len(gains) else [],
              "asks": [[round(float(m), 5), round(float(g), 3)] for m, g in zip(margins, gains)]}   # [margin, gain]
    # (the margins, gains, harmful and asks above: of the asks the subject gate lets through)
    margin = gate_from(margins, gains, quantile)
    if margin is None:
        return GateFit(None, {**report, "reason": "leaving an example out rarely hurts: no gate"}, subjects=on)
    return GateFit(margin, report, subjects=on)


def gate_from(margins: np.ndarray, gains: np.ndarray, quantile: float = QUANTILE) -> float | None:
    """The gate for leave-one-out asks with these margins and gains: the ``quantile`` of the
    harmful asks' margins (None, no gate: fewer than ``MIN_HARMFUL`` harmful)."""
    margins, gains = np.asarray(margins, np.float64), np.asarray(gains, np.float64)
    harmful = margins[gains < 0]
    if len(harmful) < MIN_HARMFUL:
        return None
    return round(float(np.quantile(harmful, quantile)), 6)
