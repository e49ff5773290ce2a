"""Entry kinds in one bank (issue 19): which kept examples are KV, which are their source.

A bank created with source entries (``ikv-learn --kinds tiered`` or ``--kinds source``)
keeps each example in one of two kinds under the same cap:

    kind     what it stores                          bytes (default model)       when retrieved
    kv       compact quantized K/V (``learn.compact``) ~60 KB + its record          dequantized
    source   prompt, answer, image file bytes        ~3 KB record (+ pages: images) re-encoded

A source entry is the example at full fidelity (re-encoded exactly as a kv entry was
made, before compaction) for about a twentieth of the bytes, and costs a decoder pass
over its tokens (and the vision graph for an image) on every query that retrieves it.

The latency budget (``--ttft-budget``: ``1.5x`` of the no-memory TTFT, or ``120ms``) is a
bound on the **mean** time to first token over queries. With ``k`` entries per query and
the costs measured on this device at learn time (``measure``), a query that retrieves a
source entry costs ``src_ms``, one that retrieves a kv entry ``kv_ms``, and one that no entry
passes the gate for ``closed_ms`` (the key pass, then the plain prompt). A share ``q`` of
queries is gated out (``closed_share``: per task, its leave-one-out queries that its margin
gate closes, averaged over the bank's tasks as if each were asked equally often), so

    mean = q * closed_ms + (1 - q) * ((1 - f) * kv_ms + f * src_ms) <= budget

and at most a share ``f`` of what is stored may be source (``source_share``), taking every
stored example as equally likely to be retrieved. ``f = 0``: the runtime
re-encodes nothing (``max_source = 0`` in the bank); no budget: every example that has a
slot is kept as source, the most faithful kind.

Which examples become source: this task's candidates first (in a seeded random order),
up to the share and the free slots; the rest compete for kv pages in the usual selection.
Old source entries are kept while slots and the share allow, else evicted at random (as
a reservoir would).

A new bank's split between slots and pages is sized before any gate is fitted
(``new_bank_share``, q = 0); the first learn then plans once, and when the share it priced
with the task's gated-out queries calls for a split more than 10% away (``resized_share``),
the still-empty bank is created again with that split and the task planned again. Evicted kv entries are not demoted to source (their example text is
not kept).
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from inducekv.core.errors import InduceKVError
from inducekv.kernels import kvquant
from inducekv.learn.candidates import Candidate
from inducekv.memory.bank import NewEntry, example_hash
from inducekv.memory.kinds import MIN_SLOT_SHARE, SOURCE_SLOT_SHARE, bank_kind_layout
from inducekv.memory.source import pack_source
from inducekv.runtime.api import Prepared, Result
from inducekv.runtime.memory import entry_bias, image_of, key_of

MEASURE_PROMPTS = 5   # prompts timed per kind (median); the VM's timings vary by +-20% between runs


def slot_share_for(f: float, slot_bytes: float, source_bytes: float, kv_bytes: float) -> float:
    """The share of a new bank's cap to give slots when a share ``f`` of its examples will be
    source (``source_bytes`` each: a slot, plus pages for an image) and the rest kv (``kv_bytes``
    each, slot included): every slot and every page used, were the bank filled in that mix."""
    per_example = f * source_bytes + (1.0 - f) * kv_bytes
    return float(np.clip(slot_bytes / per_example, MIN_SLOT_SHARE, SOURCE_SLOT_SHARE))


@dataclass(frozen=True)
class Budget:
    """A latency budget on the mean time to first token: ``factor`` x the no-memory TTFT, or ``ms``."""
    factor: float | None = None
    ms: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Budget | None":
        if text is None or str(text).strip().lower() in ("", "none"):
            return None
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(x|ms)\s*", str(text).lower())
        if not m or float(m.group(1)) <= 0:
            raise InduceKVError(f"--ttft-budget {text!r} is not a budget; write e.g. 1.5x (of the no-memory TTFT) "
                                "or 120ms")
        v = float(m.group(1))
        return cls(factor=v) if m.group(2) == "x" else cls(ms=v)

    def limit_ms(self, t0_ms: float) -> float:
        return self.factor * t0_ms if self.factor is not None else self.ms

    def __str__(self) -> str:
        return f"{self.factor:g}x" if self.factor is not None else f"{self.ms:g}ms"


@dataclass(frozen=True)
class Costs:
    """Median time to first token on this device (a query with memory: with its retrieval-key pass;
    the search, under a millisecond, is left out)."""
    t0_ms: float    # no memory
    kv_ms: float    # with k kv entries (dequantized)
    src_ms: float   # with k source entries (re-encoded)
    closed_ms: float | None = None   # no entry passes the gate: key pass + plain prompt (None: not
                                     # measured; priced as kv_ms, the cost model before gates counted)


def _ttft(rt, layout, ex, items: list, scheme: str, key_scale, started: float, source: bytes | None = None,
          closed: bool = False) -> float:
    """Time to first token of ``ex`` (a Candidate or Example) with ``items`` injected
    (``Layout.assemble_mixed`` items), or one ``source`` entry prefilled with the query as the
    runtime does at k=1 (``Runtime._one_source``), or neither (the plain prompt, as served), from
    ``started``. With memory, the query's retrieval-key pass runs first, inside the clock: right
    before the decoder, as when serving (on a small CPU it is slower there than alone).
    ``closed``: the key pass, then the plain prompt (no entry passed the gate)."""
    if not items and source is None and not closed:
        return rt.generate(ex.prompt, image=ex.image, max_new_tokens=1, use_memory=False).timings.ttft_ms
    img = image_of(rt, ex)
    key_of(rt, rt.key_encoder(), ex.prompt, img)
    if closed:
        key_ms = (time.perf_counter() - started) * 1000.0
        return key_ms + rt.generate(ex.prompt, image=ex.image, max_new_tokens=1, use_memory=False).timings.ttft_ms
    res = Result("", [], "length")
    if source is not None:
        ids, feats = layout.source_ids(source)
        feats = [f for f in (feats, img.features if img is not None else None) if f is not None]
        prep = Prepared(ids + layout.query_ids(ex.prompt, img), layout.prefix_cache, layout.p0,
                        np.concatenate(feats) if feats else None)
    else:
        cache, pos, masks = layout.assemble_mixed(items, scheme, key_scale=key_scale)
        lengths = [it[0].shape[2] if isinstance(it[0], np.ndarray) else it[1] for it in items]
        prep = Prepared(layout.query_ids(ex.prompt, img), cache, pos, img.features if img is not None else None, [],
                        entry_bias(layout.p0, lengths, None, masks))
    for _ in rt.decode(prep, max_new_tokens=1, result=res, started=started):
        pass
    return res.timings.ttft_ms


def _median_costs(rt, run, prompts: list, n: int) -> Costs:
    """``run(i, kind)`` -> ms for prompts 1..n (prompt 0 warms each kind up first)."""
    kinds = ("none", "kv", "source", "closed")
    for kind in kinds:
        run(0, kind)
    times = {kind: [] for kind in kinds}
    for i in range(1, n + 1):        # interleaved: a slow spell of the machine hits every kind alike
        for kind in kinds:
            times[kind].append(run(i, kind))
    out = {kind: statistics.median(v) for kind, v in times.items()}
    return Costs(out["none"], out["kv"], out["source"], out["closed"])


def measure(rt, layout, cands: list[Candidate], geo, key_scale, k: int = 1) -> Costs:
    """Time the ways a query can be answered on this device, on a few of the task's own prompts:
    no memory, ``k`` kv entries (dequantized), ``k`` source entries (re-encoded), gated out."""
    n = max(1, min(MEASURE_PROMPTS, len(cands) - 1))
    k = max(1, k)

    def run(i: int, kind: str) -> float:
        c = cands[i % len(cands)]
        others = [cands[(i + 1 + j) % len(cands)] for j in range(k)]
        t = time.perf_counter()
        if kind in ("none", "closed"):
            return _ttft(rt, layout, c, [], geo.scheme, key_scale, t, closed=kind == "closed")
        if kind == "kv":
            return _ttft(rt, layout, c, [(x.payload, x.tokens) for x in others], geo.scheme, key_scale, t)
        if k == 1:
            return _ttft(rt, layout, c, [], geo.scheme, key_scale, t, source=others[0].source_bytes())
        return _ttft(rt, layout, c, [layout.encode_source(x.source_bytes()) for x in others], geo.scheme, key_scale, t)

    return _median_costs(rt, run, cands, n)


def estimate(rt, layout, examples, k: int = 1) -> tuple[Costs, float]:
    """Costs before a bank exists (to size a new tiered bank): kv entries are timed as float
    K/V of the full entries, without dequantization or compaction. Also returns the mean
    tokens of the examples' rendered entries."""
    n = max(1, min(MEASURE_PROMPTS, len(examples) - 1))
    k = max(1, k)
    encoded, tokens = {}, []

    def kv_of(ex):
        key = id(ex)
        if key not in encoded:
            encoded[key] = layout.encode_entry(ex.prompt, ex.answers[0], image_of(rt, ex))
            tokens.append(encoded[key][0].shape[2])
        return encoded[key]

    def run(i: int, kind: str) -> float:
        ex = examples[i % len(examples)]
        others = [examples[(i + 1 + j) % len(examples)] for j in range(k)]
        if kind == "kv":
            items = [kv_of(x) for x in others]   # encoded before the clock starts
        t = time.perf_counter()
        if kind in ("none", "closed"):
            return _ttft(rt, layout, ex, [], "fp16", None, t, closed=kind == "closed")
        if kind == "source":
            if k == 1:
                raw = pack_source(others[0].prompt, others[0].answers[0],
                                  Path(others[0].image).read_bytes() if others[0].image else None)
                return _ttft(rt, layout, ex, [], "fp16", None, t, source=raw)
            items = [layout.encode_entry(x.prompt, x.answers[0], image_of(rt, x)) for x in others]
        return _ttft(rt, layout, ex, items, "fp16", None, t)

    costs = _median_costs(rt, run, examples, n)
    return costs, float(np.mean(tokens)) if tokens else 32.0


def new_bank_share(rt, examples, scheme: str, keep: float | None, budget_text: str | None, cap: int,
                   k: int = 1, kinds: str = "tiered") -> tuple[float, dict]:
    """The slot share of a new ``tiered`` or ``source`` bank (``slot_share_for``), and a report of
    how it was chosen: with a latency budget, the source share ``f`` comes from costs estimated
    on this device before the bank exists; a source entry's pages (its image) count as its bytes."""
    from inducekv.memory import format as fmt
    from inducekv.runtime.memory import Layout, template_from

    budget = Budget.parse(budget_text) if kinds == "tiered" else None
    m = rt.manifest
    trial = fmt.plan(cap, fingerprint=m.fingerprint, scheme=scheme, num_layers=m.num_layers, kv_heads=m.num_kv_heads,
                     head_dim=m.head_dim, key_dim=int(m.retrieval_key["dim"]), **bank_kind_layout(kinds, 0.5))
    slot = 2 * trial.record_bytes
    sample = examples[:16]
    image_pages = [trial.source_pages(len(pack_source(ex.prompt, ex.answers[0], Path(ex.image).read_bytes()
                                                      if ex.image else None))) * trial.page_bytes for ex in sample]
    src_bytes = slot + float(np.mean(image_pages))
    report_ = {"slot_bytes": slot, "source_bytes": round(src_bytes)}
    if budget is None:
        share = float(np.clip(slot / src_bytes, MIN_SLOT_SHARE, SOURCE_SLOT_SHARE))
        return share, {**report_, "share": 1.0, "slot_share": round(share, 4), "ttft_budget": None}
    layout = Layout(rt, *template_from(None))
    costs, tokens = estimate(rt, layout, examples, k)
    f = source_share(costs, budget)
    kept = int(np.ceil(tokens * (keep or 1.0))) if scheme in kvquant.SPARSE else int(round(tokens))
    kv_bytes = trial.entry_bytes(max(kept, 1))
    share = slot_share_for(f, slot, src_bytes, kv_bytes)
    return share, {**report_, "kv_bytes": int(kv_bytes), "share": round(f, 4), "slot_share": round(share, 4),
                   "entry_tokens": round(tokens, 1),
                   "ttft_budget": str(budget),
                   "costs_ms": {kk: round(v, 2) for kk, v in asdict(costs).items() if v is not None}}


def resized_share(sizing: dict | None, share: float, tol: float = 0.1) -> float | None:
    """The slot share a new tiered bank should have, now that the first task's plan priced its
    source ``share`` with the queries its gates send to the plain prompt (``new_bank_share``
    sized the bank before any gate was fitted, as if none were); None when the bank as sized
    is within ``tol`` (relative) of it, or was not sized for a latency budget."""
    if not sizing or sizing.get("ttft_budget") is None or "kv_bytes" not in sizing:
        return None
    want = slot_share_for(share, sizing["slot_bytes"], sizing["source_bytes"], sizing["kv_bytes"])
    return want if abs(want - sizing["slot_share"]) > tol * sizing["slot_share"] else None


def resplit(sizing: dict | None, share: float) -> tuple[float, dict] | None:
    """(slot share, updated sizing report) for a new tiered bank whose first plan priced source
    ``share`` (``resized_share``), or None when the split it has is kept."""
    slot_share = resized_share(sizing, share)
    if slot_share is None:
        return None
    return slot_share, {**sizing, "slot_share": round(slot_share, 4), "share": round(share, 4),
                        "resized_from": sizing["slot_share"]}


SERVE_PROMPTS = 10    # prompts served after a commit to check the budget (``served``)


def served(rt, path, examples: list, budget: "Budget | None", seed: int = 0, n: int = SERVE_PROMPTS,
           gated_out: float = 0.0, closed_ms: float | None = None) -> dict:
    """Time the real serving path on the bank just written: ``n`` of the task's prompts (seeded
    sample), each answered with memory (``Runtime.generate``: key pass, search, gate, reads,
    re-encoding) and without, interleaved. Reports the mean TTFT with memory against the budget,
    and the median per kind of the top retrieved entry (``none``: nothing passed the gate: the
    plain prompt, after the key pass). ``costs``: those medians as ``Costs`` when both kinds were
    served at least twice (else None), which the bank then keeps for its next learn.

    The task's own prompts find their own entries, so they always pass the gate; the planner
    prices a share ``gated_out`` of queries (its leave-one-out estimate) at the gated-out cost.
    The budget is checked on that same mix (``priced_ms``: ``gated_out`` of the queries at the
    median served ``none`` time, or ``closed_ms`` as planned when too few were served so, the
    rest at the mean with memory), so the check and the plan assume one query distribution."""
    order = np.random.default_rng(seed).permutation(len(examples))[:n + 1]
    picks = [examples[int(i)] for i in order]
    mem = rt.open_memory(path)
    try:
        def one(ex, use: bool) -> tuple[float, str]:
            r = rt.generate(ex.prompt, image=ex.image, max_new_tokens=1, memory=mem if use else None, use_memory=use)
            return r.timings.ttft_ms, (r.entries[0].get("kind", "kv") if r.entries else "none")

        one(picks[0], False), one(picks[0], True)   # warm-up: the prefixes are prefilled once
        plain, with_mem = [], []
        for ex in picks[1:]:
            plain.append(one(ex, False)[0])
            with_mem.append(one(ex, True))
    finally:
        mem.close()
    t0 = statistics.median(plain)
    by_kind = {}
    for ms, kind in with_mem:
        by_kind.setdefault(kind, []).append(ms)
    mean = float(np.mean([ms for ms, _ in with_mem]))
    out = {"prompts": len(with_mem), "t0_ms": round(t0, 2), "mean_ms": round(mean, 2), "ratio": round(mean / t0, 3),
           "by_kind": {k: {"n": len(v), "median_ms": round(statistics.median(v), 2)} for k, v in sorted(by_kind.items())}}
    gated = statistics.median(by_kind["none"]) if len(by_kind.get("none", [])) >= 2 else None
    q = float(np.clip(gated_out, 0.0, 1.0))
    closed = gated if gated is not None else closed_ms
    priced = mean
    if q > 0.0 and closed is not None:
        priced = q * closed + (1.0 - q) * mean
        out.update(gated_out=round(q, 4), closed_ms=round(closed, 2), priced_ms=round(priced, 2),
                   priced_ratio=round(priced / t0, 3))
    if budget is not None:
        out["limit_ms"] = round(budget.limit_ms(t0), 2)
        out["within"] = bool(priced <= budget.limit_ms(t0))
    both = all(len(by_kind.get(k, [])) >= 2 for k in ("kv", "source"))
    out["costs"] = Costs(t0, statistics.median(by_kind["kv"]), statistics.median(by_kind["source"]),
                         gated) if both else None
    return out


def serve_check(rt, bank, tier: "TierPlan", examples: list, seed: int = 0) -> dict:
    """After a commit to a bank with a latency budget: ``served`` on the bank just written; when
    both kinds were served, the bank keeps those costs for its next learn (in its own commit: a
    kill before it leaves the learn committed, with the costs it was planned with). Returns the
    tier settings now stored, with the ``served`` report."""
    from dataclasses import replace

    from inducekv.runtime.memory import TIERS_KEY

    got = served(rt, bank.path, examples, Budget.parse(tier.budget), seed, gated_out=tier.gated_out,
                 closed_ms=tier.costs.closed_ms if tier.costs else None)
    if got["costs"] is not None:
        tier = replace(tier, costs=got["costs"], costs_from="served")
        with bank.transaction() as tx:
            tx.set_extra(TIERS_KEY, tier.catalog())
    return {**tier.catalog(), "served": {k: v for k, v in got.items() if k != "costs"}}


def stored_costs(tiers: dict) -> Costs | None:
    """The costs a bank's tier settings recorded (measured when it was created or last re-budgeted)."""
    c = tiers.get("costs_ms")
    try:
        if not isinstance(c, dict):
            return None
        closed = c.get("closed_ms")
        return Costs(float(c["t0_ms"]), float(c["kv_ms"]), float(c["src_ms"]),
                     float(closed) if closed is not None else None)
    except (KeyError, TypeError, ValueError):
        return None


def closed_share(margin: float | None, asks: list, closed: int = 0) -> float:
    """The share of a task's leave-one-out queries that its gates send to the plain prompt:
    ``closed`` of them by its subject gate, and of the rest (``gate.fit_gate``'s ``asks``:
    [margin, gain]) those under its margin gate (an image task's question gate opens for the
    task's own questions)."""
    shut = closed + (sum(float(m) < margin for m, _ in asks) if margin is not None else 0)
    return float(shut / (len(asks) + closed)) if asks or closed else 0.0


def bank_closed_share(shares: dict, tasks) -> float:
    """The gated-out share of queries for a bank holding ``tasks``, each asked equally often
    (a task without a recorded share counts as never gated out)."""
    tasks = list(tasks)
    if not tasks:
        return 0.0
    return float(np.mean([float(shares.get(t, 0.0)) for t in tasks]))


def source_share(costs: Costs | None, budget: Budget | None, closed: float = 0.0) -> float:
    """The largest share of stored examples that may be source within ``budget`` (mean TTFT),
    when a share ``closed`` of queries passes no gate (costing ``costs.closed_ms``)."""
    if budget is None:
        return 1.0
    limit = budget.limit_ms(costs.t0_ms)
    q = float(np.clip(closed, 0.0, 1.0)) if costs.closed_ms is not None else 0.0
    if q >= 1.0:
        return 1.0 if costs.closed_ms <= limit else 0.0
    served = (limit - q * (costs.closed_ms or 0.0)) / (1.0 - q)   # what the queries with memory may cost
    if costs.src_ms <= costs.kv_ms:
        return 1.0 if served >= costs.src_ms else 0.0
    return float(np.clip((served - costs.kv_ms) / (costs.src_ms - costs.kv_ms), 0.0, 1.0))


def source_entry(c: Candidate, task: str, tokens: int) -> NewEntry:
    """The bank's source entry for a candidate (its retrieval key, the example's bytes)."""
    return NewEntry(None, None, c.key, task, example_hash(c.example()), tokens=tokens, source=c.source_bytes())


def span(geo, c: Candidate) -> int:
    """Tokens the candidate's rendered entry takes (a per-layer compacted one: its span)."""
    if geo.scheme in kvquant.SPARSE:
        return int(kvquant.slot_map(c.payload, geo.scheme, geo.num_layers, geo.kv_heads, c.tokens, geo.head_dim)[2])
    return c.tokens


@dataclass
class TierPlan:
    """What a learn does with source entries (``learn.plan``)."""
    new_sources: list[int]       # candidate indices written as source
    evict_sources: list[int]     # slots of old source entries evicted
    share: float                 # the share of stored examples that may be source
    budget: str | None           # the latency budget it came from
    costs: Costs | None
    max_source: int              # source entries the runtime re-encodes per query (0 or k)
    kinds: str = "tiered"        # "tiered" or "source" (the bank's, fixed when it was created)

    costs_from: str = "learn"    # "learn": timed by ``measure``/``estimate``; "served": by ``served`` after a commit
    closed: dict = field(default_factory=dict)   # task -> share of its queries gated out (``closed_share``)
    gated_out: float = 0.0       # the bank's share of queries gated out, as priced (``bank_closed_share``)

    def catalog(self) -> dict:
        costs = {k: round(v, 2) for k, v in asdict(self.costs).items() if v is not None} if self.costs else None
        return {"kinds": self.kinds, "max_source": self.max_source, "share": round(self.share, 4), "ttft_budget": self.budget,
                "costs_ms": costs, "costs_from": self.costs_from,
                **({"closed": {t: round(v, 4) for t, v in sorted(self.closed.items())},
                    "gated_out": round(self.gated_out, 4)} if self.closed else {})}


def mix(share: float, slots: int, kv_fit: int, old_kv: int, new: int, old_src: int) -> tuple[int, int]:
    """(kv entries, source entries) to keep: the most examples, then the most of them as source
    (the example at full fidelity). ``kv_fit``: kv entries the pages hold (old ``old_kv`` ones
    included); ``new``: this task's examples, each kv or source; ``old_src``: source entries
    already kept; at most ``slots`` entries, and a source share of at most ``share``."""
    best = (0, 0)
    for n_kv in range(min(kv_fit, old_kv + new, slots) + 1):
        new_kv = max(0, n_kv - old_kv)          # the fewest new examples that must be kv
        cap = new - new_kv + old_src
        if share < 1.0:
            cap = min(cap, int(np.floor(share / (1.0 - share) * n_kv + 1e-9)))
        n_src = max(0, min(cap, slots - n_kv))
        if (n_kv + n_src, n_src) > (sum(best), best[1]):
            best = (n_kv, n_src)
    return best


def pick_sources(order: list[int], old_sources: list[int], n_kv: int, n_src: int, old_kv: int,
                 rng) -> tuple[list[int], list[int]]:
    """(new candidates kept as source, old source slots evicted) for the counts ``mix`` chose:
    ``n_src`` drawn uniformly from the new examples and the old source entries together (as a
    reservoir keeps a uniform sample of everything seen), leaving at least the new examples the
    kv entries must take (``n_kv`` minus the ``old_kv`` kept) out of the draw."""
    new_kv = max(0, n_kv - old_kv)
    quota = max(0, len(order) - new_kv)       # new examples that may be source
    pool = [("new", i) for i in order] + [("old", s) for s in old_sources]
    new, kept_old = [], set()
    for j in rng.permutation(len(pool)):
        if len(new) + len(kept_old) >= n_src:
            break
        kind, x = pool[int(j)]
        if kind == "old":
            kept_old.add(x)
        elif len(new) < quota:
            new.append(x)
    return new, [s for s in old_sources if s not in kept_old]
