"""The one validator of model-part options, shared by `build` and `export` (and their CLI).

Each check raises a ConvLlavaError (exit 2) with what is wrong and what to use instead, before
any model is loaded. What needs the machine (TensorRT-LLM installed and of a supported version,
the GPU's compute capability for a format) is checked here too, so a build that cannot finish
fails in the first second, not after the vision export.
"""

from __future__ import annotations

from .errors import BuildError
from .precisions import GQA_LLM, LLM_BACKENDS, LLM_GRAPHS, ORT_LLM, TRTLLM_ENGINE, TRTLLM_FORMATS, TRTLLM_HF, VISION


def check_vision(precision: str) -> None:
    if precision not in VISION:
        raise BuildError(f"unknown vision precision '{precision}' (use {', '.join(VISION)})")


def check_llm(backend: str, precision: str, graph: str = "dynamo", fmt: str = "engine") -> None:
    """The LLM backend makes this precision (and graph / format). `graph` is resolved (not auto)."""
    if backend not in LLM_BACKENDS:
        raise BuildError(f"unknown LLM backend '{backend}' (use {', '.join(LLM_BACKENDS)})")
    if backend == "onnxruntime":
        if precision not in ORT_LLM:
            hint = f"; {precision} is a TensorRT-LLM precision (the tensorrt-llm backend)" if precision in TRTLLM_ENGINE + TRTLLM_HF else ""
            raise BuildError(f"LLM precision '{precision}' is not available for ONNX Runtime (use {', '.join(ORT_LLM)}){hint}")
        if graph not in LLM_GRAPHS:
            raise BuildError(f"unknown LLM graph '{graph}' (use {', '.join(LLM_GRAPHS)})")
        if graph == "gqa":
            from .export.llm_gqa import genai_available

            if precision not in GQA_LLM:
                raise BuildError(f"the gqa graph builds {', '.join(GQA_LLM)}; for '{precision}' use the dynamo graph")
            if not genai_available():
                raise BuildError("the gqa graph needs onnxruntime-genai's model builder: pip install 'convllava-export[genai]'")
        return
    if fmt not in TRTLLM_FORMATS:
        raise BuildError(f"unknown TensorRT-LLM format '{fmt}' (use {', '.join(TRTLLM_FORMATS)})")
    from .engines.tensorrt_llm import check_precision

    check_precision(precision, fmt)  # the name only; the GPU is checked by check_trtllm_here


def check_trtllm_here(precision: str, target: str) -> tuple[int, int]:
    """This machine can build and run a TensorRT-LLM engine of `precision`: TensorRT-LLM of a
    supported version with `trtllm-build`, and a GPU that runs the format. Returns its compute
    capability. (A checkpoint, `export llm --backend tensorrt-llm`, needs none of this.)"""
    import shutil

    from .engines.tensorrt_llm import check_runs_here, check_trtllm_version, local_compute_capability
    from .extras import require
    from .targets import jetson_target_for

    trtllm = require("tensorrt_llm", "trtllm", "TensorRT-LLM engines")
    cc = local_compute_capability()
    if cc is None:
        raise BuildError("the TensorRT-LLM engine flow builds on the GPU that runs it, and no CUDA GPU is visible here")
    board = jetson_target_for(cc)  # the Jetson rules follow the GPU, whatever --target says (cuda on an Orin)
    check_trtllm_version(trtllm.__version__, board.name if board else target)
    if shutil.which("trtllm-build") is None:
        raise BuildError("trtllm-build is not on PATH: install TensorRT-LLM 0.12-1.2.x on the GPU machine (pip install 'convllava-export[trtllm]')")
    check_runs_here(precision, cc)
    return cc
