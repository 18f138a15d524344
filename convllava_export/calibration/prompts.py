"""Multimodal calibration prompts for the LLM: real image features spliced into templated prompts.

Calibrating the LLM on text alone misses the activation ranges of the visual rows, which are
a large share of every ConvLLaVA prompt (576 of ~600 positions at 1536²).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConvLlavaError
from ..prompt import build_prompt, splice_embeddings, tokenize_with_images

DEFAULT_QUESTIONS = (
    "What is shown in this image?",
    "Describe the image in detail.",
    "What colours dominate this picture, and what is its shape?",
    "Read any text visible in the image.",
)


def load_questions(path: str | os.PathLike | None) -> list[str]:
    """Questions from a JSONL file ({"question": ...} or {"prompt": ...} per line) or the defaults."""
    if path is None:
        return list(DEFAULT_QUESTIONS)
    p = Path(path)
    if not p.is_file():
        raise ConvLlavaError(f"prompts file not found: {p}")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(str(row.get("question") or row.get("prompt")))
        except (json.JSONDecodeError, AttributeError):
            raise ConvLlavaError(f"{p}:{n} is not a JSON object with a 'question'") from None
    if not out:
        raise ConvLlavaError(f"{p} holds no prompts")
    return out


def multimodal_sequences(model, pixels: Sequence[np.ndarray], questions: Sequence[str], answers: Sequence[str] | None = None) -> list[np.ndarray]:
    """One spliced embedding sequence per image (questions cycled), optionally with an answer."""
    out = []
    for i, px in enumerate(pixels):
        q = questions[i % len(questions)]
        prompt = build_prompt(q) + (f" {answers[i % len(answers)]}" if answers else "")
        ids = tokenize_with_images(model.tokenizer, prompt)
        embeds = model.encode_images(px)
        out.append(splice_embeddings(ids, [embeds[0]], model.embed_tokens))
    return out
