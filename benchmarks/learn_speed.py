"""Learn speed and RAM: batched learn vs one example per pass, in one run.

    python benchmarks/learn_speed.py --bundle bundles/default/fp32 [--n 200] [--batch 8] [--json]

Two configurations plan the same learn (``learn.plan``: encode, held-out value,
calibration, weighting, gate, select; nothing written) of the first ``--n`` examples of
``--task`` into a fresh 16 MiB bank, each in its own process so that peak RSS is its own:

- **peer**: one example per decoder pass (``batch=1``), the probe graph in a session of its
  own beside the decoder (``Runtime.open(bundle)``): how the learn ran before batching;
- **batched**: ``--batch`` examples per padded pass, and the runtime opened with
  ``learn=True`` (its decoder session is the probe graph: one copy of the weights).

Prints candidates per second (encode phase, value phase, the whole plan), peak RSS, the
ratios batched / peer, and whether both chose the same entries with the same gains (a
padded batch must give each row what it gives alone). Report the CPU with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time


def one(bundle: str, task: str, n: int, batch: int, learn: bool) -> dict:
    from inducekv.learn.plan import open_or_create, plan, read_examples
    from inducekv.runtime.api import Runtime

    t0 = time.perf_counter()
    rt = Runtime.open(bundle, learn=learn)
    examples = read_examples(task)[:n]
    with tempfile.TemporaryDirectory() as d:
        bank = open_or_create(os.path.join(d, "b.ikv"), rt, 16 << 20, "k4v4s")
        t = time.perf_counter()
        p = plan(rt, bank, examples, "task", batch=batch)
        total = time.perf_counter() - t
        bank.close()
    tm = p.timings
    return {"batch": batch, "learn_runtime": learn, "examples": len(examples), "open_s": t - t0, "plan_s": total,
            **{k: round(v, 2) for k, v in tm.items()},
            "encode_per_s": len(examples) / tm["encode_s"], "value_per_s": len(examples) / max(tm["value_s"], 1e-9),
            "plan_per_s": len(examples) / total,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "added": sorted(p.add), "gains": [c.gain for c in p.candidates]}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--task", default="examples/tasks/capitals.train.jsonl")
    ap.add_argument("--n", type=int, default=200, help="examples learned")
    ap.add_argument("--batch", type=int, default=8, help="examples per pass of the batched configuration")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: batch,learn of one child run
    a = ap.parse_args()
    if a.one:
        b, learn = a.one.split(",")
        print(json.dumps(one(a.bundle, a.task, a.n, int(b), learn == "1")))
        return
    runs = {}
    for name, b, learn in (("peer", 1, 0), ("batched", a.batch, 1)):
        print(f"{name}: batch {b}, learn runtime {bool(learn)} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--bundle", a.bundle, "--task", a.task, "--n", str(a.n),
                              "--one", f"{b},{learn}"], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{name} run failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    peer, ours = runs["peer"], runs["batched"]
    gain_diff = max(abs(x - y) for x, y in zip(peer["gains"], ours["gains"]))
    res = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg": os.getloadavg()[0], "bundle": a.bundle,
           "examples": ours["examples"],
           "ratios": {k: ours[k] / peer[k] for k in ("encode_per_s", "value_per_s", "plan_per_s")},
           "rss_ratio": ours["peak_rss_mib"] / peer["peak_rss_mib"],
           "same_entries": peer["added"] == ours["added"], "max_gain_diff": gain_diff,
           **{name: {k: v for k, v in r.items() if k not in ("added", "gains")} for name, r in runs.items()}}
    if a.json:
        print(json.dumps(res))
        return
    print(f"CPU {res['cpu']} ({res['cores']} cores), load {res['load_avg']:.1f}; {res['examples']} examples of {a.task}")
    print(f"{'':10} {'encode/s':>9} {'value/s':>8} {'plan/s':>7} {'plan s':>7} {'peak RSS MiB':>13}")
    for name in ("peer", "batched"):
        r = runs[name]
        print(f"{name:10} {r['encode_per_s']:9.2f} {r['value_per_s']:8.2f} {r['plan_per_s']:7.2f} {r['plan_s']:7.1f} "
              f"{r['peak_rss_mib']:13.0f}")
    rr = res["ratios"]
    print(f"{'ratio':10} {rr['encode_per_s']:8.2f}x {rr['value_per_s']:7.2f}x {rr['plan_per_s']:6.2f}x {'':7} "
          f"{res['rss_ratio']:12.2f}x")
    print(f"same entries chosen: {res['same_entries']}; largest gain difference {gain_diff:.2e} nats")


if __name__ == "__main__":
    main()
