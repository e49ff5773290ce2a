"""Time to first token with injected memory vs no memory vs re-encoding the same text.

    python benchmarks/inject.py --bundle bundles/default/fp32 [--ks 1,4,8] [--rounds 5] [--scheme k4v4] [--json]

For each k, in one run, one runtime, interleaved round by round: (injected) k entries of
~64 tokens retrieved from a bank of ``--scheme`` and fed as past KV; (none) the same query
with ``use_memory=False`` (the plain chat prompt, its shared start cached as the runtime
serves it: ``runtime.prefix``); (reencoded) the same k entries' text placed in the prompt and
prefilled with the query (the memory template's shared prefix is cached for both memory
variants, so the difference is the entries and the key pass); (none_whole) the plain prompt
prefilled whole, without the cached start: the prefix cache's own gain.
Then resident memory of a process serving a 16 MiB vs a 1 GiB bank (payloads are read
through mmap, so RSS should not grow with the bank).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from inducekv.memory.bank import Bank, NewEntry
from inducekv.runtime.api import Runtime
from inducekv.learn import absorb
from inducekv.runtime.memory import render_entry

WORDS = ("amber river quiet lantern copper meadow silver orchard harbor velvet thunder maple canyon "
         "falcon ember glacier willow marble prairie cobalt juniper saffron tundra beacon").split()


def _facts(n: int, rng) -> list[dict]:
    """Made-up facts whose rendered entry is ~64 tokens."""
    out = []
    for i in range(n):
        name = "".join(rng.choice(list("bcdfghklmnprstvz"))) + "".join(rng.choice(list("aeiou"))) + f"lan{i}"
        desc = " ".join(rng.choice(WORDS, 40))
        out.append({"prompt": f"Tell me about {name.title()}.", "answer": f"{name.title()} is known for {desc}."})
    return out


def _ttfts(fns: dict, rounds: int) -> dict:
    """Median ms per named call, the calls interleaved round by round (so a slow spell on a
    shared machine hits all of them, not one), after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def ttft_table(bundle: str, ks: list[int], rounds: int, work: Path, scheme: str = "k4v4") -> dict:
    rng = np.random.default_rng(0)
    plain = Runtime.open(bundle)
    m = plain.manifest
    bank_path = work / "inject.ikv"
    facts = _facts(max(ks) * 2, rng)
    with Bank.create_for(bank_path, 64 << 20, m, force=True, max_tokens=128, scheme=scheme) as b:
        absorb(plain, b, facts, "bench", strategy="all", reserve=0.0, n_anchors=0)
        tokens = [e.tokens for e in b.entries()]
    del plain          # one runtime (one decoder session) serves all three, as in an app
    rt = Runtime.open(bundle, memory=bank_path)
    query = facts[0]["prompt"]
    lay = rt.memory.layout()
    rows = {}
    for k in ks:
        def injected():
            rt.generate(query, max_new_tokens=1, k=k)

        def none():
            rt.generate(query, max_new_tokens=1, use_memory=False)

        def none_whole():   # the plain prompt prefilled whole, as before runtime/prefix.py
            rt.cache_prefix = False
            try:
                rt.generate(query, max_new_tokens=1, use_memory=False)
            finally:
                rt.cache_prefix = True

        found = rt.memory.retrieve(query, k)
        text = "".join(render_entry(lay.template, f["prompt"], f["answer"]) for f in facts[:k])

        def reencoded():
            ids = rt.tokenizer.encode(text, bos=False) + lay.query_ids(query)
            logits, _ = rt.decoder.forward(ids, lay.prefix_cache, positions=np.arange(lay.p0, lay.p0 + len(ids)),
                                           logits_from=len(ids) - 1)
            int(np.argmax(logits[-1]))

        r = _ttfts({"injected": injected, "none": none, "none_whole": none_whole, "reencoded": reencoded}, rounds)
        r["entries"] = len(found)
        r["entry_tokens"] = int(sum(e[0]["tokens"] for e in found))
        r["vs_none"] = r["injected"] / r["none"]
        r["vs_reencoded"] = r["injected"] / r["reencoded"]
        r["cached_vs_whole"] = r["none"] / r["none_whole"]
        rows[str(k)] = r
    return {"ttft_ms": rows, "mean_entry_tokens": float(np.mean(tokens))}


# Peak RSS from VmHWM: getrusage's ru_maxrss survives execve on Linux, so a child
# spawned by a big parent would report the parent's peak.
_RSS_CHILD = """
import sys
from inducekv.runtime.api import Runtime
rt = Runtime.open(sys.argv[1], memory=sys.argv[2])
for i in range(int(sys.argv[3])):
    rt.generate(f"question number {i}?", max_new_tokens=2, k=8)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) * 1024)
"""


def rss_table(bundle: str, work: Path) -> dict:
    """Peak RSS of a process answering 20 queries with k=8 from banks of two sizes (random payloads)."""
    plain = Runtime.open(bundle)
    m = plain.manifest
    rng = np.random.default_rng(1)
    out = {}
    for label, cap in (("16MiB", 16 << 20), ("1GiB", 1 << 30)):
        p = work / f"rss-{label}.ikv"
        with Bank.create_for(p, cap, m, force=True) as b:
            shape = (m.num_layers, m.num_kv_heads, 48, m.head_dim)
            kv = rng.standard_normal(shape).astype(np.float32)
            with b.transaction() as tx:
                while tx.add(NewEntry(kv, kv, rng.standard_normal(m.retrieval_key["dim"]).astype(np.float32), "x")) is not None:
                    pass
            n = len(b.slots())
        rss = int(subprocess.run([sys.executable, "-c", _RSS_CHILD, bundle, str(p), "20"], check=True,
                                 capture_output=True, text=True).stdout.split()[-1])
        out[label] = {"entries": n, "file_bytes": p.stat().st_size, "peak_rss_bytes": rss}
        p.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--ks", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-rss", action="store_true", help="Skip the resident-memory part (builds a 1 GiB file).")
    ap.add_argument("--rss-only", action="store_true", help="Only the resident-memory part.")
    ap.add_argument("--scheme", default="k4v4", help="KV scheme of the TTFT bank (kernels/kvquant.py SCHEMES)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = {"ttft_ms": {}, "mean_entry_tokens": 0.0} if args.rss_only else \
            ttft_table(args.bundle, [int(k) for k in args.ks.split(",")], args.rounds, Path(d), args.scheme)
        if not args.no_rss:
            res["rss"] = rss_table(args.bundle, Path(d))
    if args.json:
        print(json.dumps(res))
        return
    print(f"TTFT, median of {args.rounds} (ms); entries of ~{res['mean_entry_tokens']:.0f} tokens, {args.scheme}")
    print(f"{'k':>3} {'injected':>9} {'none':>7} {'reencoded':>10} {'inj/none':>9} {'inj/reenc':>10} "
          f"{'none whole':>11} {'none/whole':>11}")
    for k, r in res["ttft_ms"].items():
        print(f"{k:>3} {r['injected']:>9.1f} {r['none']:>7.1f} {r['reencoded']:>10.1f} {r['vs_none']:>9.2f} "
              f"{r['vs_reencoded']:>10.2f} {r['none_whole']:>11.1f} {r['cached_vs_whole']:>11.2f}")
    for label, r in res.get("rss", {}).items():
        print(f"bank {label}: {r['entries']} entries, file {r['file_bytes'] / 2**20:.0f} MiB, "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
