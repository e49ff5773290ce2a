"""What the VLM sees, asked directly: held-out images of its training generator and of a separate renderer.

    python benchmarks/vlm_seeing.py --bundle bundles/vlm [--n 50] [--seed 7] [--json]

Per question family (colour, shape, count, digit), ``--n`` images from each source are
answered greedily without memory and scored like ``ikv-eval``:

- ``generator``: ``export/imagedata.py`` (the training generator), held-out streams
  (this script's seed, digits from the held-out index range), plain renderings as in
  the image task files;
- ``plain``: ``tests/plainshapes.py``, a separate renderer (Pillow's named colours,
  axis-aligned shapes, printed digits) that no training step used;
- ``survey`` (colour only): the separate renderer with the xkcd colour survey's RGB values
  for the same six names (``plainshapes.SURVEY``), a second naming source.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from inducekv.export import imagedata
from inducekv.runtime import Runtime
from inducekv.runtime.scoring import score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import plainshapes  # noqa: E402

FAMILIES = ("colour", "shape", "count", "digit")


def accuracy(rt, source: str, family: str, n: int, seed: int) -> float:
    rng = np.random.default_rng([seed, FAMILIES.index(family), ("generator", "plain", "survey").index(source)])
    hits = []
    for _ in range(n):
        if source == "generator":
            s, prompt, answer = imagedata.sample(family, rng, split="test")
            image = s.image
        else:
            image, prompt, answer = plainshapes.sample(family, rng, plainshapes.SURVEY if source == "survey" else None)
        r = rt.generate(prompt, image=image, max_new_tokens=6, stop=["\n"])
        hits.append(score(r.text, [answer])[0])
    return float(np.mean(hits))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=7, help="not the training seed (0)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rt = Runtime.open(args.bundle)
    out = {src: {f: accuracy(rt, src, f, args.n, args.seed) for f in FAMILIES} for src in ("generator", "plain")}
    out["survey"] = {"colour": accuracy(rt, "survey", "colour", args.n, args.seed)}
    if args.json:
        print(json.dumps({"n": args.n, "seed": args.seed, **out}))
        return
    print(f"{'source':10s} " + " ".join(f"{f:>7s}" for f in FAMILIES) + f"   (n={args.n} each)")
    for src, row in out.items():
        print(f"{src:10s} " + " ".join(f"{row[f]:7.2f}" if f in row else f"{'-':>7s}" for f in FAMILIES))


if __name__ == "__main__":
    main()
