"""Entry compaction on dev questions: bytes per entry vs accuracy, oracle entry, k=1.

    python benchmarks/compact.py --bundle bundles/default/fp32 [--n 40] [--seed 0]
        [--conds fp32,int8,k4v4,perlayer:0.5,perlayer:0.4,nobias:0.5,uniform:0.5,shared:0.5,random:0.5,nnls:0.5]
    python benchmarks/compact.py --write-dev examples/tasks/dev --seed 1 --n 60   # the committed dev files

Dev questions: for each fact of a train file, its subject asked with a template of this
file (``DEV_TEMPLATES``), which neither the train nor the test files use. Nothing here
reads a test file. The oracle entry is the fact's own train entry, encoded after the
shared prefix, quantized (``k4v4`` codes unless the condition says otherwise), then
compacted by the condition:

- ``perlayer:F``: ``learn.perlayer`` (the product's method: per-layer choice + mass bias);
- ``nobias:F``: the same slots without the bias; ``nnls:F``: per-slot log-biases fitted by
  NNLS so the kept slots reproduce the window rows' unnormalised attention mass;
- ``uniform:F``: one token set for every layer (importance summed over layers), no bias;
- ``shared:F``: the budget F*T*L shared across layers by normalised importance, mass bias;
- ``random:F``: random tokens per layer (answer kept), no bias.
Masked tokens get ``kvquant.MASKED`` through the decoder's ``attention_bias``.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from inducekv.kernels import kvquant
from inducekv.learn.compact import Probe, answer_span
from inducekv.learn.perlayer import choose, entry_logits, window_rows
from inducekv.runtime.api import Prepared, Result, Runtime
from inducekv.runtime.memory import Layout, template_from
from inducekv.runtime.scoring import score

TASKS = Path(__file__).resolve().parent.parent / "examples" / "tasks"
TRAIN_TEMPLATES = {   # the train files' phrasings (examples/make_tasks.py), to find each fact's subject
    "capitals": ["What is the capital of {x}?", "Name the capital city of {x}.", "What city is the capital of {x}?"],
    "colours": ["What colour is the {x}?", "What is the colour of a {x}?", "Name the colour of the {x}."],
}
DEV_TEMPLATES = {
    "capitals": ["Tell me the capital city of {x}.", "The capital of {x} is called what?",
                 "In {x}, which city serves as the capital?"],
    "colours": ["Tell me the colour of the {x}.", "What colour would a {x} be?", "The {x} has which colour?"],
}


def dev_facts(task: str, n: int, seed: int) -> list[dict]:
    """``n`` train facts of ``task`` (seeded shuffle), each with a dev-phrased question."""
    rng = random.Random(f"{task}-dev-{seed}")
    out = []
    for line in (TASKS / f"{task}.train.jsonl").read_text().splitlines():
        ex = json.loads(line)
        for t in TRAIN_TEMPLATES[task]:
            m = re.match("^" + re.escape(t).replace(re.escape("{x}"), "(.+)") + "$", ex["prompt"])
            if m:
                out.append({"prompt": rng.choice(DEV_TEMPLATES[task]).format(x=m.group(1)), "answer": ex["answer"],
                            "train_prompt": ex["prompt"]})
                break
    rng.shuffle(out)
    return out[:n]


class Bench:
    def __init__(self, bundle: str):
        self.rt = Runtime.open(bundle)
        self.lay = Layout(self.rt, *template_from(None))
        self.probe = Probe(self.rt, "perlayer")
        m = self.rt.manifest
        self.L, self.H, self.D = m.num_layers, m.num_kv_heads, m.head_dim

    def encode(self, f: dict) -> dict:
        lay, p0 = self.lay, self.lay.p0
        ids = lay.entry_ids(f["train_prompt"], f["answer"])
        q, K, V = self.probe.run(ids, lay.prefix_cache, np.arange(p0, p0 + len(ids)))
        span = answer_span(self.rt, lay, f["train_prompt"], f["answer"])
        logits = entry_logits(q, K, window_rows(len(ids), span), p0, self.rt.manifest.score_scale)   # (L, H, R, p0 + T)
        return {"k": K[:, :, p0:], "v": V[:, :, p0:], "span": span, "logits": logits}

    def answer(self, question: str, k, v, bias=None) -> str:
        cache, pos = self.lay.assemble([(k, v)])
        b = None if bias is None else np.concatenate([np.zeros((self.L, self.lay.p0), np.float32), bias], axis=1)
        res = Result("", [], "length")
        list(self.rt.decode(Prepared(self.lay.query_ids(question), cache, pos, bias=b), max_new_tokens=12,
                            stop=["\n"], result=res))
        return res.text


def mask_and_bias(e: dict, kind: str, keep: float, p0: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(L, T) kept mask and (L, T) bias on kept tokens for one condition."""
    logits, (a0, a1) = e["logits"], e["span"]
    L, T = logits.shape[0], logits.shape[-1] - p0
    c = min(T, max(math.ceil(keep * T), a1 - a0, 1))
    slots, mass_bias = choose(logits, p0, e["span"], keep)
    kept = np.zeros((L, T), bool)
    kept[np.arange(L)[:, None], slots] = True
    bias = np.zeros((L, T), np.float32)
    ent = logits[..., p0:]
    ex = np.exp(ent - ent.max(axis=-1, keepdims=True))                               # (L, H, R, T)
    if kind == "perlayer":
        bias[:] = mass_bias[:, None]
    elif kind == "nnls":
        for l in range(L):
            A = ex[l].reshape(-1, T)
            full = A.sum(1)
            w, _ = nnls(A[:, kept[l]] / full[:, None], np.ones(len(full)))
            bias[l, kept[l]] = np.log(np.maximum(w, 1e-4))
    elif kind in ("uniform", "shared", "random"):
        p = np.exp(logits - logits.max(-1, keepdims=True))
        imp = (p / p.sum(-1, keepdims=True))[..., p0:].sum(axis=(1, 2))              # (L, T)
        kept[:] = False
        kept[:, a0:a1] = True
        if kind == "uniform":
            order = [t for t in np.argsort(-imp.sum(0)) if not a0 <= t < a1]
            kept[:, order[:c - (a1 - a0)]] = True
        elif kind == "random":
            for l in range(L):
                order = [t for t in rng.permutation(T) if not a0 <= t < a1]
                kept[l, order[:c - (a1 - a0)]] = True
        else:
            s = np.where(kept, -np.inf, imp / imp.sum(1, keepdims=True)).ravel()
            kept.ravel()[np.argsort(-s)[:max(round(keep * T * L) - int(kept.sum()), 0)]] = True
            m = ex.sum(axis=(1, 2))
            bias[:] = np.log(m.sum(1) / np.where(kept, m, 0).sum(1))[:, None]
    return kept, bias


def run(bundle: str, n: int, seed: int, conds: list[str]) -> dict:
    b = Bench(bundle)
    facts = dev_facts("capitals", n, seed) + dev_facts("colours", n, seed)
    encs = [b.encode(f) for f in facts]
    ks = kvquant.fit_key_scale([e["k"] for e in encs[:16]], "k4v4")
    per_lt = kvquant.payload_nbytes("k4v4", 1, b.H, 1, b.D)                         # one token of one layer
    rng, out = np.random.default_rng(seed), {}
    for cond in conds:
        t0, hits, nbytes = time.perf_counter(), 0, 0
        for f, e in zip(facts, encs):
            L, H, T, D = e["k"].shape
            bias = None
            if cond == "fp32":
                k, v, nb = e["k"], e["v"], 2 * L * H * T * D * 4
            elif cond in ("int8", "k4v4"):
                args = (ks,) if cond == "k4v4" else ()
                k, v = kvquant.unpack(kvquant.pack(e["k"], e["v"], cond, *args), cond, L, H, T, D, *args)
                nb = kvquant.payload_nbytes(cond, L, H, T, D)
            else:
                kind, keep = cond.split(":")
                k, v = kvquant.unpack(kvquant.pack(e["k"], e["v"], "k4v4", ks), "k4v4", L, H, T, D, ks)
                kept, b_kept = mask_and_bias(e, kind, float(keep), b.lay.p0, rng)
                bias = np.where(kept, b_kept, kvquant.MASKED).astype(np.float32)
                nb = int(kept.sum()) * per_lt + L * (T + 7) // 8
            hits += score(b.answer(f["prompt"], k, v, bias), [f["answer"]])[0]
            nbytes += nb
        out[cond] = {"accuracy": hits / len(facts), "payload_bytes": nbytes / len(facts), "n": len(facts),
                     "seconds": time.perf_counter() - t0}
        print(f"{cond:14s} accuracy {hits / len(facts):.3f}  payload {nbytes / len(facts):>9,.0f} B  n={len(facts)}",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/default/fp32")
    ap.add_argument("--n", type=int, default=40, help="dev questions per task (capitals, colours)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conds", default="fp32,int8,k4v4,perlayer:0.5,perlayer:0.4,nobias:0.5,uniform:0.5,shared:0.5,"
                                       "random:0.5,nnls:0.5")
    ap.add_argument("--write-dev", type=Path, default=None, help="write DIR/{task}.dev.jsonl and exit")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.write_dev is not None:
        a.write_dev.mkdir(parents=True, exist_ok=True)
        for task in DEV_TEMPLATES:
            (a.write_dev / f"{task}.dev.jsonl").write_text(
                "".join(json.dumps(f) + "\n" for f in dev_facts(task, a.n, a.seed)))
        return
    res = run(a.bundle, a.n, a.seed, [c for c in a.conds.split(",") if c])
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
