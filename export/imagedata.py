"""Images the project generates itself: coloured shapes and handwritten digits.

Used to train the default VLM's vision tower (``export/train_vlm.py``) and to make
image tasks (``examples/make_image_tasks.py``, ``benchmarks/continual``). Everything
is a function of a seed; nothing is downloaded (the digits are scikit-learn's bundled
8x8 set, 1,797 images, split by index so train and test never share a digit image).

Every generator returns ``Sample(image uint8 (S, S, 3), facts dict)``; questions are
made from the facts by ``QUESTIONS``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220),
           "yellow": (235, 200, 20), "purple": (140, 40, 180), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle", "star")
NUMBERS = ("one", "two", "three", "four")
DIGIT_TEST_FROM = 1400   # digits[:1400] train the tower, digits[1400:] are held out


@dataclass
class Sample:
    image: np.ndarray   # (S, S, 3) uint8
    facts: dict


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        angles, radii = np.arange(4) * np.pi / 2 + np.pi / 4 + rot * 0.2, [r * 1.2] * 4
    elif shape == "triangle":
        angles, radii = np.arange(3) * 2 * np.pi / 3 - np.pi / 2 + rot * 0.2, [r * 1.25] * 3
    elif shape == "star":
        angles = np.arange(10) * np.pi / 5 - np.pi / 2 + rot * 0.2
        radii = [r * 1.25 if i % 2 == 0 else r * 0.5 for i in range(10)]
    else:
        raise ValueError(shape)
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=fill)


def _background(rng: np.random.Generator, domain: str) -> Image.Image:
    base = rng.integers(225, 256)
    return Image.new("RGB", (SIZE, SIZE), (int(base),) * 3)


def _finish(img: Image.Image, rng: np.random.Generator, domain: str) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0, 4.0, a.shape)                       # mild sensor noise everywhere
    if domain == "noisy":
        a = a + rng.normal(0, 40.0, a.shape)
    a = np.clip(a, 0, 255)
    if domain == "inverted":
        a = 255 - a
    return a.astype(np.uint8)


def shapes(rng: np.random.Generator, count: int | None = None, colour: str | None = None,
           shape: str | None = None, domain: str = "clean") -> Sample:
    """1-4 shapes of one colour and kind, not overlapping, on a light background."""
    count = count or int(rng.integers(1, 5))
    colour = colour or str(rng.choice(list(COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    r = float(rng.uniform(12, 17)) if count == 1 else float(rng.uniform(7, 10))
    img = _background(rng, domain)
    draw = ImageDraw.Draw(img)
    centres: list[tuple[float, float]] = []
    for _ in range(200):
        if len(centres) == count:
            break
        c = (float(rng.uniform(r + 2, SIZE - r - 2)), float(rng.uniform(r + 2, SIZE - r - 2)))
        if all((c[0] - x) ** 2 + (c[1] - y) ** 2 > (2.3 * r) ** 2 for x, y in centres):
            centres.append(c)
    jitter = np.array(COLOURS[colour]) + rng.integers(-15, 16, 3)
    fill = tuple(int(v) for v in np.clip(jitter, 0, 255))
    for cx, cy in centres:
        _draw(draw, shape, cx, cy, r, float(rng.uniform(-1, 1)), fill)
    xs = [c[0] for c in centres]
    side = "left" if np.mean(xs) < SIZE / 2 else "right"
    return Sample(_finish(img, rng, domain), {"colour": colour, "shape": shape, "count": NUMBERS[len(centres) - 1],
                                              "side": side, "domain": domain, "vexcolour": VEX_COLOURS[colour],
                                              "vexshape": VEX_SHAPES[shape]})


_DIGITS = None


def _digits():
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS = (d.images.astype(np.float32) / 16.0, d.target.astype(int))   # (1797, 8, 8) in [0, 1]
    return _DIGITS


def digit(rng: np.random.Generator, split: str = "train", index: int | None = None,
          domain: str = "clean") -> Sample:
    """One handwritten digit, upscaled to SIZE, dark ink in a random colour on a light background."""
    images, labels = _digits()
    lo, hi = (0, DIGIT_TEST_FROM) if split == "train" else (DIGIT_TEST_FROM, len(labels))
    i = int(index if index is not None else rng.integers(lo, hi))
    small = Image.fromarray((images[i] * 255).astype(np.uint8))
    side = int(rng.integers(40, 57))
    big = np.asarray(small.resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0    # (side, side)
    canvas = np.zeros((SIZE, SIZE), np.float32)
    y, x = rng.integers(0, SIZE - side + 1, 2)
    canvas[y:y + side, x:x + side] = big
    ink = np.array(COLOURS[str(rng.choice(["red", "green", "blue", "purple"]))], np.float32) * 0.6
    bg = float(rng.integers(225, 256))
    rgb = bg * (1 - canvas[..., None]) + ink * canvas[..., None]
    img = Image.fromarray(rgb.astype(np.uint8))
    label = int(labels[i])
    return Sample(_finish(img, rng, domain), {"digit": str(label), "parity": "even" if label % 2 == 0 else "odd",
                                              "domain": domain, "index": i})


# made-up names for continual tasks with a new answer vocabulary
VEX_COLOURS = dict(zip(COLOURS, ("blick", "moxa", "terp", "quill", "zandor", "frell")))
VEX_SHAPES = dict(zip(SHAPES, ("plonk", "siva", "drent", "yorra")))

# question families: name -> (generator kind, prompt, fact the answer is)
QUESTIONS = {
    "colour": ("shapes", "What colour is the shape?", "colour"),
    "shape": ("shapes", "What shape is this?", "shape"),
    "count": ("shapes", "How many shapes are there?", "count"),
    "digit": ("digit", "What digit is this?", "digit"),
    # not used to train the tower: continual tasks
    "side": ("shapes", "Is the shape on the left or the right?", "side"),
    "parity": ("digit", "Is this digit even or odd?", "parity"),
    "vexcolour": ("shapes", "What is this colour called in Vexish?", "vexcolour"),
    "vexshape": ("shapes", "What is this shape called in Vexish?", "vexshape"),
}
TRAINED = ("colour", "shape", "count", "digit")


def sample(family: str, rng: np.random.Generator, split: str = "train", domain: str = "clean") -> tuple[Sample, str, str]:
    """(sample, prompt, answer) for one question family."""
    kind, prompt, fact = QUESTIONS[family]
    if kind == "digit":
        s = digit(rng, split, domain=domain)
    else:
        s = shapes(rng, count=None if family == "count" else 1, domain=domain)
    return s, prompt, s.facts[fact]
