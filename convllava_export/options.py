"""The one validator of model-part options, shared by `build` and `export` (and their CLI).

Each check raises a ConvLlavaError (exit 2) with what is wrong and what to use instead, before
any model is loaded. What needs the machine (TensorRT-LLM installed and of a supported version,
the GPU's compute capability for a format) is checked here too, so a build that cannot finish
fails in the first second, not after the vision export.
"""

from __future__ import annotations

from .errors import BuildError
from .precisions import Precision, precision


def check_vision(backend: str, name: str) -> Precision:
    """The vision row (`backend`: onnxruntime or tensorrt, from the target)."""
    return precision("vision", backend, name)


def check_llm(backend: str, name: str, graph: str = "dynamo", fmt: str = "engine") -> Precision:
    """The LLM row of this backend for this graph (onnxruntime, resolved: not auto) or format
    (tensorrt-llm). Only the names here; the GPU is checked by check_trtllm_here."""
    row = precision("llm", backend, name, **({"graph": graph} if backend == "onnxruntime" else {"format": fmt}))
    if backend == "onnxruntime" and graph == "gqa":
        from .export.llm_gqa import genai_available

        if not genai_available():
            raise BuildError("the gqa graph needs onnxruntime-genai's model builder: pip install 'convllava-export[genai]'")
    return row


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
