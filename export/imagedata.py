"""Images the project generates itself: coloured shapes and handwritten digits.

Used to train the default VLM's vision tower (``export/train_vlm.py``) and to make
image tasks (``examples/make_image_tasks.py``, ``benchmarks/continual``). Everything
is a function of a seed; nothing is downloaded (the digits are scikit-learn's bundled
8x8 set, 1,797 images, split by index so train and test never share a digit image).

Every generator returns ``Sample(image uint8 (S, S, 3), facts dict)``; questions are
made from the facts by ``QUESTIONS``.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220),
           "yellow": (235, 200, 20), "purple": (140, 40, 180), "orange": (245, 130, 20)}
# Varied renderings may draw a colour anywhere in its name's common range (hue in degrees,
# saturation, value), not only near the palette: CSS/X11 and xkcd-survey colours of these
# names fall inside. Orange and yellow stay bright (dark ones read as brown/olive).
# NAMED_SHARE: the share of varied shapes coloured so; 0 in the shipped recipe (a run at 0.5
# is measured in the README's model card), set by ``train_vlm --named-colours``.
NAMED_SHARE = 0.0
NAMED_RANGES = {"red": ((-10, 10), (0.6, 1.0), (0.45, 1.0)), "orange": ((18, 42), (0.7, 1.0), (0.8, 1.0)),
                "yellow": ((48, 64), (0.7, 1.0), (0.8, 1.0)), "green": ((90, 150), (0.5, 1.0), (0.35, 0.9)),
                "blue": ((205, 242), (0.6, 1.0), (0.45, 1.0)), "purple": ((268, 305), (0.5, 1.0), (0.35, 0.85))}
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


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill,
          outline: int = 0) -> None:
    """A filled shape, or its outline ``outline`` pixels wide."""
    if shape == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, fill=None if outline else fill, outline=fill if outline else None, width=outline or 1)
    elif outline:
        pts = _polygon(shape, cx, cy, r, rot)
        draw.line(pts + pts[:1], fill=fill, width=outline, joint="curve")
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=fill)


def _named_fill(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random RGB inside ``colour``'s ``NAMED_RANGES``."""
    (h0, h1), (s0, s1), (v0, v1) = NAMED_RANGES[colour]
    rgb = colorsys.hsv_to_rgb((rng.uniform(h0, h1) % 360) / 360, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return tuple(int(round(255 * c)) for c in rgb)


def _background(rng: np.random.Generator, domain: str) -> Image.Image:
    base = rng.integers(225, 256)
    return Image.new("RGB", (SIZE, SIZE), (int(base),) * 3)


def _varied_background(rng: np.random.Generator, size: int) -> Image.Image:
    """Light, dark, pale-tinted or graded backgrounds (the ``varied`` renderings)."""
    kind = rng.choice(["light", "white", "dark", "tint", "gradient"], p=[0.3, 0.15, 0.2, 0.15, 0.2])
    if kind == "gradient":
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        light = rng.random() < 0.6
        a, b = (170 + a // 3, 170 + b // 3) if light else (a // 5, b // 5)
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        g = a * (1 - t) + b * t                                             # (size, 1, 3)
        g = np.broadcast_to(g, (size, size, 3))
        if rng.random() < 0.5:
            g = g.transpose(1, 0, 2)
        return Image.fromarray(np.ascontiguousarray(g).astype(np.uint8))
    if kind == "tint":
        rgb = 205 + rng.integers(0, 51, 3)
    elif kind == "dark":
        rgb = np.full(3, rng.integers(0, 50)) + rng.integers(0, 15, 3)
    else:
        rgb = np.full(3, 255 if kind == "white" else rng.integers(200, 256))
    return Image.new("RGB", (size, size), tuple(int(v) for v in rgb))


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
           shape: str | None = None, domain: str = "clean", varied: bool = False) -> Sample:
    """1-4 shapes of one colour and kind, not overlapping, on a light background.

    ``varied``: the training renderings for robust seeing: a canvas of 48-128 pixels,
    light, dark, tinted or graded backgrounds, filled or outlined shapes, a wider size
    range, half the time anti-aliasing (drawn 4x larger, then downsampled), and with
    probability ``NAMED_SHARE`` a colour from anywhere in its name's range (``NAMED_RANGES``)
    instead of near the palette."""
    count = count or int(rng.integers(1, 5))
    colour = colour or str(rng.choice(list(COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    size, ss, outline = SIZE, 1, 0
    if varied:
        size = int(rng.choice([48, 64, 80, 96, 128]))
        ss = 4 if rng.random() < 0.5 else 1
        lo, hi = (0.14, 0.34) if count == 1 else (0.09, 0.16)
        r = float(rng.uniform(lo, hi)) * size
        if rng.random() < 0.3:
            outline = max(2, int(round(r * rng.uniform(0.15, 0.3))))
        img = _varied_background(rng, size)
    else:
        r = float(rng.uniform(12, 17)) if count == 1 else float(rng.uniform(7, 10))
        img = _background(rng, domain)
    centres: list[tuple[float, float]] = []
    for _ in range(200):
        if len(centres) == count:
            break
        c = (float(rng.uniform(r + 2, size - r - 2)), float(rng.uniform(r + 2, size - r - 2)))
        if all((c[0] - x) ** 2 + (c[1] - y) ** 2 > (2.3 * r) ** 2 for x, y in centres):
            centres.append(c)
    if varied and NAMED_SHARE > 0 and rng.random() < NAMED_SHARE:   # no draw at 0: the shipped stream
        fill = _named_fill(colour, rng)
    else:
        jitter = np.array(COLOURS[colour]) + rng.integers(-15, 16, 3)
        fill = tuple(int(v) for v in np.clip(jitter, 0, 255))
    canvas = img.resize((size * ss, size * ss)) if ss > 1 else img
    draw = ImageDraw.Draw(canvas)
    for cx, cy in centres:
        _draw(draw, shape, cx * ss, cy * ss, r * ss, float(rng.uniform(-1, 1)), fill, outline * ss)
    img = canvas.resize((size, size), Image.LANCZOS) if ss > 1 else canvas
    xs = [c[0] for c in centres]
    side = "left" if np.mean(xs) < size / 2 else "right"
    return Sample(_finish(img, rng, domain), {"colour": colour, "shape": shape, "count": NUMBERS[len(centres) - 1],
                                              "side": side, "domain": domain, "vexcolour": VEX_COLOURS[colour],
                                              "vexshape": VEX_SHAPES[shape], "vexcount": VEX_COUNTS[NUMBERS[len(centres) - 1]]})


_DIGITS = None


def _digits():
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS = (d.images.astype(np.float32) / 16.0, d.target.astype(int))   # (1797, 8, 8) in [0, 1]
    return _DIGITS


def digit(rng: np.random.Generator, split: str = "train", index: int | None = None,
          domain: str = "clean", label: int | None = None, varied: bool = False) -> Sample:
    """One handwritten digit, upscaled to SIZE, dark ink in a random colour on a light background.

    ``label``: a random image of that digit from the split. ``varied``: also light ink on
    a dark background, and a canvas of 48-128 pixels."""
    images, labels = _digits()
    lo, hi = (0, DIGIT_TEST_FROM) if split == "train" else (DIGIT_TEST_FROM, len(labels))
    if index is None and label is not None:
        index = lo + int(rng.choice(np.flatnonzero(labels[lo:hi] == label)))
    i = int(index if index is not None else rng.integers(lo, hi))
    size = int(rng.choice([48, 64, 96, 128])) if varied else SIZE
    small = Image.fromarray((images[i] * 255).astype(np.uint8))
    side = int(rng.integers(40, 57) * size // SIZE)
    big = np.asarray(small.resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0    # (side, side)
    canvas = np.zeros((size, size), np.float32)
    y, x = rng.integers(0, size - side + 1, 2)
    canvas[y:y + side, x:x + side] = big
    ink = np.array(COLOURS[str(rng.choice(["red", "green", "blue", "purple"]))], np.float32) * 0.6
    bg = float(rng.integers(225, 256))
    if varied and rng.random() < 0.3:
        ink, bg = np.array(COLOURS[str(rng.choice(list(COLOURS)))], np.float32), float(rng.integers(0, 50))
    rgb = bg * (1 - canvas[..., None]) + ink * canvas[..., None]
    img = Image.fromarray(rgb.astype(np.uint8))
    label = int(labels[i])
    return Sample(_finish(img, rng, domain), {"digit": str(label), "parity": "even" if label % 2 == 0 else "odd",
                                              "domain": domain, "index": i})


# made-up names for continual tasks with a new answer vocabulary
VEX_COLOURS = dict(zip(COLOURS, ("blick", "moxa", "terp", "quill", "zandor", "frell")))
VEX_SHAPES = dict(zip(SHAPES, ("plonk", "siva", "drent", "yorra")))
VEX_COUNTS = dict(zip(NUMBERS, ("tib", "gorro", "wense", "lukka")))

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
    "vexcount": ("shapes", "How many shapes are there, in Vexish?", "vexcount"),
}
TRAINED = ("colour", "shape", "count", "digit")
# every answer of a task the default VLM is evaluated on: in-context training episodes
# (``export/episodes.py``) never use one of these as a made-up answer word
EVAL_WORDS = frozenset([*VEX_COLOURS.values(), *VEX_SHAPES.values(), *VEX_COUNTS.values(), "even", "odd",
                        "left", "right", *COLOURS, *SHAPES, *NUMBERS, *(str(d) for d in range(10))])


def sample(family: str, rng: np.random.Generator, split: str = "train", domain: str = "clean") -> tuple[Sample, str, str]:
    """(sample, prompt, answer) for one question family."""
    kind, prompt, fact = QUESTIONS[family]
    if kind == "digit":
        s = digit(rng, split, domain=domain)
    else:
        s = shapes(rng, count=None if family in ("count", "vexcount") else 1, domain=domain)
    return s, prompt, s.facts[fact]
