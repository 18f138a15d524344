"""Validation data: JSONL, a folder of images with one question, or a built-in synthetic set.

The built-in set is generated on the fly (no download), at mixed aspect ratios including very
wide and very tall images, with answers that can be checked:
- colour: dominant colour and orientation (what the tiny demo model was trained on)
- document: rendered text lines (scored with ANLS)
- chart: a bar chart; the question asks for the tallest bar's label
- shapes: count of circles of a named colour
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..calibration.images import find_images
from ..errors import ConvLlavaError
from ..synthetic import COLOURS, colour_sample

KINDS = ("colour", "document", "chart", "shapes")
WORDS = "alpha bravo delta echo golf hotel india kilo lima mike oscar papa romeo sierra tango victor".split()


@dataclass
class Item:
    id: str
    image: Image.Image | str
    question: str
    answers: list[str] = field(default_factory=list)
    metric: str = "em"  # "em" (normalized exact match) or "anls"
    kind: str = "custom"


def _document(rng: np.random.Generator, i: int) -> Item:
    words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 5)))]
    text = " ".join(words)
    w = int(rng.choice([512, 1024, 1536]))
    h = int(rng.choice([96, 128, 192]))
    img = Image.new("RGB", (w, h), (250, 250, 245))
    ImageDraw.Draw(img).text((10, h // 3), text, fill=(10, 10, 10))
    return Item(f"document-{i}", img, "What text is written in this image?", [text], "anls", "document")


def _chart(rng: np.random.Generator, i: int) -> Item:
    labels = [str(w) for w in rng.choice(WORDS, size=4, replace=False)]
    values = rng.permutation([3, 5, 7, 9])
    h, w = int(rng.choice([640, 896])), 256
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for k, (lab, v) in enumerate(zip(labels, values)):
        x = 20 + k * 58
        d.rectangle([x, h - 40 - int(v) * 50, x + 40, h - 40], fill=(40, 90, 200))
        d.text((x, h - 30), lab[:6], fill=(0, 0, 0))
    best = labels[int(np.argmax(values))]
    return Item(f"chart-{i}", img, "Which bar is the tallest?", [best], "em", "chart")


def _shapes(rng: np.random.Generator, i: int) -> Item:
    colour = str(rng.choice(["red", "green", "blue"]))
    n = int(rng.integers(1, 6))
    w, h = int(rng.choice([384, 768])), 384
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for k in range(n):
        x = 20 + k * (w - 40) // 5
        d.ellipse([x, 150, x + 50, 200], fill=COLOURS[colour])
    return Item(f"shapes-{i}", img, f"How many {colour} circles are there?", [str(n)], "em", "shapes")


def builtin_items(n: int = 24, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[Item]:
    """n synthetic items cycling through `kinds`; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    out: list[Item] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "colour":
            s = colour_sample(rng)
            out.append(Item(f"colour-{i}", s.image, s.question, [s.answer], "em", "colour"))
        elif kind == "document":
            out.append(_document(rng, i))
        elif kind == "chart":
            out.append(_chart(rng, i))
        elif kind == "shapes":
            out.append(_shapes(rng, i))
        else:
            raise ConvLlavaError(f"unknown built-in kind '{kind}' (known: {', '.join(KINDS)})")
    return out


def load_items(data: str | os.PathLike, question: str | None = None, limit: int | None = None, seed: int = 0) -> list[Item]:
    """`builtin[:kind,kind][:N]`, a JSONL file, or a folder of images (needs `question`)."""
    text = str(data)
    if text.startswith("builtin"):
        parts = text.split(":")[1:]
        kinds = KINDS
        n = limit or 24
        for p in parts:
            if p.isdigit():
                n = int(p)
            elif p:
                kinds = tuple(p.split(","))
        return builtin_items(n, seed, kinds)
    path = Path(data)
    if path.is_file():
        items = []
        for k, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = Path(row["image"])
                q = row["question"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConvLlavaError(f"{path}:{k}: expected {{\"image\": path, \"question\": str, \"answers\": [str, ...]}}") from None
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                raise ConvLlavaError(f"{path}:{k}: image not found: {image}")
            answers = row.get("answers") or []
            items.append(Item(row.get("id", f"{path.stem}-{k}"), str(image), q, [str(a) for a in answers], row.get("metric", "em"), row.get("kind", "custom")))
        if not items:
            raise ConvLlavaError(f"{path} holds no items")
        return items[:limit] if limit else items
    if path.is_dir():
        if not question:
            raise ConvLlavaError("a folder of images needs --question TEXT (one question asked of every image)")
        files = find_images(path)
        items = [Item(f.name, str(f), question) for f in files]
        return items[:limit] if limit else items
    raise ConvLlavaError(f"validation data '{data}' is neither 'builtin', a JSONL file nor a folder of images")
