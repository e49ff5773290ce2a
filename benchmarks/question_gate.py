"""What the question gate of image tasks adds to time to first token.

    python examples/make_image_tasks.py -o image_tasks --families parity
    python benchmarks/question_gate.py --bundle bundles/vlm --tasks image_tasks [--family parity] [--n 40]

Learns the first ``--train`` examples of ``<family>.train.jsonl`` into a fresh bank (the
``ikv-learn`` defaults: an image task gets a question gate), copies it without its question
gates, then answers ``--n`` test questions at k=1, interleaved: from the gated bank with the
family's own question (its text key remembered after the first), from the gated bank with a
new question text each time (one more key pass over the bare question), and from the copy
without the gate (the peer). Prints median TTFTs and their ratios to the peer.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from inducekv.learn import learn_task
from inducekv.memory.bank import Bank
from inducekv.memory.format import QUESTIONS_KEY
from inducekv.runtime import Runtime
from inducekv.runtime.tasks import load_task


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--tasks", type=Path, required=True, help="directory from examples/make_image_tasks.py")
    ap.add_argument("--family", default="parity")
    ap.add_argument("--train", type=int, default=30, help="training examples learned (default 30)")
    ap.add_argument("--n", type=int, default=40, help="test questions timed per case (default 40)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rows = [json.loads(x) for x in (args.tasks / f"{args.family}.train.jsonl").read_text().splitlines()][:args.train]
    test = load_task(args.tasks / f"{args.family}.test.jsonl", require_answer=True)[:args.n + 1]
    rt = Runtime.open(args.bundle)
    with tempfile.TemporaryDirectory() as tmp:
        task = Path(tmp) / f"{args.family}.jsonl"
        task.write_text("".join(json.dumps({**r, "image": str((args.tasks / r["image"]).resolve())}) + "\n" for r in rows))
        gated, plain = Path(tmp) / "gated.ikv", Path(tmp) / "plain.ikv"
        learn_task(rt, gated, task, budget=16 << 20)
        shutil.copy(gated, plain)
        with Bank.open(plain, writable=True) as b, b.transaction() as tx:
            tx.drop_extra(QUESTIONS_KEY)
        mem_g, mem_p = rt.open_memory(gated), rt.open_memory(plain)
        cases = {"question gate, the task's question": [], "question gate, a new question each time": [],
                 "no question gate (peer)": []}

        def ttft(prompt, image, mem) -> float:
            return rt.generate(prompt, image=image, k=1, max_new_tokens=1, memory=mem).timings.ttft_ms

        for mem in (mem_g, mem_p):   # warm-up: prefixes, reference keys, the question's text key
            ttft(test[0].prompt, test[0].image, mem)
        for i, ex in enumerate(test[1:]):
            cases["question gate, the task's question"].append(ttft(ex.prompt, ex.image, mem_g))
            cases["question gate, a new question each time"].append(ttft(f"{ex.prompt} ({i})", ex.image, mem_g))
            cases["no question gate (peer)"].append(ttft(ex.prompt, ex.image, mem_p))
        mem_g.close(), mem_p.close()
    peer = statistics.median(cases["no question gate (peer)"])
    out = {k: {"median_ttft_ms": round(statistics.median(v), 1), "ratio": round(statistics.median(v) / peer, 3)}
           for k, v in cases.items()}
    if args.json:
        print(json.dumps({"family": args.family, "n": len(test) - 1, **out}))
    else:
        for k, v in out.items():
            print(f"{k:42s} median TTFT {v['median_ttft_ms']:6.1f} ms  {v['ratio']:.2f}x")


if __name__ == "__main__":
    main()
