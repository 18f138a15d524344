"""The smoke-test gates `build` enforces: one table of per-precision thresholds.

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

SMOKE_GATES: dict[str, dict[str, float]] = {
    "vision": {"fp32": 0.999, "fp16": 0.995, "int8": 0.97, "fp8": 0.97},
    # ONNX Runtime fp32/fp16/int8/int4; TensorRT-LLM fp16/int8/int8-sq/fp8/int4-awq (set like
    # their ORT neighbours: not yet measured on a GPU, docs/tensorrt-llm.md)
    "llm": {"fp32": 0.98, "fp16": 0.95, "int8": 0.9, "int4": 0.8, "int8-sq": 0.9, "fp8": 0.9, "int4-awq": 0.8},
}


def thresholds(vision_precision: str, llm_precision: str, min_cosine: float | None = None, min_agreement: float | None = None) -> dict[str, float]:
    return {
        "vision_cosine": SMOKE_GATES["vision"].get(vision_precision, 0.97) if min_cosine is None else float(min_cosine),
        "token_agreement": SMOKE_GATES["llm"].get(llm_precision, 0.8) if min_agreement is None else float(min_agreement),
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
