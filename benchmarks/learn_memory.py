"""Where a learn's memory goes, stage by stage: traced (Python and numpy) peaks and the
process's resident high-water mark.

    python benchmarks/learn_memory.py --bundle bundles/default/fp32 --task big/capitals.train.jsonl --n 1000 [--json]

Learns the first ``--n`` examples of ``--task`` into a fresh 16 MiB bank in this process,
as ``ikv-learn`` does (its glibc setting included, ``core/alloc.py``), with tracemalloc on;
the learn's progress callback closes each stage. Per stage: the traced peak, traced memory
at its end, and VmHWM (all MiB). Traced memory is what Python and numpy hold; VmHWM minus
it is the model's sessions, onnxruntime's buffers and what the C allocator keeps.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import tracemalloc
from pathlib import Path

from inducekv.core.alloc import keep_large_frees_off_heap
from inducekv.learn.api import learn_task
from inducekv.runtime import Runtime


def hwm_mib() -> float:
    return int([x for x in open("/proc/self/status") if x.startswith("VmHWM:")][0].split()[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="bundles/default/fp32")
    ap.add_argument("--task", required=True, help="JSONL task file")
    ap.add_argument("--n", type=int, default=1000, help="examples: the file's first N lines")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    keep_large_frees_off_heap()
    lines = Path(args.task).read_text().splitlines()[:args.n]
    rt = Runtime.open(args.bundle, learn=True)
    stages, current = {}, [None]

    def close(stage):
        if current[0] is not None:
            now, peak = tracemalloc.get_traced_memory()
            stages[current[0]] = {"traced_peak": round(peak / 2**20, 1), "traced_end": round(now / 2**20, 1),
                                  "vm_hwm": round(hwm_mib(), 1)}
        tracemalloc.reset_peak()
        current[0] = stage

    with tempfile.TemporaryDirectory() as d:
        task = Path(d) / "task.jsonl"
        task.write_text("\n".join(lines) + "\n")
        opened = hwm_mib()
        tracemalloc.start()
        learn_task(rt, Path(d) / "b.ikv", task, name="task", budget=16 << 20,
                   progress=lambda stage, done, total: close(stage) if stage != current[0] else None)
        close(None)
    res = {"examples": len(lines), "vm_hwm_after_open": round(opened, 1), "stages": stages}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"{len(lines)} examples; VmHWM after opening the bundle {opened:.0f} MiB")
    print(f"{'stage':<12} {'traced peak':>12} {'traced end':>11} {'VmHWM':>8}  (MiB)")
    for k, v in stages.items():
        print(f"{k:<12} {v['traced_peak']:>12.1f} {v['traced_end']:>11.1f} {v['vm_hwm']:>8.0f}")


if __name__ == "__main__":
    main()
