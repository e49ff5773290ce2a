"""What learning a task costs, per method: wall time, peak RSS, and where it can run.

    python benchmarks/continual/cost.py [--sequence text] [--tasks 2] [--cap 4MiB] [--seed 0]
                                        [--methods inducekv,prompt-retrieval,lora,replay,experts]
                                        [--text-bundle B] [--vlm-bundle B] [--out results/continual/cost] [--json]

Each method learns the first ``--tasks`` tasks of a sequence of ``run.py`` (same task data,
same seed, same cap) in a fresh process of its own, so that its peak RSS is its own:

- ``inducekv`` (also ``random``, ``fifo``): ``learn_task``, i.e. what ``ikv-learn`` runs on a
  device: encoding the candidates, held-out value, calibration, gate, selection and the
  commit (the continual benchmark shares one encoding between methods; here nothing is shared);
- ``prompt-retrieval``: the frozen key of each example, kept with its text (device side);
- ``lora``, ``replay``, ``experts`` (``lora.py``, ``lora_plus.py``): training in torch, as
  ``run.py`` does; the model load (the GGUF dequantized into torch) is setup, not learning.

Reported per method: seconds per task (mean over the tasks), RSS after setup and the peak
RSS during learning (``VmHWM``), and whether the method learns with onnxruntime alone (device
side, no torch) or needs torch. Report the CPU with the numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEVICE_SIDE = {"inducekv": True, "random": True, "fifo": True, "prompt-retrieval": True,
               "lora": False, "replay": False, "experts": False}


def _rss_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    vals = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            vals[line.split(":")[0]] = int(line.split()[1]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def _cpu() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def child(method: str, sequence: str, n_tasks: int, cap: int, seed: int, bundles: dict) -> dict:
    """Learn the sequence's first tasks with one method in this process; timings and RSS."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE.parent.parent / "examples"))
    import methods as M
    import run as R

    t0 = time.perf_counter()
    spec = R.SEQUENCES[sequence]
    bundle = bundles[spec["bundle"]]
    work = Path(tempfile.mkdtemp())
    tasks = R.build_tasks(sequence, bundle, 24, 12, seed, work)
    names = list(tasks)[:n_tasks]
    if method in ("inducekv", "random", "fifo"):   # as ikv-learn opens it: one session for decoder and probe
        from inducekv.runtime import Runtime

        rt = Runtime.open(bundle, learn=True)
    else:
        rt = M.runtime(bundle)
    if method in ("lora", "replay", "experts"):
        from lora import SequentialLoRA
        from lora_plus import ExpertLoRA, ReplayLoRA

        kind = {"lora": SequentialLoRA, "replay": ReplayLoRA, "experts": ExpertLoRA}[method]
        m = kind(rt, cap, lambda ex: 0.0, seed)
        learn = lambda n: m.learn(n, tasks[n][0], None)                       # noqa: E731
    elif method == "prompt-retrieval":
        from inducekv.runtime.memory import image_of, key_of
        from inducekv.runtime.session import KeyEncoder

        keys = KeyEncoder(rt.bundle_dir, rt.manifest, rt.profile)
        store: list = []
        learn = lambda n: store.extend((ex, key_of(rt, keys, ex.prompt, image_of(rt, ex)))  # noqa: E731
                                       for ex in tasks[n][0])
    else:
        from inducekv.learn import learn_task

        from inducekv.learn.select import DEFAULT_STRATEGY

        strategy = {"inducekv": DEFAULT_STRATEGY, "random": "random", "fifo": "fifo"}[method]
        bank = work / "bank.ikv"
        learn = lambda n: learn_task(rt, bank, tasks[n][0], name=n, budget=cap, strategy=strategy,  # noqa: E731
                                     seed=seed)
    setup_s = time.perf_counter() - t0
    rss_setup, _ = _rss_mib()
    per_task = []
    for n in names:
        t = time.perf_counter()
        learn(n)
        per_task.append(time.perf_counter() - t)
    _, peak = _rss_mib()
    return {"method": method, "device_side": DEVICE_SIDE[method], "tasks": names,
            "examples": [len(tasks[n][0]) for n in names], "learn_s": per_task,
            "mean_learn_s": sum(per_task) / len(per_task), "setup_s": setup_s,
            "rss_after_setup_mib": rss_setup, "peak_rss_mib": peak}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequence", default="text")
    ap.add_argument("--tasks", type=int, default=2, help="learn this many tasks of the sequence (at least 1)")
    ap.add_argument("--cap", default="4MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="inducekv,prompt-retrieval,lora,replay,experts")
    ap.add_argument("--text-bundle", default="bundles/default/fp32")
    ap.add_argument("--vlm-bundle", default="bundles/vlm")
    ap.add_argument("--out", type=Path, default=None, help="write cost.json and cost.md here")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="replace these methods' rows in --out/cost.json from an earlier run, keep the others")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from inducekv.core.cli import parse_bytes

    cap = parse_bytes(args.cap)
    bundles = {"text": args.text_bundle, "vlm": args.vlm_bundle}
    if args.child:
        print(json.dumps(child(args.child, args.sequence, args.tasks, cap, args.seed, bundles)))
        return
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in DEVICE_SIDE:
            ap.error(f"unknown method {m!r}; choose from {', '.join(DEVICE_SIDE)}")
    if args.tasks < 1:
        ap.error("--tasks must be at least 1")
    rows = []
    for m in methods:
        print(f"[cost] {m}: learning {args.tasks} task(s) of {args.sequence} in a fresh process", file=sys.stderr,
              flush=True)
        cmd = [sys.executable, __file__, "--child", m, "--sequence", args.sequence, "--tasks", str(args.tasks),
               "--cap", args.cap, "--seed", str(args.seed), "--text-bundle", args.text_bundle,
               "--vlm-bundle", args.vlm_bundle]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    if args.merge:
        if not (args.out and (args.out / "cost.json").is_file()):
            ap.error("--merge needs --out with an earlier cost.json")
        old = json.loads((args.out / "cost.json").read_text())
        if (old["sequence"], old["cap"], old["seed"]) != (args.sequence, cap, args.seed):
            ap.error("--merge: the earlier run has another sequence, cap or seed")
        mine = {r["method"]: r for r in rows}
        rows = [mine.pop(r["method"], r) for r in old["rows"]] + list(mine.values())
    res = {"sequence": args.sequence, "cap": cap, "seed": args.seed, "cpu": _cpu(), "rows": rows}
    md = ["| method | learns on the device (no torch) | s per task | RSS after setup MiB | peak RSS MiB |",
          "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['method']} | {'yes' if r['device_side'] else 'no (torch)'} | {r['mean_learn_s']:.1f} | "
                  f"{r['rss_after_setup_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cost.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.out / "cost.md").write_text("\n".join(md) + "\n")
    print(json.dumps(res) if args.json else "\n".join(md))


if __name__ == "__main__":
    main()
