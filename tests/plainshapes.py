"""A second, plain image renderer, separate from the training generator (``export/imagedata.py``).

The default VLM must see shapes, colours, counts and digits in images drawn by code that
did not make its training data. This one draws with Pillow's own primitives on a flat
background: Pillow's named colours (not the training palette), axis-aligned squares,
upright triangles and five-pointed stars, printed digits in Pillow's default font (the
training digits are handwritten), 96x96 canvas, no noise, no jitter.

    sample(family, rng, palette=None) -> (image uint8 (96, 96, 3), question, answer)
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 96
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")   # Pillow's named colours
# The same names as the xkcd colour survey's most-named RGB values (a second naming source,
# for colour: ``sample(..., palette=SURVEY)``)
SURVEY = {"red": "#e50000", "green": "#15b01a", "blue": "#0343df", "yellow": "#ffff14", "purple": "#7e1e9c",
          "orange": "#f97306"}
SHAPES = ("circle", "square", "triangle", "star")
NUMBERS = ("one", "two", "three", "four")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is this?",
             "count": "How many shapes are there?", "digit": "What digit is this?"}


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: str) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=colour)
    else:
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            q = r if i % 2 == 0 else r * 0.45
            pts.append((cx + q * math.cos(a), cy + q * math.sin(a)))
        draw.polygon(pts, fill=colour)


def shapes(rng: np.random.Generator, n: int = 1, palette: dict | None = None) -> tuple[np.ndarray, dict]:
    colour, shape = str(rng.choice(COLOURS)), str(rng.choice(SHAPES))
    fill = palette[colour] if palette else colour
    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    r = float(rng.uniform(18, 34)) if n == 1 else float(rng.uniform(9, 13))
    centres: list[tuple[float, float]] = []
    while len(centres) < n:
        c = (float(rng.uniform(r + 1, SIZE - r - 1)), float(rng.uniform(r + 1, SIZE - r - 1)))
        if all(math.dist(c, d) > 2.4 * r for d in centres):
            centres.append(c)
    for cx, cy in centres:
        _shape(draw, shape, cx, cy, r, fill)
    return np.asarray(img), {"colour": colour, "shape": shape, "count": NUMBERS[n - 1]}


def printed_digit(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    d = int(rng.integers(0, 10))
    img = Image.new("RGB", (SIZE, SIZE), "white")
    font = ImageFont.load_default(size=int(rng.integers(56, 80)))
    draw = ImageDraw.Draw(img)
    draw.text((SIZE / 2 + rng.uniform(-6, 6), SIZE / 2 + rng.uniform(-6, 6)), str(d), fill="black", font=font,
              anchor="mm")
    return np.asarray(img), {"digit": str(d)}


def sample(family: str, rng: np.random.Generator, palette: dict | None = None) -> tuple[np.ndarray, str, str]:
    """``palette``: name -> fill for the shapes (default: Pillow's colour of that name)."""
    if family == "digit":
        img, facts = printed_digit(rng)
    else:
        img, facts = shapes(rng, n=int(rng.integers(1, 5)) if family == "count" else 1, palette=palette)
    return img, QUESTIONS[family], facts[family]
