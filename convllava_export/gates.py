"""The smoke-test gates `build` enforces; each precision row (precisions.py) holds its default.

A build is measured on the engines that ship (the TensorRT engine for TensorRT targets), on
one synthetic image and question, against the torch reference:
- vision: cosine of image_embeds;
- LLM: teacher-forced top-1 agreement on the reference's greedy answer (the build's next-token
  choice at each position of that answer, given the same prefix; unlike comparing two free
  runs, one early difference does not zero the rest).
Below a threshold the build stops with exit 1 and writes nothing. The defaults are set so a
correct export passes with margin on a trained model (the tiny models: cosine >= 0.99, top-1
>= 0.95 at int4) while a broken one (wrong layout, wrong scales, wrong dtype) does not.
Random-weight checkpoints (benchmarks) have near-flat logits, so their agreement means
nothing: pass --min-token-agreement 0 there and say so.
"""

from __future__ import annotations

from typing import Any

from .errors import GateError
from .precisions import precision


def thresholds(
    vision: tuple[str, str], llm: tuple[str, str], min_cosine: float | None = None, min_agreement: float | None = None
) -> dict[str, float]:
    """The gates of a build of (backend, precision) `vision` and `llm`: each row's default unless
    overridden. An unknown precision is refused (precisions.refuse), never given a default."""
    return {
        "vision_cosine": precision("vision", *vision).gate if min_cosine is None else float(min_cosine),
        "token_agreement": precision("llm", *llm).gate if min_agreement is None else float(min_agreement),
    }


def check(figures: dict[str, float], limits: dict[str, float]) -> dict[str, Any]:
    """The manifest's `gates` section; raises GateError naming each figure below its threshold."""
    failed = [f"{k} {figures[k]:.4f} < {limits[k]}" for k in limits if not figures[k] >= limits[k]]
    result = {"thresholds": limits, "figures": {k: figures[k] for k in limits}, "passed": not failed}
    if failed:
        raise GateError(
            f"smoke test below threshold: {'; '.join(failed)}. The build was not written (a previous one is kept). "
            "Check the calibration images and precision, compare with `convllava-export validate`, or lower the gate "
            "(--min-vision-cosine / --min-token-agreement) if this is expected, e.g. for random weights."
        )
    return result
