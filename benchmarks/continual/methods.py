"""The methods the continual benchmark compares, behind one small interface.

    m.learn(task, examples, candidates)   absorb one task (candidates: encoded once, shared)
    m.answer(example) -> (text, ttft_ms)  answer one test question

- ``ZeroShot``: the frozen model, no memory.
- ``BankMethod``: an inducekv bank under the cap, filled by ``ikv-learn``'s selection with a
  strategy: ``full`` (InduceKV), ``random``, ``fifo``; ``unbounded`` is a bank large enough
  for every entry, fp16 KV (upper bound).
- ``lora.SequentialLoRA``: one LoRA adapter (torch + peft) trained task after task, rank
  chosen so its fp16 bytes fit the cap; answers a task's questions in one batch
  (``answer_all``); TTFT is the zero-shot model's (a merged adapter costs nothing).
- ``PromptRetrieval``: the raw examples (prompt, answer, image file bytes, fp16 key) kept
  under the same cap by reservoir sampling, retrieved with the same keys, and re-encoded
  at query time: the retrieved example is rendered with the same template into the
  prompt and prefilled with the query. More examples per byte, more prefill per query.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from inducekv.kernels import kvquant
from inducekv import learn as L
from inducekv.learn.compact import Compaction, compactor_for, new_bank_scheme, supports_perlayer
from inducekv.learn.value import neighbour_gains, value_scorer
from inducekv.learn.defaults import COMPACT_KEEP, RESERVE
from inducekv.learn.plan import bank_layout
from inducekv.learn.select import DEFAULT_STRATEGY
from inducekv.memory.bank import Bank
from inducekv.runtime.api import Prepared, Result, Runtime
from inducekv.runtime.memory import Layout, image_of, key_of, template_from
from inducekv.runtime.session import KeyEncoder

MAX_NEW = 8
N_ANCHORS = 8   # anchors kept per task (ikv-learn's default); run.py lowers it for --quick


def _image(ex):
    return str(ex.image) if getattr(ex, "image", None) is not None else None


_RUNTIMES: dict = {}


def runtime(bundle: str) -> Runtime:
    """One Runtime per bundle, shared by every method (sessions load once); a bank method
    passes its memory with each answer."""
    if bundle not in _RUNTIMES:
        _RUNTIMES[bundle] = Runtime.open(bundle)
    return _RUNTIMES[bundle]


class ZeroShot:
    name = "zero-shot"

    def __init__(self, bundle: str):
        self.rt = runtime(bundle)
        self.seen: dict = {}   # the model never changes: each question is answered (and timed) once

    def learn(self, task, examples, candidates):
        pass

    def answer(self, ex):
        key = (ex.prompt, _image(ex))
        if key not in self.seen:
            r = self.rt.generate(ex.prompt, image=_image(ex), max_new_tokens=MAX_NEW, stop=["\n"], use_memory=False)
            self.seen[key] = (r.text, r.timings.ttft_ms)
        return self.seen[key]

    def ttft(self, ex) -> float:
        return self.answer(ex)[1]


def gate_note(fit) -> str:
    """One line for the run log: the task's fitted gates (``learn/gate.py``)."""
    r, parts = fit.report, [f"margin {fit.margin}"]
    if "subject" in r:
        sj = r["subject"]
        parts.append(f"subject {'on' if sj['on'] else 'off'} (helped {sj['other_subject_helped']}"
                     f" of {sj['other_subject']} other-subject asks)")
    return "gate: " + ", ".join(parts)


class BankMethod:
    def __init__(self, name: str, bundle: str, path: Path, cap: int, strategy: str, scheme: str | None = None,
                 reserve: float = RESERVE, seed: int = 0, gated: bool = True, value_gates: bool = True,
                 subjects: bool = True, known_out: bool = True):
        self.name, self.bundle, self.path, self.strategy, self.reserve, self.seed = name, bundle, path, strategy, reserve, seed
        self.known_out = known_out
        self.gated, self.value_gates, self.subjects = gated, value_gates, subjects
        self.rt = runtime(bundle)
        if scheme is None:   # ikv-learn's default: the profile's bits, per-layer compacted where the bundle can
            scheme = new_bank_scheme(self.rt, kvquant.scheme_for_bits(self.rt.profile.kv_bits), None)
        Bank.create_for(path, cap, self.rt.manifest, scheme=scheme, force=True, max_tokens=192,
                        **bank_layout(scheme)).close()
        self.memory = None
        self.served = []   # tiered banks with a latency budget: the serve check after each learn

    def absorb(self, bank, task, examples, candidates, dry_run: bool = False):
        """``learn.plan.absorb`` with the shared candidates, repacked for ``bank``."""
        g = bank.geo
        candidates = candidates[CAND_SCHEME[g.scheme in kvquant.SPARSE]]
        if g.scheme in kvquant.SHARED_KEY_SCALE and bank.key_scales() is None:  # as ikv-learn fits them
            sample = [kvquant.unpack(c.payload, candidates_scheme(c), g.num_layers, g.kv_heads, c.tokens,
                                     g.head_dim)[0] for c in candidates[:16]]
            with bank.transaction() as tx:
                tx.set_key_scales(kvquant.fit_key_scale(sample, g.scheme))
        candidates = repack(candidates, g, bank.key_scales())
        return L.absorb(self.rt, bank, examples, task, strategy=self.strategy, seed=self.seed, reserve=self.reserve,
                        candidates=candidates, n_anchors=N_ANCHORS, gated=self.gated, value_gates=self.value_gates,
                        subjects=getattr(self, "subjects", True), known_out=getattr(self, "known_out", True),
                        dry_run=dry_run)

    def learn(self, task, examples, candidates):
        if self.memory is not None:
            self.memory.close()
        with Bank.open(self.path, writable=True) as bank:
            p = self.absorb(bank, task, examples, candidates)
            self.gate_note = gate_note(p.gate)
            if p.tiers is not None and p.tiers.budget is not None:   # as ikv-learn: time the bank as served, refit
                from inducekv.learn.tiers import serve_check

                self.served.append(serve_check(self.rt, bank, p.tiers, examples, self.seed)["served"])
        self.memory = self.rt.open_memory(self.path)

    def answer(self, ex):
        r = self.rt.generate(ex.prompt, image=_image(ex), max_new_tokens=MAX_NEW, k=1, stop=["\n"], memory=self.memory)
        return r.text, r.timings.ttft_ms

    def entries(self) -> dict:
        with Bank.open(self.path) as b:
            return b.tasks()


class TieredMethod(BankMethod):
    """A bank with source entries (issue 19): ``source`` (every example as its own bytes,
    re-encoded when retrieved) or ``tiered`` (kv and source mixed to keep a mean-TTFT budget),
    created at the first task as ``ikv-learn --kinds`` creates it (slots sized for the mix)."""

    def __init__(self, name: str, bundle: str, path: Path, cap: int, kinds: str, ttft_budget: str | None = None,
                 seed: int = 0, gated: bool = True):
        self.name, self.bundle, self.path, self.strategy, self.reserve, self.seed = name, bundle, path, DEFAULT_STRATEGY, RESERVE, seed
        self.gated, self.kinds, self.ttft_budget, self.cap, self.value_gates = gated, kinds, ttft_budget, cap, True
        self.rt = runtime(bundle)
        self.memory, self.sizing, self.served = None, None, []

    def learn(self, task, examples, candidates):
        if self.sizing is None:
            from inducekv.learn.plan import create_bank
            from inducekv.learn.tiers import new_bank_share

            scheme = new_bank_scheme(self.rt, kvquant.scheme_for_bits(self.rt.profile.kv_bits), None)
            share, self.sizing = new_bank_share(self.rt, examples, scheme, self.rt.profile.keep, self.ttft_budget,
                                                self.cap, 1, self.kinds)
            create_bank(self.path, self.cap, self.rt.manifest, scheme, 192, self.kinds, share, force=True,
                        sizing=self.sizing).close()
            if self.ttft_budget is not None:   # as ikv-learn: resplit for the gated-out queries the first plan prices
                from inducekv.learn.tiers import resplit

                with Bank.open(self.path, writable=True) as bank:
                    first = self.absorb(bank, task, examples, candidates, dry_run=True)
                split = resplit(self.sizing, first.tiers.share) if first.tiers is not None else None
                if split is not None:
                    share, self.sizing = split
                    create_bank(self.path, self.cap, self.rt.manifest, scheme, 192, self.kinds, share, force=True,
                                sizing=self.sizing).close()
        super().learn(task, examples, candidates)

    def entries(self) -> dict:
        with Bank.open(self.path) as b:
            u = b.usage()
            return {**b.tasks(), "kv/source": f"{u['kv_entries']}/{u['source_entries']}"}


class PromptRetrieval:
    """Raw examples under the cap; retrieved by the same frozen keys; re-encoded per query."""

    name = "prompt-retrieval"

    def __init__(self, bundle: str, cap: int, seed: int = 0):
        self.rt = runtime(bundle)
        self.cap, self.rng = cap, np.random.default_rng(seed)
        self.keys = KeyEncoder(self.rt.bundle_dir, self.rt.manifest, self.rt.profile)
        self.layout = Layout(self.rt, *template_from(None))
        self.items: list[dict] = []
        self.seen = 0

    @staticmethod
    def nbytes(item) -> int:
        img = Path(item["image"]).stat().st_size if item["image"] else 0
        return item["key"].nbytes + len(item["prompt"].encode()) + len(item["answer"].encode()) + img + 16

    def learn(self, task, examples, candidates):
        for ex, c in zip(examples, candidates["fp16"]):
            item = {"prompt": ex.prompt, "answer": ex.answers[0], "image": _image(ex), "task": task,
                    "key": c.key.astype(np.float16)}
            self.seen += 1
            self.items.append(item)
            while sum(self.nbytes(i) for i in self.items) > self.cap:   # reservoir: evict uniformly at random
                self.items.pop(int(self.rng.integers(len(self.items))))

    def entries(self) -> dict:
        out: dict = {}
        for i in self.items:
            out[i["task"]] = out.get(i["task"], 0) + 1
        return out

    def answer(self, ex):
        rt, lay = self.rt, self.layout
        t0 = time.perf_counter()
        q_img = image_of(rt, ex)
        features = [q_img.features] if q_img is not None else []
        entry_ids = []
        if self.items:
            q = key_of(rt, self.keys, ex.prompt, q_img)
            keys = np.stack([i["key"] for i in self.items]).astype(np.float32)
            sims = keys @ q / (np.linalg.norm(keys, axis=1) * np.linalg.norm(q) + 1e-12)
            best = self.items[int(np.argmax(sims))]
            e_img = rt.encode_image(best["image"]) if best["image"] else None
            entry_ids = lay.entry_ids(best["prompt"], best["answer"], e_img)
            if e_img is not None:
                features.insert(0, e_img.features)
        ids = entry_ids + lay.query_ids(ex.prompt, q_img)
        feats = np.concatenate(features) if features else None
        res = Result("", [], "length")
        for _ in rt.decode(Prepared(ids, lay.prefix_cache, lay.p0, feats), max_new_tokens=MAX_NEW, stop=["\n"],
                           result=res, started=t0):
            pass
        return res.text, res.timings.ttft_ms


CAND_SCHEME = {False: "fp16", True: "f16s"}   # candidates for dense banks / per-layer compacted (sparse) banks


def candidates_scheme(c) -> str:
    return "f16s" if getattr(c, "sparse", False) else "fp16"


def repack(cands: list, geo, key_scale=None) -> list:
    """fp16 / f16s candidates re-packed for a bank's KV scheme (gains and keys unchanged; a
    sparse bank takes the f16s candidates' slot maps with them)."""
    if geo.scheme in ("fp16", "f16s"):
        return cands
    out = []
    for c in cands:
        src = candidates_scheme(c)
        k, v = kvquant.unpack(c.payload, src, geo.num_layers, geo.kv_heads, c.tokens, geo.head_dim)
        extra = {}
        if src == "f16s":
            slots, bias, span = kvquant.slot_map(c.payload, src, geo.num_layers, geo.kv_heads, c.tokens, geo.head_dim)
            extra = {"slots": slots, "slot_bias": bias, "span": span}
        out.append(dataclasses.replace(c, payload=kvquant.pack(k, v, geo.scheme, key_scale, **extra)))
    return out


def encode(bundle: str, work: Path, examples_by_task: dict) -> dict:
    """Candidates (fp16 payload, key, gains, neighbour gains) for every task, encoded once and shared by methods:
    ``{task: {"fp16": full entries, "f16s": per-layer compacted (when the bundle can)}}``."""
    rt = runtime(bundle)
    out = {task: {} for task in examples_by_task}
    layout = Layout(rt, *template_from(None))
    keys = KeyEncoder(rt.bundle_dir, rt.manifest, rt.profile)
    for scheme in ("fp16", "f16s") if supports_perlayer(rt) else ("fp16",):
        probe = work / f"probe-{scheme}.ikv"
        with Bank.create_for(probe, 16 << 20, rt.manifest, scheme=scheme, force=True, max_tokens=192) as b:
            comp = compactor_for(rt, layout, Compaction("perlayer", None, COMPACT_KEEP)) if scheme == "f16s" else None
            for task, examples in examples_by_task.items():
                cands = L.encode_candidates(rt, b.geo, layout, keys, examples, progress=False, compactor=comp)
                neighbour_gains(b.geo, cands, value_scorer(rt, layout, cands))   # held-out value, once (learn/value.py)
                for c in cands:
                    c.sparse = scheme == "f16s"
                out[task][scheme] = cands
        probe.unlink()
    for task in out:
        out[task].setdefault("f16s", out[task]["fp16"])
    return out
