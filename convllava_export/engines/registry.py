"""One registry of runtime backends, keyed by what a build's manifest names.

`manifest.vision.backend` picks the vision loader (onnxruntime, tensorrt, torch) and
`manifest.llm.backend` the LLM loader (onnxruntime, whose decoder.json says dynamo or gqa
layout; tensorrt-llm; torch). `torch` loads the build's source checkpoint: the reference, to
put beside a build's other part when looking for where a difference comes from (`run
--vision-backend torch`, `run --llm-backend torch`). A loader takes a `LoadContext` and returns (backend, description);
backends follow runtime/pipeline.py's VisionBackend and runtime/generation.py's Decoder or
Generator contracts. Imports of torch, ONNX Runtime, TensorRT and TensorRT-LLM happen inside
the loaders, so only the backend a build uses is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..manifest import Manifest
from ..precisions import LLM_RUNTIMES, VISION_RUNTIMES


@dataclass(frozen=True)
class LoadContext:
    folder: Path
    manifest: Manifest
    threads: int | None = None
    device: str = "cpu"  # where ONNX Runtime runs: the target's device unless overridden
    prefill: str = "auto"  # --llm-kernel of a gqa int4/int8 graph (precisions.PREFILL_KERNELS)


Loader = Callable[[LoadContext], tuple[Any, str]]
VISION: dict[str, Loader] = {}
LLM: dict[str, Loader] = {}


def _register(table: dict[str, Loader], known: tuple[str, ...], name: str) -> Callable[[Loader], Loader]:
    assert name in known, f"{name} is not in precisions.py's list {known}"

    def add(fn: Loader) -> Loader:
        table[name] = fn
        return fn

    return add


def open_backend(part: str, ctx: LoadContext, name: str | None = None) -> tuple[Any, str]:
    """The `part` ('vision' or 'llm') backend named by the manifest, or `name` to override it."""
    table = VISION if part == "vision" else LLM
    name = name or ctx.manifest.part(part).backend
    if name not in table:
        raise BuildError(f"unknown {part} backend '{name}' (this version runs {', '.join(table)}); upgrade convllava-export or rebuild")
    return table[name](ctx)


# ---------------------------------------------------------------------------------------------
# vision


@_register(VISION, VISION_RUNTIMES, "onnxruntime")
def _ort_vision(ctx: LoadContext) -> tuple[Any, str]:
    from .onnxruntime import OrtVision
    from .profiles import VisionProfile

    part = ctx.manifest.vision
    graph = (part.ort_graph if ctx.device == "cpu" else None) or part.graph  # the CPU-optimized graph where built
    vision = OrtVision(ctx.folder / graph, ctx.device, ctx.threads, VisionProfile.from_dict(part.profile))
    return vision, f"onnxruntime {part.precision} ({ctx.device})"


@_register(VISION, VISION_RUNTIMES, "tensorrt")
def _trt_vision(ctx: LoadContext) -> tuple[Any, str]:
    from .tensorrt import TrtVision

    return TrtVision(ctx.folder / "vision"), f"tensorrt {ctx.manifest.vision.precision}"


@_register(VISION, VISION_RUNTIMES, "torch")
def _torch_vision(ctx: LoadContext) -> tuple[Any, str]:
    from ..model.reference import ReferenceModel, TorchVision

    src = _source(ctx)
    ref = ReferenceModel.load(src["checkpoint"], vision_tower=src.get("vision_tower"), load_llm=False)
    return TorchVision(ref), "torch fp32 (the source checkpoint)"


# ---------------------------------------------------------------------------------------------
# LLM


@_register(LLM, LLM_RUNTIMES, "onnxruntime")
def _ort_llm(ctx: LoadContext) -> tuple[Any, str]:
    from .onnxruntime import open_decoder

    part = ctx.manifest.llm
    decoder = open_decoder(ctx.folder / part.folder, ctx.device, ctx.threads, ctx.prefill)
    if decoder.prefill_kernel == "q4":  # the graph's weights, every step on our kernel: no ORT session
        return decoder, f"q4 kernel {part.precision} ({part.graph} graph's weights, {ctx.device}, prompt and decode)"
    prompt = f", {decoder.prefill_kernel} prompt kernel" if decoder.prefill_kernel != "onnxruntime" else ""
    return decoder, f"onnxruntime {part.precision} ({part.graph} graph, {ctx.device}{prompt})"


@_register(LLM, LLM_RUNTIMES, "tensorrt-llm")
def _trtllm(ctx: LoadContext) -> tuple[Any, str]:
    from .tensorrt_llm import TrtLlmGenerator

    part = ctx.manifest.llm
    return TrtLlmGenerator(ctx.folder / part.folder), f"tensorrt-llm {part.precision}"


@_register(LLM, LLM_RUNTIMES, "torch")
def _torch_llm(ctx: LoadContext) -> tuple[Any, str]:
    from ..model.reference import ReferenceModel, TorchDecoder

    src = _source(ctx)
    ref = ReferenceModel.load(src["checkpoint"], vision_tower=src.get("vision_tower"), dtype="auto", load_vision=False)
    return TorchDecoder(ref), f"torch {str(ref.dtype).replace('torch.', '')} (the source checkpoint)"


def _source(ctx: LoadContext) -> dict[str, Any]:
    src = ctx.manifest.source
    if not src.get("checkpoint") or not Path(src["checkpoint"]).is_dir():
        raise BuildError(f"the torch backend loads the build's source checkpoint, and {src.get('checkpoint')!r} is not a folder here")
    return src
