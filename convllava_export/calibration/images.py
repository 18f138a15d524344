"""Calibration images: a folder of any Pillow format, preprocessed exactly as at inference."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ImageError
from ..preprocess import PreprocessConfig, load_image, preprocess

IGNORED = {".json", ".jsonl", ".txt", ".md", ".csv"}


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Every file in `folder` (recursively, sorted) except sidecar text files."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageError(f"calibration folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IGNORED)
    if not files:
        raise ImageError(f"calibration folder {root} holds no images; add images of the kind you will serve")
    return files


def load_calibration_pixels(
    folder: str | os.PathLike,
    cfg: PreprocessConfig,
    limit: int = 64,
    progress: Callable[[str], None] | None = None,
) -> list[np.ndarray]:
    """Preprocess up to `limit` images → list of [1,3,H,W] arrays (shapes differ in native mode).

    A file that is not an image is an error naming the file: calibrating on fewer images than
    the user believes would silently change the quantization.
    """
    files = find_images(folder)[:limit]
    out = []
    for i, f in enumerate(files, 1):
        try:
            out.append(preprocess(load_image(f), cfg)[None])
        except ImageError as exc:
            raise ImageError(f"calibration folder: {exc}. Remove the file or fix it.") from None
        if progress and (i % 16 == 0 or i == len(files)):
            progress(f"preprocessed {i}/{len(files)} calibration images")
    return out


def synthetic_pixels(cfg: PreprocessConfig, n: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Built-in calibration set: synthetic images at wide, tall and square aspect ratios."""
    from ..synthetic import colour_samples

    return [preprocess(s.image, cfg)[None] for s in colour_samples(n, seed=seed)]


def split_heldout(pixels: list[np.ndarray], fraction: float = 0.25) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration, held-out). With a single image both are that image."""
    if len(pixels) < 2:
        return pixels, pixels
    k = max(1, int(round(len(pixels) * fraction)))
    return pixels[:-k], pixels[-k:]
