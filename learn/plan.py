"""A learn as two steps: ``plan`` decides, ``write`` commits.

``plan(rt, bank, examples, task)`` runs phases 1-4 and returns a ``Plan`` (nothing is
written); ``write(bank, plan)`` is phase 5 (``commit.py``); ``absorb`` does both.

1. **encode** (``candidates.py``): every example becomes a candidate entry, with its
   likelihood gain; then (``value.py``) each example is asked again with its nearest
   other candidates injected, so selection sees what an entry does for other questions.
2. **calibrate** (``calibrate.py``, outer level): the retrieval key map, kept only when
   held-out retrieval loss drops; then the injection weighting (the temperature of the
   softmax over the k retrieval scores), kept only when it beats unweighted injection; then
   one value gate per layer group for this task's entries (``fit_value_gates``), kept only when
   it beats the gates its entries had.
3. **retain** (``retain.py``): old tasks' anchors value the old entries.
4. **select** (``select.py``, inner level): old entries and new candidates compete for
   the same bytes and slots.
5. **write** (``commit.py``): evictions, additions, anchors, gains and calibration, in
   one commit, or two (evictions first) when the new entries need the evicted entries'
   pages; so old entries and new candidates compete for the whole cap (``reserve``, default
   0, leaves a share of it free).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from inducekv.core.errors import BankError, InduceKVError
from inducekv.learn import select as sel
from inducekv.learn.calibrate import Calibration, InjectionFit, ValueGates, calibrate, fit_injection, fit_value_gates
from inducekv.learn.commit import write
from inducekv.learn.gate import GateFit, fit_gate, fit_questions, knows
from inducekv.learn.compact import COMPACT_KEY, Compaction, compactor_for, resolve as resolve_compaction
from inducekv.learn.defaults import GAINS_KEY, MAX_ENTRY_TOKENS, N_ANCHORS, RESERVE, SCORE_BATCH
from inducekv.kernels import kvquant
from inducekv.learn.candidates import Candidate, Scorer, Spool, encode_candidates, fit_key_scales, unpack
from inducekv.learn.progress import report
from inducekv.learn import tiers as tiers_
from inducekv.learn.tiers import TierPlan
from inducekv.memory.kinds import bank_kind_layout, tiers_catalog
from inducekv.memory.format import SUBJECTS_KEY
from inducekv.runtime import subjects as subj
from inducekv.learn.retain import retention
from inducekv.learn.value import (answered, contradicted, neighbour_gains, same_subject, served, twin_groups,
                                  value_scorer)
from inducekv.memory.bank import Bank
from inducekv.runtime.memory import (DEFAULT_POLICY, DEFAULT_TEMPLATE, TEMPLATES, Injection, Layout,
                                     TIERS_KEY, template_from, tiers_from, twins_from, value_gates_from)
from inducekv.runtime.session import require_memory_support
from inducekv.runtime.tasks import iter_task



@dataclass
class Plan:
    """What a learn will do to a bank (``write`` does it)."""
    task: str
    keep_old: list[int]                      # slots kept
    evict: list[int]                         # slots evicted
    add: list[int]                           # indices into ``candidates`` written
    candidates: list[Candidate]
    anchors: list[dict]                      # this task's anchors after the write
    gains: dict[str, float]                  # entry id -> gain, for the kept old entries
    calibration: Calibration
    injection: InjectionFit                  # the fitted entry weighting (stored when accepted)
    value_gates: ValueGates                  # the fitted per-layer value gates (stored when accepted)
    gate: GateFit                            # the task's relevance gate (``gate.py``; margin None: ungated)
    template: dict | None                    # the prompt layout to store (None: the bank has one)
    key_scales: np.ndarray | None            # shared key scales to store (a new bank of a k*v* scheme), else None
    bank_gen: int                            # the bank generation the plan was made against
    bytes_per_entry: float
    timings: dict = field(default_factory=dict)
    evicted_per_task: dict = field(default_factory=dict)
    outvoted: int = 0                        # candidates their nearest agreeing statements contradict (value.py)
    answered: int = 0                        # candidates the bare model already answers, not written (value.py)
    compaction: Compaction = Compaction()    # how the new entries were compacted (``learn.compact``)
    store_compaction: bool = False           # the bank's record of it changes
    commits: int = 0                         # commits ``write`` made (2: evictions first; 0: not written)
    twins: dict = field(default_factory=dict)  # entry id -> twin group, for the kept old entries
    twin_group: list | None = None           # candidate -> its twin group's first candidate (``value.py``)
    sources: list[int] = field(default_factory=list)  # indices into ``candidates`` written as source entries
    source_tokens: dict = field(default_factory=dict)  # candidate index -> its rendered entry's tokens
    tiers: "TierPlan | None" = None          # kinds of entries (a bank with source entries; ``tiers.py``)
    subjects: dict = field(default_factory=dict)  # the subject gate's record for the kept old entries (``subjects.pack``)
    subject_words: list | None = None        # candidate -> its subject words, when this task's subject gate is on
    subjects_own: dict = field(default_factory=dict)  # entry id -> subject words, this task's kept old entries


def read_examples(path, require_answer: bool = True) -> list:
    return list(iter_task(path, require_answer=require_answer))


def task_name(path: Path, name: str | None) -> str:
    n = name or Path(path).name.split(".")[0]
    if not n:
        raise InduceKVError("cannot derive a task name from the file name; pass --name")
    return n


SPARSE_PAGE_TOKENS = 1
SPARSE_ENTRY_TOKENS = 10


def open_or_create(bank_path: Path, rt, budget: int | None, scheme: str, max_tokens: int = MAX_ENTRY_TOKENS,
                   kinds: str = "kv", slot_share: float | None = None, sizing: dict | None = None) -> Bank:
    """The bank at ``bank_path`` opened for writing; created with cap ``budget`` when absent
    (never for a bundle that cannot serve memory: nothing is written then); ``kinds``: the
    entry kinds a new bank holds (``memory.kinds.KINDS``)."""
    require_memory_support(rt.manifest)
    m = rt.manifest
    bank_path = Path(bank_path)
    if bank_path.exists():
        return Bank.open(bank_path, writable=True, fingerprint=m.fingerprint)
    if budget is None:
        raise BankError(f"{bank_path} does not exist; pass --budget (e.g. 16MiB) to create it")
    return create_bank(bank_path, budget, m, scheme, max_tokens, kinds, slot_share, sizing=sizing)


def create_bank(path, cap: int, manifest, scheme: str, max_tokens: int = MAX_ENTRY_TOKENS, kinds: str = "kv",
                slot_share: float | None = None, force: bool = False, sizing: dict | None = None) -> Bank:
    """A new bank for entries of ``scheme`` and ``kinds`` (``kv``, ``tiered``, ``source``; a tiered
    bank gives ``slot_share`` of its cap to slots, ``tiers.new_bank_share``); a bank with source
    entries records its kinds in the catalog (``tiers``), with ``sizing`` (``tiers.new_bank_share``'s
    report: the budget and costs it was sized for)."""
    bank = Bank.create_for(path, cap, manifest, scheme=scheme, force=force,
                           **{"max_tokens": max_tokens, **bank_layout(scheme), **bank_kind_layout(kinds, slot_share)})
    if kinds != "kv":
        with bank.transaction() as tx:
            tx.set_extra(TIERS_KEY, tiers_catalog(kinds, *((sizing.get("ttft_budget"), sizing.get("costs_ms"))
                                                                    if sizing else ())))
    return bank


def spool_for(bank: Bank) -> Spool:
    """Where a learn keeps its candidates' payloads: a temporary file beside the bank (the
    device's storage, not RAM: /tmp is often a RAM disk), else the system's temp folder."""
    try:
        return Spool(str(Path(bank.path).parent))
    except OSError:
        return Spool()


def bank_layout(scheme: str) -> dict:
    """Page and slot sizing of a new bank for entries of ``scheme`` (``Bank.create_for``'s
    ``page_tokens``, ``entry_tokens``: one slot per that many tokens of page space).
    Per-layer compacted entries store half their tokens: a 64 MiB bank of the fact tasks
    ran out of its 625 slots (16 tokens each) with a third of its pages free (63 KiB, about
    10 one-token pages, per entry), so sparse banks get a slot per 10 tokens."""
    if scheme in kvquant.SPARSE:
        return {"page_tokens": SPARSE_PAGE_TOKENS, "entry_tokens": SPARSE_ENTRY_TOKENS}
    return {"page_tokens": 4}


def page_tokens(scheme: str) -> int:
    """Page size of a new bank: 1 token for per-layer compacted entries (their slot counts
    vary by one or two, so 4-token pages waste ~9% of them: 79.3 vs 72.5 KB mean on the
    capitals task), else the bank's default 4 (``bank_layout``)."""
    return bank_layout(scheme)["page_tokens"]


def layout_spec(bank: Bank, template: str | None = None, policy: str | None = None) -> tuple[dict, bool]:
    """The bank's prompt layout, or the requested one for a bank without entries;
    returns (spec, whether it must be stored)."""
    stored = bank.catalog.get("template")
    if template is None and policy is None:
        spec = stored or {"template": asdict(TEMPLATES[DEFAULT_TEMPLATE]), "policy": DEFAULT_POLICY}
        return spec, stored is None
    if template is not None and template not in TEMPLATES:
        raise InduceKVError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    cur_t, cur_p = template_from(stored)
    spec = {"template": asdict(TEMPLATES[template]) if template else asdict(cur_t), "policy": policy or cur_p}
    template_from(spec)  # validates the policy
    if spec != stored and stored is not None and len(bank.slots()):
        raise BankError(f"{bank.path} already holds entries made with template {cur_t.name!r}, policy {cur_p!r}; "
                        "use a new bank for another layout")
    return spec, spec != stored


def plan(rt, bank: Bank, examples, task: str, *, strategy: str = sel.DEFAULT_STRATEGY, weights: sel.Weights = sel.Weights(),
         seed: int = 0, n_anchors: int = N_ANCHORS, k: int = 1, reserve: float = RESERVE, progress=False,
         candidates: list[Candidate] | None = None, template: str | None = None, policy: str | None = None,
         compact: str | None = None, slots: int | None = None, keep: float | None = None, gated: bool = True,
         batch: int = SCORE_BATCH, ttft_budget: str | None = None, value_gates: bool = True,
         subjects: bool = True, known_out: bool = True) -> Plan:
    """Phases 1-4 on an open bank: what to keep, evict and add. ``candidates`` skips phase 1
    (reuse an encoding); ``template``/``policy`` choose the layout of a bank without entries;
    ``gated``: fit the task's relevance gate (``gate.py``; ``subjects``: with its subject gate,
    ``runtime/subjects.py``); ``value_gates``: fit the per-layer
    value gates (``calibrate.fit_value_gates``; False: the bank's stay); ``batch``: examples per decoder
    pass when encoding and scoring (``candidates.Scorer``); ``known_out``: leave out the examples the bare
    model already answers (``value.answered``; valued strategies only); ``ttft_budget``: the latency budget of a
    bank with source entries (``tiers.Budget``; None: the bank's stored one, else none); ``compact``/``slots``/``keep``: entry
    compaction (``learn.compact``; None: the bank's: perlayer
    for a bank created with a sparse scheme, else none); ``progress``: True for tqdm bars, or a
    ``callback(stage, done, total)`` (``learn.progress``)."""
    timings, rng = {}, np.random.default_rng(seed)
    if not examples:
        raise InduceKVError("the task file has no examples")
    if strategy not in sel.STRATEGIES:
        raise InduceKVError(f"unknown strategy {strategy!r}; choose one of {', '.join(sel.STRATEGIES)}")
    spec, store_spec = layout_spec(bank, template, policy)
    compaction = resolve_compaction(bank, compact, slots, keep)
    layout = Layout(rt, *template_from(spec))
    compactor = compactor_for(rt, layout, compaction) if candidates is None else None
    keys = rt.key_encoder()
    scorer = Scorer(rt, layout, batch)
    g = bank.geo
    snap = bank.snapshot()

    t = time.perf_counter()
    key_scale, new_scales = bank.key_scales(), None
    if g.scheme in kvquant.SHARED_KEY_SCALE and key_scale is None:
        if candidates is not None:
            raise InduceKVError(f"this {g.scheme} bank has no key scales yet; let the learn encode the examples")
        key_scale = new_scales = fit_key_scales(rt, layout, examples, g.scheme, any_position=compaction.method == "genv")
    cands = candidates if candidates is not None else encode_candidates(rt, g, layout, keys, examples, progress,
                                                                        key_scale, compactor, spool_for(bank), batch)
    timings["encode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    valued = strategy not in ("random", "fifo", "all") and sel.weights_for(strategy, weights).lik > 0
    if valued and not all(c.neighbours for c in cands):
        neighbour_gains(g, cands, value_scorer(rt, layout, cands, batch), key_scale, progress=progress)
    known = answered(rt, cands, progress) if valued and known_out else set()   # worth nothing: not written
    timings["value_s"] = time.perf_counter() - t

    outvoted = contradicted(cands) if valued else set()
    old = snap.entries
    stored = snap.catalog.get("extra", {}).get(GAINS_KEY, {})
    old_twins = twins_from(snap.catalog)
    group = twin_groups(cands) if valued else np.arange(len(cands))
    pool_twins = {**{i: old_twins[e.entry_id] for i, e in enumerate(old) if e.entry_id in old_twins},
                  **{len(old) + j: -1 - (len(old) + int(r)) for j, r in enumerate(group)}}   # (gate_margin's labels)

    try:
        said_tasks, said = subj.unpack((snap.catalog.get("extra") or {}).get(SUBJECTS_KEY))
    except InduceKVError:   # a malformed record: this learn writes a new one
        said_tasks, said = set(), {}
    cand_words = None if not subjects or any(c.image for c in cands) else subj.subject_words([c.prompt for c in cands],
                                                                               [c.answer for c in cands])
    pool_words = None if cand_words is None else [said.get(e.entry_id) if e.task in said_tasks else None
                                                  for e in old] + cand_words

    def old_kv(j: int):
        got = bank.read_payload(old[j].slot, old[j].entry_id)
        if got is not None and got[1].kind == "source":
            return layout.encode_source(got[0])
        return None if got is None else unpack(g, got[0], got[1].tokens, key_scale)

    t = time.perf_counter()
    if strategy == "all":
        calib = Calibration(False, {"reason": "strategy all"})
        inject = InjectionFit(False, None, {"reason": "strategy all"})
        vgates = ValueGates(False, None, {"reason": "strategy all"})
        gate = GateFit(None, {"reason": "strategy all"})
        timings.update(calibrate_s=0.0, weighting_s=0.0, value_gates_s=0.0, gate_s=0.0)
    else:
        calib = calibrate(bank, cands, snap.keys, old_kv, scorer, rng, progress, key_scale)
        timings["calibrate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        inject = fit_injection(bank, cands, snap.keys, old_kv, scorer, rng, calib.apply(bank), progress=progress,
                               key_scale=key_scale)
        timings["weighting_s"] = time.perf_counter() - t
        t = time.perf_counter()
        current = Injection.from_catalog(snap.catalog, g.num_layers)   # the task's own gates, else the bank's
        own = value_gates_from(snap.catalog, g.num_layers).get(task, current.gates)
        vgates = ValueGates(False, None, {"reason": "value gates off"}) if not value_gates else fit_value_gates(
            bank, cands, snap.keys, old_kv, scorer, np.random.default_rng((seed, 9)), calib.apply(bank),
            inject.tau if inject.accepted else current.tau, own, progress=progress, key_scale=key_scale)
        timings["value_gates_s"] = time.perf_counter() - t
        t = time.perf_counter()
        per_task = value_gates_from(snap.catalog, g.num_layers)
        new_gates = vgates.gates if vgates.accepted else own
        gates_of = lambda j: new_gates if j >= len(old) else per_task.get(old[j].task, current.gates)  # noqa: E731
        if not gated:
            gate = GateFit(None, {"reason": "gate off"})
        elif any(c.image for c in cands):   # an image task: the question gate (runtime/questions.py) ...
            gate = fit_questions(rt, keys, cands)
            if knows(cands):                 # ... and the margin gate too, where the bare model knows the answers
                fit = fit_gate(g, cands, snap.keys, old_kv, scorer, rng, calib.apply(bank), progress, key_scale,
                               twins=pool_twins, gates_of=gates_of, exclude=outvoted)
                gate = GateFit(fit.margin, {**fit.report, "known": True}, questions=gate.questions)
        else:
            gate = fit_gate(g, cands, snap.keys, old_kv, scorer, rng, calib.apply(bank), progress, key_scale,
                            twins=pool_twins, gates_of=gates_of, exclude=outvoted, pool_words=pool_words)
        timings["gate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    anchors = [a for tt in snap.catalog["tasks"].values() if tt["name"] != task for a in tt.get("anchors", [])]
    uses_retention = strategy not in ("random", "fifo", "all") and sel.weights_for(strategy, weights).ret > 0
    ret = (retention(rt, keys, scorer, anchors, snap.keys, old_kv, calib.apply(bank), k, progress)
           if uses_retention and anchors else np.zeros(len(old)))
    timings["retain_s"] = time.perf_counter() - t

    if valued and gate.subjects and cand_words is not None:   # served only from entries of the query's subject
        ok = same_subject(cands, cand_words)
        outvoted = contradicted(cands, ok)
    else:
        ok = None

    t = time.perf_counter()
    report(progress, "select", 0, 1)
    ent_bytes = lambda tokens: g.pages_for(tokens) * g.page_bytes
    max_id = max((e.entry_id for e in old), default=0)
    n_old = len(old)
    pool = sel.Pool(
        nbytes=np.array([ent_bytes(e.tokens) for e in old] + [ent_bytes(c.tokens) for c in cands], float),
        gain=np.array([float(stored.get(str(e.entry_id), 0.0)) for e in old] + [c.gain for c in cands]),
        retention=np.concatenate([ret, np.zeros(len(cands))]),
        keys=np.concatenate([snap.keys, np.stack([c.key for c in cands])]),
        is_new=np.array([False] * n_old + [True] * len(cands)),
        age=np.array([max_id - e.entry_id + 1 for e in old] + [0] * len(cands), float),
        task=np.array([hash(e.task) for e in old] + [hash(task)] * len(cands), np.int64),
        served=served(cands, offset=len(old), ok=ok) if valued else None,
    )
    budget = int(g.pages * g.page_bytes * (1.0 - reserve))
    smallest = min(ent_bytes(c.tokens) for c in cands)
    if smallest > budget and not g.sources:
        raise BankError(f"the bank's cap ({g.cap} bytes) is too small for even one entry of this task "
                        f"(the smallest needs {smallest} bytes); create a bank with a larger --budget")
    src_old = [i for i, e in enumerate(old) if e.kind == "source"]
    pairs = {(old[i].example_hash, old[i].task) for i in src_old}
    copies = [i for i, e in enumerate(old) if e.kind == "kv" and (e.example_hash, e.task) in pairs]   # learn/promote.py
    too_long = [i for i, c in enumerate(cands) if g.sources and tiers_.span(g, c) > g.max_tokens]

    def kv_select(blocked_new=(), max_items=g.slots, pages_taken=0):
        """Selection over kv entries: old source entries (and ``blocked_new`` candidates) take no part;
        ``pages_taken``: pages source entries need (an image's bytes), not for kv."""
        nb = pool.nbytes.copy()
        room = budget - pages_taken * g.page_bytes
        nb[src_old] = budget + 1
        nb[copies] = budget + 1     # kv copies promoted on use go: their sources stay (``ikv-learn --promote`` again)
        nb[[n_old + i for i in blocked_new]] = budget + 1
        nb[[n_old + i for i in too_long]] = budget + 1     # longer than a kv entry of this bank: source only
        nb[[n_old + i for i in known]] = budget + 1        # the bare model answers it already
        return {int(i) for i in sel.select(dataclasses.replace(pool, nbytes=nb), room, room, strategy, weights,
                                           seed, max_items=max(max_items, 0))}

    tier, new_src = None, []
    if g.sources:
        tier, chosen, new_src = _tiers(rt, bank, layout, cands, old, src_old, n_old, kv_select, key_scale, ttft_budget,
                                       k, rng, task, gate, known)
    else:
        chosen = kv_select()
    add = [i - n_old for i in sorted(chosen) if i >= n_old]
    if pool.served is not None:     # what each new entry is stored with: the queries it serves
        for i, v in sel.credit(pool.served, chosen).items():
            if i >= n_old:
                cands[i - n_old].value = v
    if tier is not None:   # old source entries kept are not in the kv selection
        chosen |= {i for i in src_old if old[i].slot not in set(tier.evict_sources)}
    evict = [old[i].slot for i in range(n_old) if i not in chosen]
    evicted_ids = {str(old[i].entry_id) for i in range(n_old) if i not in chosen}
    by_gain = sorted(add + new_src, key=lambda ci: -cands[ci].gain)  # anchors: the kept facts that help most
    picks = (by_gain + [i for i in rng.permutation(len(cands)) if i not in set(add + new_src)])[:n_anchors]
    p = Plan(task=task, keep_old=[old[i].slot for i in range(n_old) if i in chosen], evict=evict, add=add,
             candidates=cands, anchors=[cands[i].example() for i in picks],
             gains={kk: v for kk, v in stored.items() if kk not in evicted_ids}, calibration=calib, injection=inject, value_gates=vgates,
             twins={str(e): t for e, t in old_twins.items() if str(e) not in evicted_ids},
             twin_group=[int(r) for r in group] if valued else None,
             gate=gate, subject_words=cand_words if gate.subjects else None,
             subjects=subj.pack(said_tasks - {task}, {e.entry_id: said[e.entry_id] for i, e in enumerate(old)
                                                       if i in chosen and e.task in said_tasks - {task}
                                                       and e.entry_id in said}),
             subjects_own={e.entry_id: said[e.entry_id] for i, e in enumerate(old)
                           if i in chosen and e.task == task and e.entry_id in said},
             template=spec if store_spec else None, key_scales=new_scales, bank_gen=snap.gen,
             bytes_per_entry=float(np.mean([ent_bytes(c.tokens) for c in cands])), timings=timings,
             sources=new_src, source_tokens={i: tiers_.span(g, cands[i]) for i in new_src}, tiers=tier,
             compaction=compaction, outvoted=len(outvoted), answered=len(known),
             store_compaction=(compaction != Compaction.from_catalog(bank.catalog, g.scheme)
                               or (compaction.enabled and COMPACT_KEY not in (bank.catalog.get("extra") or {}))))
    for i in range(n_old):
        if i not in chosen:
            p.evicted_per_task[old[i].task] = p.evicted_per_task.get(old[i].task, 0) + 1
    timings["select_s"] = time.perf_counter() - t
    report(progress, "select", 1, 1)
    return p


def _tiers(rt, bank, layout, cands, old, src_old, n_old, kv_select, key_scale, ttft_budget, k, rng, task, gate,
           known=frozenset()):
    """For a bank with source entries: the latency costs, the share of queries gated out, the
    source share, then which new candidates are source and which entries are kv (``tiers.py``).
    Returns (TierPlan, the kv selection's pool indices, new candidates kept as source)."""
    g = bank.geo
    stored = tiers_from(bank.catalog)
    kinds = stored.get("kinds") or ("source" if g.pages * g.page_bytes < 0.2 * g.cap else "tiered")
    budget_text = ttft_budget if ttft_budget is not None else stored.get("ttft_budget")
    budget = tiers_.Budget.parse(budget_text)
    costs = tiers_.stored_costs(stored)   # as sized, or as last served (``tiers.served``, after each commit)
    costs_from = stored.get("costs_from", "learn")
    if budget is not None and (costs is None or (ttft_budget is not None and ttft_budget != stored.get("ttft_budget"))):
        costs, costs_from = tiers_.measure(rt, layout, cands, g, key_scale, k), "learn"

    raw = stored.get("closed")
    closed = {t: float(v) for t, v in raw.items() if isinstance(v, (int, float))} if isinstance(raw, dict) else {}
    # (not the leave-one-out asks its subject gate closes: a left-out fact's question names a subject no
    # kept entry has, while a served question about a stored fact names its own; counted, they priced
    # nearly every text query as gated out and let text banks keep all sources at ~2.1x, over a 1.6x budget)
    closed[task] = tiers_.closed_share(gate.margin, gate.report.get("asks", []))
    names = {tt["name"] for tt in bank.catalog["tasks"].values()} | {task}
    closed = {t: v for t, v in closed.items() if t in names}
    gated_out = tiers_.bank_closed_share(closed, names)
    share = 1.0 if kinds == "source" else tiers_.source_share(costs, budget, gated_out)
    order = [int(i) for i in rng.permutation(len(cands)) if int(i) not in known]
    old_src_slots = [old[i].slot for i in src_old]
    pass1 = set() if kinds == "source" else kv_select()   # pass 1: how many kv entries the pages hold
    n_kv, n_src = tiers_.mix(share, g.slots, len(pass1), sum(1 for i in pass1 if i < n_old), len(cands),
                             len(old_src_slots))
    new_src, evict_src = tiers_.pick_sources(order, old_src_slots, n_kv, n_src,
                                             sum(1 for i in pass1 if i < n_old), rng)
    src_pages = sum(g.source_pages(len(cands[i].source_bytes())) for i in new_src) + sum(
        old[i].pages for i in src_old if old[i].slot not in evict_src)
    free_pages = g.pages - src_pages
    while new_src and free_pages < 0:   # image sources that the pages cannot hold
        i = new_src.pop()
        src_pages -= g.source_pages(len(cands[i].source_bytes()))
        free_pages = g.pages - src_pages
    chosen = kv_select(blocked_new=new_src, max_items=n_kv, pages_taken=src_pages)  # pass 2: kv over the rest
    if 0.0 < share < 1.0:   # fewer kv than planned (the blocked candidates were the ones that fit): trim sources
        allowed = int(np.floor(share / (1.0 - share) * len(chosen) + 1e-9))
        kept_old = [s for s in old_src_slots if s not in evict_src]
        while len(new_src) + len(kept_old) > allowed:
            if new_src:
                new_src.pop()
            else:
                evict_src.append(kept_old.pop())
    max_source = 0 if share <= 0 else max(k, 1)
    tier = TierPlan(new_src, evict_src, share, str(budget) if budget else None, costs, max_source, kinds, costs_from,
                    closed, gated_out)
    return tier, chosen, new_src


def absorb(rt, bank: Bank, examples, task: str, *, dry_run: bool = False, **kw) -> Plan:
    """``plan`` then ``write`` (unless ``dry_run``): learn ``examples`` as task ``task``."""
    p = plan(rt, bank, examples, task, **kw)
    if not dry_run:
        write(bank, p)
    return p
