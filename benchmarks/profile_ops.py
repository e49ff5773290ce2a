"""Where a bundle's prefill and decode steps spend their time, per op type (onnxruntime's profiler).

    python benchmarks/profile_ops.py --bundle bundles/default/fp32 [--threads 2] [--runs 5] [--past N] [--json]

Opens the decoder as the runtime does (the ``cpu`` device profile, ``--threads`` intra-op
threads) with ``SessionOptions.enable_profiling``, runs the chat prompt of
``benchmarks/decode.py`` (42 tokens with the default model) as a prefill ``--runs`` times after
one untimed run, then as many single-token decode steps after it, and sums the profiler's
per-node kernel times by op type. ``--past N`` puts N random past KV slots before the prompt
(as injected memory entries would). Times are per pass, in ms; "share" is of the summed kernel
time (the rest of a pass's wall time is onnxruntime's own overhead between nodes).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inducekv.core import contract
from inducekv.runtime import Runtime
from inducekv.runtime.session import KVCache, _OPT

PROMPT = "Write a long story about a brave knight and a dragon."   # the prompt of benchmarks/decode.py


def _feed(rt: Runtime, ids: list[int], cache: KVCache, pos: int) -> dict:
    T, P, L = len(ids), cache.length, rt.manifest.num_layers
    feed = {contract.INPUT_IDS: np.asarray([ids], np.int64),                          # (1, T)
            contract.ATTENTION_MASK: np.ones((1, P + T), np.int64),                   # (1, P+T)
            contract.POSITION_IDS: np.arange(pos, pos + T, dtype=np.int64)[None]}    # (1, T)
    for i in range(L):
        feed[contract.past_key(i)], feed[contract.past_value(i)] = cache.keys[i], cache.values[i]
    if rt.decoder.has_bias:
        feed[contract.ATTENTION_BIAS] = np.zeros((1, L, P + T), np.float32)           # (1, L, P+T)
    return feed


def profile(bundle: Path, threads: int, runs: int, past: int = 0) -> dict:
    rt = Runtime.open(bundle)
    ids = rt.encode_prompt(PROMPT)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = _OPT[rt.profile.graph_optimization]
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="ikv-prof-"), "decoder")
    sess = ort.InferenceSession(str(bundle / contract.DECODER_FILE), so, providers=["CPUExecutionProvider"])
    names = rt.decoder.out_names
    m, g = rt.manifest, np.random.default_rng(0)
    shape = (1, m.num_kv_heads, past, m.head_dim)                                     # (1, H_kv, past, D)
    empty = KVCache([g.standard_normal(shape, np.float32) for _ in range(m.num_layers)],
                    [g.standard_normal(shape, np.float32) for _ in range(m.num_layers)])
    out = sess.run(names, _feed(rt, ids, empty, past))                # untimed first run
    cache = KVCache(out[1::2], out[2::2])
    marks, walls = [], {"prefill": [], "decode": []}
    for _ in range(runs):
        marks.append(("prefill", time.perf_counter()))
        sess.run(names, _feed(rt, ids, empty, past))
        walls["prefill"].append(time.perf_counter() - marks[-1][1])
    tok = int(np.argmax(out[0][0, -1]))
    for n in range(runs):
        feed = _feed(rt, [tok], cache, past + len(ids) + n)
        t = time.perf_counter()
        out = sess.run(names, feed)
        walls["decode"].append(time.perf_counter() - t)
        cache, tok = KVCache(out[1::2], out[2::2]), int(np.argmax(out[0][0, -1]))
    trace = json.loads(Path(sess.end_profiling()).read_text())
    runs_seen = [e for e in trace if e.get("name") == "model_run"]
    # model_run events in order: the untimed run, `runs` prefills, `runs` decode steps
    phases = ["warmup"] + ["prefill"] * runs + ["decode"] * runs
    spans = [(e["ts"], e["ts"] + e["dur"], phases[n]) for n, e in enumerate(runs_seen)]
    per = {"prefill": collections.Counter(), "decode": collections.Counter()}
    count = {"prefill": collections.Counter(), "decode": collections.Counter()}
    by_node = {"prefill": collections.Counter(), "decode": collections.Counter()}
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        phase = next((p for a, b, p in spans if a <= e["ts"] <= b), None)
        if phase in per:
            op = e["args"]["op_name"]
            per[phase][op] += e["dur"] / 1e3 / runs                     # ms per pass
            count[phase][op] += 1 / runs
            node = re.sub(r"^l\d+/", "l*/", e["name"][: -len("_kernel_time")])   # all layers together
            by_node[phase][f"{op} {node}"] += e["dur"] / 1e3 / runs
    res = {"bundle": str(bundle), "prompt_tokens": len(ids), "past": past, "threads": threads, "runs": runs,
           "onnxruntime": ort.__version__, "loadavg": os.getloadavg()}
    for phase in per:
        total = sum(per[phase].values())
        res[phase] = {"wall_ms": 1e3 * float(np.median(walls[phase])), "kernel_ms": total,
                      "ops": [{"op": op, "ms": ms, "share": ms / total, "nodes": round(count[phase][op])}
                              for op, ms in per[phase].most_common()],
                      "top_nodes": [{"node": n, "ms": ms} for n, ms in by_node[phase].most_common(8)]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--past", type=int, default=0, help="Random past KV slots before the prompt.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads < 1 or args.runs < 1 or args.past < 0:
        ap.error("--threads and --runs must be >= 1, --past >= 0")
    res = profile(Path(args.bundle), args.threads, args.runs, args.past)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{res['bundle']}: {res['prompt_tokens']}-token prompt after {res['past']} past slots, {res['threads']} threads, {res['runs']} runs, "
          f"onnxruntime {res['onnxruntime']}, load average {res['loadavg'][0]:.2f}")
    for phase in ("prefill", "decode"):
        r = res[phase]
        print(f"\n{phase}: wall {r['wall_ms']:.1f} ms per pass (median), kernels {r['kernel_ms']:.1f} ms")
        print(f"{'op type':<28}{'nodes':>6}{'ms':>9}{'share':>8}")
        for o in r["ops"]:
            print(f"{o['op']:<28}{o['nodes']:>6}{o['ms']:>9.2f}{o['share']:>8.1%}")
        print("top nodes (l* = summed over layers): " + ", ".join(f"{n['node']} {n['ms']:.1f} ms" for n in r["top_nodes"]))


if __name__ == "__main__":
    sys.exit(main())
