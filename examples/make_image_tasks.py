"""Write image task files (PNG + JSONL) for the default VLM, from a seed.

    python examples/make_image_tasks.py -o image_tasks [--seed 0] [--train 200] [--test 50]

For every question family in ``inducekv.export.imagedata.QUESTIONS`` it writes
``<family>.train.jsonl`` and ``<family>.test.jsonl`` (images under ``img/``):

- trained families (the vision tower saw these questions): colour, shape, count, digit.
  Their test files measure what the default VLM sees (held-out images; digits from the
  held-out part of scikit-learn's set).
- continual families (never trained): ``parity`` (is the digit even or odd: a new answer
  vocabulary over a seen attribute), ``vexcolour`` / ``vexshape`` / ``vexcount`` (made-up
  names for the colours / shapes / counts) and ``side`` (left or right: an attribute no
  question asked about). No answer of these is ever a training answer of the default VLM
  (``imagedata.EVAL_WORDS``; its in-context episodes use fresh made-up words).
- ``--domains`` adds domain-shifted test/train files (``<family>@inverted``, ``@noisy``).

Train and test images come from different random streams, and digit images from disjoint
index ranges, so no test image is in a train file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from inducekv.export import imagedata as data


def write_task(out: Path, name: str, family: str, n: int, split: str, seed: int, domain: str = "clean") -> Path:
    rng = np.random.default_rng([seed, hash_name(name), 0 if split == "train" else 1])
    (out / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        s, prompt, answer = data.sample(family, rng, split=split, domain=domain)
        rel = f"img/{name}.{split}.{i:04d}.png"
        Image.fromarray(s.image).save(out / rel)
        lines.append(json.dumps({"prompt": prompt, "answer": answer, "image": rel}))
    path = out / f"{name}.{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def hash_name(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % (2 ** 31)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test", type=int, default=50)
    ap.add_argument("--families", nargs="*", default=list(data.QUESTIONS))
    ap.add_argument("--domains", nargs="*", default=[], choices=["inverted", "noisy"])
    args = ap.parse_args(argv)
    for fam in args.families:
        for domain in ["clean"] + args.domains:
            name = fam if domain == "clean" else f"{fam}@{domain}"
            write_task(args.out, name, fam, args.train, "train", args.seed, domain)
            write_task(args.out, name, fam, args.test, "test", args.seed, domain)
            print(f"wrote {args.out}/{name}.{{train,test}}.jsonl")


if __name__ == "__main__":
    main()
