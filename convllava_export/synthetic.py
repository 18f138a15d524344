"""Synthetic images with checkable answers: what the tiny demo model learns and validation scores.

Each image has one dominant colour (its background, over half the pixels) and a shape
(wide, tall or square), plus a few smaller distractor shapes. The answer names both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
ORIENTATIONS = ("wide", "tall", "square")
QUESTION = "What is shown in this image?"


@dataclass
class Sample:
    image: Image.Image
    colour: str
    orientation: str
    question: str = QUESTION

    @property
    def answer(self) -> str:
        return f"The image is mostly {self.colour}. It is a {self.orientation} picture."


def _size(rng: np.random.Generator, orientation: str, base: tuple[int, int]) -> tuple[int, int]:
    short = int(rng.integers(base[0], base[1]))
    if orientation == "square":
        return short, short
    long = int(short * rng.uniform(2.0, 3.5))
    return (long, short) if orientation == "wide" else (short, long)


def colour_sample(
    rng: np.random.Generator,
    colour: str | None = None,
    orientation: str | None = None,
    base: tuple[int, int] = (96, 224),
) -> Sample:
    """One image whose dominant colour and orientation are known."""
    colour = colour or str(rng.choice(list(COLOURS)))
    orientation = orientation or str(rng.choice(ORIENTATIONS))
    w, h = _size(rng, orientation, base)
    img = Image.new("RGB", (w, h), COLOURS[colour])
    draw = ImageDraw.Draw(img)
    others = [c for c in COLOURS if c != colour]
    for _ in range(int(rng.integers(1, 4))):  # distractors: each under ~6 % of the area
        c = COLOURS[str(rng.choice(others))]
        sw, sh = int(w * rng.uniform(0.05, 0.22)), int(h * rng.uniform(0.05, 0.22))
        x, y = int(rng.integers(0, max(1, w - sw))), int(rng.integers(0, max(1, h - sh)))
        if rng.random() < 0.5:
            draw.rectangle([x, y, x + sw, y + sh], fill=c)
        else:
            draw.ellipse([x, y, x + sw, y + sh], fill=c)
    for _ in range(int(rng.integers(0, 3))):
        c = COLOURS[str(rng.choice(others))]
        draw.line(
            [int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(0, h))],
            fill=c,
            width=2,
        )
    return Sample(img, colour, orientation)


def colour_samples(n: int, seed: int = 0, base: tuple[int, int] = (96, 224)) -> list[Sample]:
    """n samples cycling through every colour × orientation, so small sets stay balanced."""
    rng = np.random.default_rng(seed)
    combos = [(c, o) for c in COLOURS for o in ORIENTATIONS]
    order = rng.permutation(len(combos))
    return [colour_sample(rng, *combos[order[i % len(combos)]], base=base) for i in range(n)]
