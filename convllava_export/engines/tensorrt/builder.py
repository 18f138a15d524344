"""Building a plan with TensorRT: parse the ONNX graph, configure the builder from a `BuildPlan`,
build with the timing cache, and write the engine and its metadata into the build folder."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import ExportError
from . import device
from .library import import_tensorrt, shared_logger
from .metadata import ENGINE, ENGINE_META, engine_metadata
from .plan import BuildPlan
from .tensors import INPUT_NAME
from .timing_cache import Progress, attach_timing_cache, read_timing_cache, timing_cache_path, write_timing_cache


def build_engine(onnx_path: Path, folder: Path, plan: BuildPlan, timing_cache: Path | None = None, progress: Progress = print) -> Path:
    """Build and serialize the engine into `folder` with its metadata JSON; returns the engine path.

    `timing_cache` is a base path (folder or file name); the file actually used is keyed by GPU
    and TensorRT version (`timing_cache_path`).
    """
    trt = import_tensorrt()
    gpu = device.gpu_identity()
    jetson = device.jetson_identity()
    builder = trt.Builder(shared_logger(trt))
    network, parser = _parse_onnx(trt, builder, onnx_path, plan, progress)  # the parser lives until the build is done
    config = _builder_config(trt, builder, plan)
    cache_path = timing_cache_path(timing_cache, gpu, trt.__version__)
    cache = attach_timing_cache(config, read_timing_cache(cache_path, progress), cache_path, progress)
    lo, _, hi = plan.profile.shapes()
    progress(f"building TensorRT engine ({plan.precision}, profile {lo} .. {hi}); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    engine_path = folder / ENGINE
    engine_path.write_bytes(bytes(serialized))
    _save_timing_cache(cache_path, cache, progress)
    meta = engine_metadata(plan, trt.__version__, gpu, jetson, onnx_path.name)
    (folder / ENGINE_META).write_text(json.dumps(meta, indent=2))
    return engine_path


def _parse_onnx(trt, builder, onnx_path: Path, plan: BuildPlan, progress: Progress):
    """(network, parser) for the ONNX file; the parser owns the weights, so it must outlive the build."""
    net_flags = 0
    for name in plan.network_flags:
        net_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, shared_logger(trt))
    progress(f"parsing {onnx_path.name} for TensorRT {trt.__version__}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    return network, parser


def _builder_config(trt, builder, plan: BuildPlan):
    """A builder config with the plan's workspace, builder flags and optimization profile."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    lo, opt, hi = plan.profile.shapes()
    profile.set_shape(INPUT_NAME, lo, opt, hi)
    config.add_optimization_profile(profile)
    return config


def _save_timing_cache(path: Path | None, cache, progress: Progress) -> None:
    """Write the build's timing cache back (a failure to write only warns: the engine is built)."""
    if path is not None and cache is not None:
        try:
            write_timing_cache(path, bytes(cache.serialize()))
        except OSError as exc:
            progress(f"warning: could not save the TensorRT timing cache {path} ({exc})")
