"""Reusable calibration sets (`convllava-export calibrate`): deterministic, size-bounded, no pickle.

CALIB/
  calib.json     what it holds: source images, preprocessing, questions, shapes, sizes
  vision.npz     preprocessed pixel_values, one array per image ([1,3,H,W], mixed shapes)
  llm.npz        spliced multimodal prompt embeddings, one array per prompt ([S,hidden])
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConvLlavaError
from ..preprocess import PreprocessConfig
from .images import find_images, load_calibration_pixels, synthetic_pixels
from .prompts import load_questions, multimodal_sequences

SCHEMA = 1


def write_calibration_set(
    model, images: str | os.PathLike, dest: Path, cfg: PreprocessConfig, questions: list[str], limit: int = 64, max_mb: float = 512.0, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Preprocess images in sorted order until `limit` images or `max_mb` megabytes."""
    files = find_images(images)[:limit]
    pixels = load_calibration_pixels(images, cfg, limit, progress)
    budget = int(max_mb * 1e6)
    kept, used = [], 0
    for px in pixels:
        if used + px.nbytes > budget and kept:
            progress(f"size bound reached ({max_mb} MB): keeping {len(kept)} of {len(pixels)} images")
            break
        kept.append(px)
        used += px.nbytes
    seqs = multimodal_sequences(model, kept, questions)
    dest.mkdir(parents=True, exist_ok=True)
    np.savez(dest / "vision.npz", **{f"p{i:05d}": p for i, p in enumerate(kept)})
    np.savez(dest / "llm.npz", **{f"s{i:05d}": s.astype(np.float32) for i, s in enumerate(seqs)})
    meta = {
        "schema": SCHEMA,
        "checkpoint_fingerprint": model.info.fingerprint(),
        "preprocess": cfg.to_dict(),
        "images": [f.name for f in files[: len(kept)]],
        "shapes": [list(p.shape) for p in kept],
        "questions": questions,
        "vision_bytes": used,
        "llm_sequences": len(seqs),
    }
    (dest / "calib.json").write_text(json.dumps(meta, indent=2))
    return meta


def make_calibration_set(
    checkpoint: str | os.PathLike, images: str | os.PathLike, dest: str | os.PathLike, prompts: str | os.PathLike | None = None, limit: int = 64, max_mb: float = 512.0,
    mode: str = "pad", resolution: int | None = None, max_tokens: int | None = None, vision_tower: str | os.PathLike | None = None, force: bool = False,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`convllava-export calibrate`: the checkpoint's reference model splices the prompts; the set
    is written beside `dest` and moved into place when complete. Returns its calib.json."""
    from ..fsutil import atomic_output_dir, check_destination
    from ..model.reference import ReferenceModel

    check_destination(dest, force)  # before the questions are read and the model loads
    questions = load_questions(prompts)
    ref = ReferenceModel.load(checkpoint, vision_tower=vision_tower, dtype="auto", progress=progress)
    cfg = PreprocessConfig.from_preprocessor_config(ref.info.preprocessor_config, mode=mode, resolution=resolution, max_tokens=max_tokens)
    with atomic_output_dir(dest, force) as tmp:
        return write_calibration_set(ref, images, tmp, cfg, questions, limit, max_mb, progress=progress)


def read_calibration_set(folder: str | os.PathLike, cfg: PreprocessConfig | None = None) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    """(pixels, llm sequences, meta); refuses a set preprocessed differently from `cfg`."""
    folder = Path(folder)
    meta_path = folder / "calib.json"
    if not meta_path.is_file():
        raise ConvLlavaError(f"{folder} is not a calibration set (no calib.json); make one with `convllava-export calibrate`")
    meta = json.loads(meta_path.read_text())
    if meta.get("schema") != SCHEMA:
        raise ConvLlavaError(f"{meta_path}: unsupported calibration-set schema {meta.get('schema')}")
    if cfg is not None:
        want, got = cfg.to_dict(), meta["preprocess"]
        diff = [k for k in ("mode", "resolution", "max_tokens", "size") if want.get(k) != got.get(k)]
        if diff:
            raise ConvLlavaError(
                f"calibration set {folder} was preprocessed with {', '.join(f'{k}={got.get(k)}' for k in diff)} but this export uses "
                f"{', '.join(f'{k}={want.get(k)}' for k in diff)}; recreate it with the same --mode/--resolution/--max-tokens"
            )
    with np.load(folder / "vision.npz") as v:
        pixels = [v[k] for k in sorted(v.files)]
    with np.load(folder / "llm.npz") as s:
        seqs = [s[k] for k in sorted(s.files)]
    return pixels, seqs, meta


def multimodal_calibration(
    model: Any,
    cfg: PreprocessConfig,
    calib: str | os.PathLike | None = "builtin",
    limit: int = 32,
    prompts: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """(images, spliced prompts, source): what LLM quantization calibrates on (TensorRT-LLM
    exports, simulated builds). Images from 'builtin', a folder or a `calibrate` set (at most
    `limit`), and one multimodal prompt per image: its fp32 features spliced into a templated
    question from `prompts` (JSONL; default: built in). A `calibrate` set brings its own spliced
    prompts (at most `limit`)."""
    calib = calib or "builtin"
    pixels, source = calibration_source(calib, cfg, limit, progress=progress)
    if calib != "builtin" and (Path(calib) / "calib.json").is_file():
        _, seqs, _ = read_calibration_set(calib, cfg)
        seqs = seqs[:limit]
    else:
        seqs = multimodal_sequences(model, pixels, load_questions(prompts))
    if not pixels or not seqs:
        raise ConvLlavaError(f"no calibration data from {source}")
    return pixels, list(seqs), source


def calibration_source(source: str | os.PathLike | None, cfg: PreprocessConfig, limit: int = 64, progress: Callable[[str], None] | None = None) -> tuple[list[np.ndarray], str]:
    """Pixels from 'builtin', a calibration set (folder with calib.json) or a folder of images."""
    if source in (None, "builtin"):
        return synthetic_pixels(cfg, n=max(8, min(limit, 24))), "builtin synthetic images"
    if (Path(source) / "calib.json").is_file():
        pixels, _, _ = read_calibration_set(source, cfg)
        return pixels[:limit], f"calibration set {source}"
    return load_calibration_pixels(source, cfg, limit, progress), str(source)
