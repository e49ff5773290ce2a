"""The ``ikv-learn`` job: absorb a task into a bank under its byte cap, on the device.

Phases (each timed, each with a progress bar):

1. **encode**: every example becomes a candidate entry: its rendered text prefilled
   after the shared prefix (payload, packed with the bank's scheme), the key pass over
   its prompt (key), and its *likelihood gain*: mean log p(answer | prompt) per answer
   token with the entry in memory minus without.
2. **calibrate** (outer level): a low-rank linear map on query keys, fit so that
   held-out queries land nearest to the entries that raise their answer's likelihood
   most (gain-weighted ridge regression towards those entries' keys); kept only when
   it lowers the retrieval loss on the other half of the held-out queries.
3. **retain**: anchors of old tasks (a few examples kept in the bank per task) retrieve
   old entries; an entry's retention value is how much it raises its anchors' answers.
4. **select** (inner level, ``memory/select.py``): old entries and new candidates compete
   for the same bytes.
5. **write**: evictions, additions, anchors, gains and calibration in one atomic commit.

Swap space: a commit can only write into pages that are free before it (the old state
must survive a kill), so selection keeps live entries within ``1 - reserve`` of the
payload pages (default 0.25): the next learn always has a quarter of the bank to
write its new entries into, and evicted entries free their pages for the one after.

Likelihoods come from the ONNX decoder; no torch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from inducekv.kernels import kvquant
from inducekv.memory import select as sel
from inducekv.memory.bank import Bank, NewEntry, example_hash
from inducekv.runtime.errors import BankError, InduceKVError
from inducekv.runtime.memory import Layout, image_of, key_of, template_from
from inducekv.runtime.session import KeyEncoder

log = logging.getLogger(__name__)

GAINS_KEY = "gains"  # catalog extra: entry id -> likelihood gain measured when it was written


@dataclass
class Candidate:
    prompt: str
    answer: str
    payload: bytes       # packed with the bank's scheme
    tokens: int
    key: np.ndarray      # (K,)
    base: float = 0.0    # mean log p(answer | prompt) with no memory
    gain: float = 0.0    # ... with this entry in memory, minus base
    image: str | None = None  # the example's image file (image-bearing entries)


@dataclass
class Plan:
    task: str
    keep_old: list[int]                      # slots kept
    evict: list[int]                         # slots evicted
    add: list[int]                           # candidate indices written
    bytes_per_entry: float
    timings: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    evicted_per_task: dict = field(default_factory=dict)


class Scorer:
    """Mean log-probability of an answer's tokens after a prompt, with entries in memory."""

    def __init__(self, rt, layout: Layout):
        self.rt, self.layout = rt, layout

    def logp(self, prompt: str, answer: str, entries: list[tuple[np.ndarray, np.ndarray]], image=None) -> float:
        """``image``: the query's ``vision.ImageInput`` (image questions)."""
        cache, pos = self.layout.assemble(entries)
        q = self.layout.query_ids(prompt, image)
        a = self.rt.tokenizer.encode(answer, bos=False)
        ids = q + a
        logits, _ = self.rt.decoder.forward(ids, cache, positions=np.arange(pos, pos + len(ids)),
                                            features=image.features if image is not None else None)
        rows = logits[len(q) - 1: len(ids) - 1].astype(np.float64)               # (len(a), V)
        rows -= rows.max(axis=1, keepdims=True)
        lse = np.log(np.exp(rows).sum(axis=1))
        return float(np.mean(rows[np.arange(len(a)), a] - lse))


def _anchor_image(rt, anchor: dict):
    """An image anchor's image, None for text anchors, False when its file is gone (skipped:
    anchors keep the path of the task file's image, not its pixels)."""
    path = anchor.get("image")
    if path is None:
        return None
    if not Path(path).is_file():
        log.warning("anchor image %s is missing; that anchor is skipped", path)
        return False
    return rt.encode_image(path)


def _unpack(bank: Bank, payload: bytes, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    g = bank.geo
    return kvquant.unpack(payload, g.scheme, g.num_layers, g.kv_heads, tokens, g.head_dim)


def encode_candidates(rt, bank: Bank, layout: Layout, keys: KeyEncoder, examples, progress: bool) -> list[Candidate]:
    scorer, g, out = Scorer(rt, layout), bank.geo, []
    for ex in tqdm(examples, desc="encode", unit="ex", disable=not progress):
        prompt, answer = ex.prompt, ex.answers[0]
        image = image_of(rt, ex)
        k, v = layout.encode_entry(prompt, answer, image)
        if k.shape[2] > g.max_tokens:
            raise InduceKVError(f"example {prompt[:40]!r} renders to {k.shape[2]} tokens; this bank holds "
                                f"entries of at most {g.max_tokens}")
        payload = kvquant.pack(k, v, g.scheme)
        c = Candidate(prompt, answer, payload, k.shape[2], key_of(rt, keys, prompt, image),
                      image=str(Path(ex.image).resolve()) if getattr(ex, "image", None) else None)
        c.base = scorer.logp(prompt, answer, [], image)
        c.gain = scorer.logp(prompt, answer, [_unpack(bank, payload, c.tokens)], image) - c.base
        out.append(c)
    return out


def fit_calibration(queries: np.ndarray, targets: np.ndarray, rank: int, ridge: float = 1.0):
    """Low-rank ``M = I + U Vᵀ`` with ``M q ≈ t``: returns (a, b, U, V) in the bank's convention."""
    K = queries.shape[1]
    Q, T = queries.astype(np.float64), targets.astype(np.float64)
    scale = np.linalg.norm(Q, axis=1).mean()
    Qs, Ts = Q / scale, T / scale
    # min ||Qs Mᵀ - Ts||² + ridge ||M - I||²  ->  Mᵀ = (QsᵀQs + ridge I)⁻¹ (QsᵀTs + ridge I)
    Mt = np.linalg.solve(Qs.T @ Qs + ridge * np.eye(K), Qs.T @ Ts + ridge * np.eye(K))
    u, s, vt = np.linalg.svd(Mt.T - np.eye(K))                                   # ΔM = u s vt
    r = min(rank, K)
    # x Mᵀ = x + x ΔMᵀ = x + (x vtᵀ) (u s)ᵀ  ->  V = vtᵀ, U = u s
    return np.ones(K), np.zeros(K), (u[:, :r] * s[:r]), vt[:r].T


def retrieval_loss(queries: np.ndarray, keys: np.ndarray, target: np.ndarray, temp: float = 0.05) -> float:
    """Cross-entropy of softmax(cosine / temp) over ``keys`` against each query's target distribution."""
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    logits = (qn @ kn.T) / temp                                                 # (nq, nk)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-(target * logp).sum(axis=1).mean())


def read_examples(path, require_answer=True):
    from inducekv.runtime.tasks import iter_task

    return list(iter_task(path, require_answer=require_answer))


def task_name(path: Path, name: str | None) -> str:
    n = name or Path(path).name.split(".")[0]
    if not n:
        raise InduceKVError("cannot derive a task name from the file name; pass --name")
    return n


def open_or_create(bank_path: Path, rt, budget: int | None, scheme: str, max_tokens: int = 256) -> Bank:
    m = rt.manifest
    if bank_path.exists():
        return Bank.open(bank_path, writable=True, fingerprint=m.fingerprint)
    if budget is None:
        raise BankError(f"{bank_path} does not exist; pass --budget (e.g. 16MiB) to create it")
    return Bank.create_for(bank_path, budget, m, scheme=scheme, max_tokens=max_tokens)


def plan_and_write(rt, bank: Bank, examples, task: str, *, strategy: str = "full", weights: sel.Weights = sel.Weights(),
                   seed: int = 0, n_anchors: int = 8, k: int = 1, reserve: float = 0.25, dry_run: bool = False,
                   progress: bool = False, candidates: list[Candidate] | None = None) -> Plan:
    """Run phases 1-5 on an open, writable bank. ``candidates`` skips phase 1 (reuse an encoding)."""
    timings, rng = {}, np.random.default_rng(seed)
    if not examples:
        raise InduceKVError("the task file has no examples")
    spec = bank.catalog.get("template")
    template, policy = template_from(spec)
    layout = Layout(rt, template, policy)
    keys = KeyEncoder(rt.bundle_dir, rt.manifest, rt.profile)
    scorer = Scorer(rt, layout)
    g = bank.geo

    t = time.perf_counter()
    cands = candidates if candidates is not None else encode_candidates(rt, bank, layout, keys, examples, progress)
    timings["encode_s"] = time.perf_counter() - t

    # -- old entries: keys, bytes, stored gains ------------------------------------------------
    old_slots = [int(s) for s in bank.slots()]
    old_info = {s: bank.entry(s) for s in old_slots}
    stored = bank.catalog.get("extra", {}).get(GAINS_KEY, {})
    old_keys = bank._recs["key"][old_slots].astype(np.float32) if old_slots else np.zeros((0, g.key_dim), np.float32)

    # -- calibrate (outer level) ---------------------------------------------------------------
    t = time.perf_counter()
    calib = calibrate(bank, cands, old_slots, old_keys, scorer, rng, progress)
    timings["calibrate_s"] = time.perf_counter() - t

    # -- retention on old tasks' anchors ------------------------------------------------------
    t = time.perf_counter()
    retention = np.zeros(len(old_slots))
    anchors = [(tt["name"], a) for tt in bank.catalog["tasks"].values() for a in tt.get("anchors", [])
               if tt["name"] != task]
    uses_retention = strategy not in ("random", "fifo") and sel.weights_for(strategy, weights).ret > 0
    if old_slots and anchors and uses_retention:   # random/fifo/likelihood/no-anchors ignore it: skip the passes
        amap = calib["apply"]
        for _, a in tqdm(anchors, desc="retain", unit="anchor", disable=not progress):
            image = _anchor_image(rt, a)
            if image is False:
                continue
            q = amap(key_of(rt, keys, a["prompt"], image))
            sims = _cos(q, old_keys)
            base = scorer.logp(a["prompt"], a["answer"], [], image)
            for j in np.argsort(-sims)[:k]:
                payload = bank.read_payload(old_slots[j])
                if payload is None:
                    continue
                gain = scorer.logp(a["prompt"], a["answer"], [_unpack(bank, payload[0], payload[1].tokens)], image) - base
                retention[j] += max(gain, 0.0)
    timings["retain_s"] = time.perf_counter() - t

    # -- select (inner level) -------------------------------------------------------------------
    t = time.perf_counter()
    n_old = len(old_slots)
    ent_bytes = lambda tokens: g.pages_for(tokens) * g.page_bytes
    max_id = max((old_info[s].entry_id for s in old_slots), default=0)
    pool = sel.Pool(
        nbytes=np.array([ent_bytes(old_info[s].tokens) for s in old_slots] + [ent_bytes(c.tokens) for c in cands], float),
        gain=np.array([float(stored.get(str(old_info[s].entry_id), 0.0)) for s in old_slots] + [c.gain for c in cands]),
        retention=np.concatenate([retention, np.zeros(len(cands))]),
        keys=np.concatenate([old_keys, np.stack([c.key for c in cands])]),
        is_new=np.array([False] * n_old + [True] * len(cands)),
        age=np.array([max_id - old_info[s].entry_id + 1 for s in old_slots] + [0] * len(cands), float),
        task=np.array([hash(old_info[s].task) for s in old_slots] + [hash(task)] * len(cands), np.int64),
    )
    usage = bank.usage()
    budget = int(g.pages * g.page_bytes * (1.0 - reserve))
    smallest = min(ent_bytes(c.tokens) for c in cands)
    if smallest > budget:
        raise BankError(f"the bank's cap ({g.cap} bytes) is too small for even one entry of this task "
                        f"(the smallest needs {smallest} bytes); create a bank with a larger --budget")
    chosen = sel.select(pool, budget, usage["bytes_free"], strategy, weights, seed)
    chosen = chosen[: g.slots]
    keep = {int(i) for i in chosen}
    plan = Plan(task, [old_slots[i] for i in range(n_old) if i in keep], [old_slots[i] for i in range(n_old) if i not in keep],
                [int(i) - n_old for i in chosen if i >= n_old], float(np.mean([ent_bytes(c.tokens) for c in cands])),
                timings, {kk: v for kk, v in calib.items() if kk != "apply" and kk != "arrays"})
    for s in plan.evict:
        plan.evicted_per_task[old_info[s].task] = plan.evicted_per_task.get(old_info[s].task, 0) + 1
    timings["select_s"] = time.perf_counter() - t
    if dry_run:
        return plan

    # -- write: one atomic commit ---------------------------------------------------------------
    t = time.perf_counter()
    gains = {kk: v for kk, v in stored.items()}
    evicted_ids = {str(old_info[s].entry_id) for s in plan.evict}
    gains = {kk: v for kk, v in gains.items() if kk not in evicted_ids}
    added = sorted(plan.add, key=lambda ci: -cands[ci].gain)  # anchors: the kept facts that help most
    picks = (added + [i for i in rng.permutation(len(cands)) if i not in set(added)])[:n_anchors]
    with bank.transaction() as tx:
        if spec is None:
            tx.set_template(_spec(template, policy))
        for s in plan.evict:
            tx.remove(s)
        first_id = tx._next_id
        for n, ci in enumerate(plan.add):
            c = cands[ci]
            h = example_hash({"prompt": c.prompt, "answer": c.answer, **({"image": c.image} if c.image else {})})
            slot = tx.add(NewEntry(None, None, c.key, task, h, payload=c.payload, tokens=c.tokens))
            if slot is None:
                raise BankError("the selected entries did not fit; this is a bug in the byte accounting")
            gains[str(first_id + n)] = round(c.gain, 4)
        tx.set_anchors(task, [{"prompt": cands[i].prompt, "answer": cands[i].answer,
                               **({"image": cands[i].image} if cands[i].image else {})} for i in picks])
        tx.set_extra(GAINS_KEY, gains)
        if calib.get("accepted"):
            tx.set_calibration(*calib["arrays"])
    timings["write_s"] = time.perf_counter() - t
    return plan


def _spec(template, policy) -> dict:
    from dataclasses import asdict

    return {"template": asdict(template), "policy": policy}


def _cos(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return (keys @ q) / (np.linalg.norm(keys, axis=1) * np.linalg.norm(q) + 1e-12)


def calibrate(bank: Bank, cands: list[Candidate], old_slots, old_keys, scorer: Scorer, rng, progress: bool,
              n_queries: int = 16, neighbours: int = 3) -> dict:
    """Fit the calibration on held-out candidate prompts; keep it only if held-out loss drops."""
    apply = bank.calibrate
    pool_keys = np.concatenate([old_keys, np.stack([c.key for c in cands])]) if cands else old_keys
    if len(cands) < 4 or len(pool_keys) < 3:
        return {"accepted": False, "reason": "too few examples", "apply": apply}
    idx = rng.permutation(len(cands))[:n_queries]
    qs, targets = [], []
    for i in tqdm(idx, desc="calibrate", unit="query", disable=not progress):
        c = cands[i]
        q = apply(c.key)
        near = list(np.argsort(-_cos(q, pool_keys))[:neighbours])
        own = len(old_keys) + int(i)
        if own not in near:
            near.append(own)
        base = c.base
        image = scorer.rt.encode_image(c.image) if c.image else None
        gains = []
        for j in near:
            if j >= len(old_keys):
                cj = cands[j - len(old_keys)]
                kv = _unpack(bank, cj.payload, cj.tokens)
            else:
                got = bank.read_payload(old_slots[j])
                kv = _unpack(bank, got[0], got[1].tokens)
            gains.append(scorer.logp(c.prompt, c.answer, [kv], image) - base)
        w = np.zeros(len(pool_keys))
        e = np.exp((np.array(gains) - max(gains)) / 0.25)
        w[near] = e / e.sum()
        qs.append(c.key)
        targets.append(w)
    Q, W = np.stack(qs), np.stack(targets)
    half = len(Q) // 2
    fit_q, fit_w, val_q, val_w = Q[:half], W[:half], Q[half:], W[half:]
    before = retrieval_loss(np.stack([apply(q) for q in val_q]), pool_keys, val_w)
    a, b, U, V = fit_calibration(fit_q, fit_w @ pool_keys, bank.geo.calib_rank)
    mapped = lambda x: (a * x + b + (x @ V) @ U.T).astype(np.float32)
    after = retrieval_loss(mapped(val_q), pool_keys, val_w)
    accepted = after < before
    out = {"accepted": bool(accepted), "loss_before": before, "loss_after": after, "apply": mapped if accepted else apply}
    if accepted:
        out["arrays"] = (a, b, U, V)
    return out
