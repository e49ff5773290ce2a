"""Bank benchmark: bytes per entry, entries per budget, open + index time, search speed.

    python benchmarks/bank.py [--sizes 100,10000,100000] [--json]

Figures for the default model's shape (SmolLM2-135M: 30 layers, 3 kv heads, head
dim 64, 576-d keys). The open-time banks use 1-token toy payloads so that 100k
entries fit on disk; open time is dominated by records and keys, which are full size.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from inducekv.kernels import kvquant
from inducekv.memory import format as fmt
from inducekv.memory.bank import Bank, NewEntry
from inducekv.memory.index import ExactIndex, KeyIndex

MODEL = dict(num_layers=30, kv_heads=3, head_dim=64, key_dim=576)


def bytes_table() -> list[dict]:
    rows = []
    for scheme in kvquant.DENSE:
        for budget_mib in (4, 16, 64):
            g = fmt.plan(budget_mib << 20, fingerprint="x", scheme=scheme, max_tokens=128, **MODEL)
            for tokens in (32, 64, 128):
                fit = min(g.pages // g.pages_for(tokens), g.slots)
                rows.append({"scheme": scheme, "tokens": tokens, "payload_bytes": g.payload_nbytes(tokens),
                             "entry_bytes": g.entry_bytes(tokens), "fp32_bytes": 2 * 4 * 30 * 3 * 64 * tokens,
                             "budget_mib": budget_mib, "entries_fit": fit})
    return rows


def open_time(n: int, rng, tmp: Path) -> dict:
    p = tmp / f"open{n}.ikv"
    toy = dict(num_layers=1, kv_heads=1, head_dim=64, key_dim=576)
    probe = fmt.plan(1 << 30, fingerprint="x", scheme="fp16", max_tokens=1, entry_tokens=1, page_tokens=1, **toy)
    per = probe.entry_bytes(1) + 1
    cap = 2 * 4096 + 2 * probe.superblock_bytes + 2 * probe.calib_bytes + 2 * probe.catalog_bytes + per * n * 1.02 + (1 << 20)
    b = Bank.create(p, int(cap), force=True, fingerprint="x", scheme="fp16", max_tokens=1, entry_tokens=1,
                    page_tokens=1, **toy)
    kv = np.zeros((1, 1, 1, 64), np.float32)
    keys = rng.standard_normal((n, 576)).astype(np.float32)
    t = time.perf_counter()
    for lo in range(0, n, 5000):
        with b.transaction() as tx:
            for key in keys[lo:lo + 5000]:
                if tx.add(NewEntry(kv, kv, key, "t")) is None:
                    raise SystemExit(f"bank for {n} entries filled up early: fix the cap estimate")
    fill_s = time.perf_counter() - t
    b.close()
    t = time.perf_counter()
    b = Bank.open(p)
    t_open = time.perf_counter() - t
    out = {"entries": n, "fill_s": fill_s, "open_s": t_open}
    t = time.perf_counter()
    exact = ExactIndex.build(b)
    out["exact_build_s"] = time.perf_counter() - t
    ids, k = b.keys()
    near = k[rng.choice(n, 100)] + rng.standard_normal((100, 576)).astype(np.float32) * 0.5  # paraphrase-like
    rand = rng.standard_normal((100, 576)).astype(np.float32)  # worst case for HNSW
    out["exact_query_ms"] = _per_query_ms(exact, near)
    for efc in (200, 64):
        t = time.perf_counter()
        idx = KeyIndex.build(b, threads=2, ef_construction=efc)
        out[f"hnsw{efc}_build_s"] = time.perf_counter() - t
        out[f"hnsw{efc}_query_ms"] = _per_query_ms(idx, near)
        for name, qs in (("near", near), ("random", rand)):
            hits = sum(len(set(exact.search(q, 4)[0]) & set(idx.search(q, 4)[0])) for q in qs)
            out[f"hnsw{efc}_recall_{name}"] = hits / (4 * len(qs))
    b.close()
    size = p.stat().st_size
    p.unlink()
    return {**out, "file_mib": size / 2**20}


def _per_query_ms(index, queries) -> float:
    t = time.perf_counter()
    for q in queries:
        index.search(q, 4)
    return (time.perf_counter() - t) / len(queries) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,10000,100000")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    table = bytes_table()
    with tempfile.TemporaryDirectory() as d:
        opens = [open_time(int(n), rng, Path(d)) for n in args.sizes.split(",")]
    if args.json:
        print(json.dumps({"bytes": table, "open": opens}))
        return
    print("bytes per entry (default model; entry = its pages + its two slot records) and entries per budget")
    print(f"{'scheme':>6} {'tokens':>6} {'payload B':>10} {'entry B':>10} {'vs fp32':>8} {'4 MiB':>6} {'16 MiB':>7} {'64 MiB':>7}")
    for scheme in kvquant.DENSE:
        for tokens in (32, 64, 128):
            r = [x for x in table if x["scheme"] == scheme and x["tokens"] == tokens]
            fits = {x["budget_mib"]: x["entries_fit"] for x in r}
            print(f"{scheme:>6} {tokens:>6} {r[0]['payload_bytes']:>10} {r[0]['entry_bytes']:>10} "
                  f"{r[0]['entry_bytes'] / r[0]['fp32_bytes']:>7.1%} {fits[4]:>6} {fits[16]:>7} {fits[64]:>7}")
    print("\nopen (parse + read records), index build (2 threads), top-4 query; recall@4 vs exact for")
    print("queries near stored keys / random queries. hnswNNN = ef_construction NNN, M=16, ef=256")
    cols = ["open_s", "exact_build_s", "exact_query_ms", "hnsw200_build_s", "hnsw200_query_ms", "hnsw200_recall_near",
            "hnsw200_recall_random", "hnsw64_build_s", "hnsw64_query_ms", "hnsw64_recall_near", "hnsw64_recall_random"]
    print(f"{'entries':>8} " + " ".join(f"{c:>{max(len(c), 8)}}" for c in cols))
    for o in opens:
        print(f"{o['entries']:>8} " + " ".join(f"{o[c]:>{max(len(c), 8)}.3f}" for c in cols))


if __name__ == "__main__":
    main()
