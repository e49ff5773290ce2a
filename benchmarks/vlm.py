"""Cost of images on the device: the vision pass, and the bytes of an image-bearing entry.

    python benchmarks/vlm.py --bundle bundles/vlm [--rounds 20] [--json]

Per image, median over ``--rounds`` generated 64x64 images (and a 512x512 photo-sized
one, which the processor resizes): preprocessing (numpy/Pillow), the vision graph, the
key pass over image + prompt, and a text-only key pass for comparison; the resident
memory the vision session adds (VmRSS before/after opening it); and the bytes one entry
of an image question takes in a bank per KV scheme (pages + slot record), next to a
text-only entry of the same question.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from inducekv.export import imagedata
from inducekv.kernels import kvquant
from inducekv.memory import format as fmt
from inducekv.runtime.api import Runtime
from inducekv.runtime.memory import TEMPLATES, Layout, key_of
from inducekv.runtime.session import KeyEncoder


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rt = Runtime.open(args.bundle)
    before = rss_mib()
    rt.encode_image(imagedata.shapes(rng).image)  # opens the vision session
    vision_rss = rss_mib() - before
    keys = KeyEncoder(rt.bundle_dir, rt.manifest, rt.profile)
    prompt = "What colour is the shape?"
    out = {"vision_session_rss_mib": round(vision_rss, 1)}
    for name, make in (("64x64", lambda: imagedata.shapes(rng).image),
                       ("512x512", lambda: rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))):
        pre, vis, key_img, key_txt = [], [], [], []
        for _ in range(args.rounds):
            img = rt.encode_image(make())
            pre.append(img.preprocess_ms)
            vis.append(img.vision_ms)
            t = time.perf_counter()
            key_of(rt, keys, prompt, img)
            key_img.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            key_of(rt, keys, prompt, None)
            key_txt.append((time.perf_counter() - t) * 1e3)
        out[name] = {"preprocess_ms": statistics.median(pre), "vision_ms": statistics.median(vis),
                     "key_pass_image_prompt_ms": statistics.median(key_img),
                     "key_pass_text_prompt_ms": statistics.median(key_txt)}
    img = rt.encode_image(imagedata.shapes(rng).image)
    lay = Layout(rt, TEMPLATES["facts"], "rerotate")
    m = rt.manifest
    t_img = len(lay.entry_ids(prompt, "red", img))
    t_txt = len(lay.entry_ids(prompt, "red", None))
    sizes = {}
    for scheme in kvquant.DENSE:
        geo = fmt.plan(64 << 20, fingerprint=m.fingerprint, scheme=scheme, num_layers=m.num_layers,
                       kv_heads=m.num_kv_heads, head_dim=m.head_dim, key_dim=m.retrieval_key["dim"], max_tokens=128)
        sizes[scheme] = {"image_entry_bytes": geo.entry_bytes(t_img), "text_entry_bytes": geo.entry_bytes(t_txt)}
    out["entry"] = {"image_entry_tokens": t_img, "text_entry_tokens": t_txt,
                    "image_tokens": int(img.features.shape[0]), "bytes": sizes}
    if args.json:
        print(json.dumps(out))
        return
    print(f"vision session adds {out['vision_session_rss_mib']} MiB RSS")
    for name in ("64x64", "512x512"):
        r = out[name]
        print(f"{name}: preprocess {r['preprocess_ms']:.2f} ms, vision {r['vision_ms']:.2f} ms, key pass "
              f"image+prompt {r['key_pass_image_prompt_ms']:.1f} ms vs prompt only {r['key_pass_text_prompt_ms']:.1f} ms")
    e = out["entry"]
    print(f"entry of an image question: {e['image_entry_tokens']} tokens ({e['image_tokens']} image tokens); "
          f"text-only: {e['text_entry_tokens']} tokens")
    for scheme, s in sizes.items():
        print(f"  {scheme}: image entry {s['image_entry_bytes'] / 1024:.0f} KiB, text entry {s['text_entry_bytes'] / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
