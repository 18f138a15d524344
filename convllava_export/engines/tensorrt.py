"""TensorRT vision engines: build from the ONNX graph, save with metadata, load safely, run.

The plan (network flags, builder flags, profile, compatibility rules) is plain code tested
without a GPU. Only `build_engine`, `load_engine` and `TrtVision` touch TensorRT itself.

- TensorRT 10.x (and JetPack 6 on Orin): weak typing still exists, so reduced precision comes
  from builder flags (FP16; INT8/FP8 with the graph's explicit Q/DQ).
- TensorRT 11.x: every network is strongly typed; precision must already be in the ONNX
  (fp16 casts, Q/DQ nodes): no precision flags are set.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BuildError, ExportError
from ..extras import require
from .profiles import VisionProfile

ENGINE = "vision.engine"
ENGINE_META = "vision.engine.json"
FP8_MIN_CC = (8, 9)  # Ada / Hopper and newer; Jetson Orin is 8.7


def trt_major(version: str) -> int:
    return int(str(version).split(".")[0])


@dataclass
class BuildPlan:
    """Everything a build decides, computed without TensorRT."""

    precision: str
    trt_version: str
    strongly_typed: bool
    builder_flags: list[str]
    profile: VisionProfile
    version_compatible: bool = False
    workspace_bytes: int = 4 << 30
    notes: list[str] = field(default_factory=list)


def plan_build(
    precision: str,
    trt_version: str,
    profile: VisionProfile,
    compute_capability: tuple[int, int] | None = None,
    version_compatible: bool = False,
    workspace_bytes: int = 4 << 30,
) -> BuildPlan:
    """Decide network typing and builder flags for a precision on a TensorRT version and GPU."""
    profile.validate()
    if precision not in ("fp32", "fp16", "int8", "fp8"):
        raise ExportError(f"unknown TensorRT precision '{precision}'")
    if precision == "fp8" and compute_capability is not None and tuple(compute_capability) < FP8_MIN_CC:
        cc = ".".join(map(str, compute_capability))
        raise ExportError(
            f"fp8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is sm_{cc.replace('.', '')} "
            "(Jetson Orin is 8.7): use --vision-precision int8 with calibration instead"
        )
    major = trt_major(trt_version)
    notes: list[str] = []
    if major >= 11:
        strongly_typed, flags = True, []
        notes.append("TensorRT 11: strongly typed; precision comes from the ONNX graph")
    else:
        strongly_typed = False
        flags = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"]}[precision]
        notes.append("TensorRT 10: builder precision flags")
    if version_compatible:
        flags = [*flags, "VERSION_COMPATIBLE"]
        if not strongly_typed and precision != "fp32":
            notes.append("version-compatible engines restrict tactics; expect slower kernels")
    return BuildPlan(precision, str(trt_version), strongly_typed, flags, profile, version_compatible, workspace_bytes, notes)


def gpu_identity() -> dict[str, Any]:
    """Name and compute capability of GPU 0 (through torch, which the project always has)."""
    import torch

    if not torch.cuda.is_available():
        raise BuildError("no CUDA GPU is visible: TensorRT engines need one (use --target cpu for ONNX Runtime)")
    props = torch.cuda.get_device_properties(0)
    return {"gpu_name": props.name, "compute_capability": [props.major, props.minor]}


def check_engine_compat(meta: dict[str, Any], trt_version: str, gpu: dict[str, Any]) -> None:
    """Refuse an engine built for another GPU or TensorRT version, saying how to fix it."""
    built = meta.get("tensorrt_version", "?")
    if meta.get("version_compatible"):
        if trt_major(built) != trt_major(trt_version) or tuple(map(int, trt_version.split(".")[:2])) < tuple(map(int, built.split(".")[:2])):
            raise BuildError(
                f"engine was built version-compatible with TensorRT {built}; this is TensorRT {trt_version}, which cannot "
                "load it (same major version, same or newer minor needed). Rebuild it here."
            )
    elif built != trt_version:
        raise BuildError(
            f"engine was built with TensorRT {built} but this is TensorRT {trt_version}: engines are tied to the "
            "TensorRT version that built them. Rebuild it here (convllava-export build ... --target tensorrt)."
        )
    if list(meta.get("compute_capability", [])) != list(gpu["compute_capability"]):
        raise BuildError(
            f"engine was built for {meta.get('gpu_name')} (sm_{''.join(map(str, meta.get('compute_capability', [])))}) but "
            f"this GPU is {gpu['gpu_name']} (sm_{''.join(map(str, gpu['compute_capability']))}). Rebuild it on this GPU."
        )
    if meta.get("gpu_name") != gpu["gpu_name"]:
        raise BuildError(
            f"engine was built on {meta.get('gpu_name')} but this GPU is {gpu['gpu_name']}: tactics are tuned per GPU "
            "model. Rebuild it on this GPU."
        )


def build_engine(onnx_path: Path, folder: Path, plan: BuildPlan, timing_cache: Path | None = None, progress=print) -> Path:
    """Build and serialize the engine into `folder` with its metadata JSON; returns the engine path."""
    trt = require("tensorrt", "gpu", "TensorRT engines")
    gpu = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    progress(f"parsing {onnx_path.name} for TensorRT {trt.__version__}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.version_compatible:
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    profile = builder.create_optimization_profile()
    lo, opt, hi = plan.profile.shapes()
    profile.set_shape("pixel_values", lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    progress(f"building TensorRT engine ({plan.precision}, profile {lo} .. {hi}); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    engine_path = folder / ENGINE
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        tmp = timing_cache.with_suffix(".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_cache)
    meta = {
        "tensorrt_version": trt.__version__,
        **gpu,
        "precision": plan.precision,
        "strongly_typed": plan.strongly_typed,
        "builder_flags": plan.builder_flags,
        "version_compatible": plan.version_compatible,
        "profile": plan.profile.to_dict(),
        "onnx": onnx_path.name,
    }
    (folder / ENGINE_META).write_text(json.dumps(meta, indent=2))
    return engine_path


def load_engine(folder: Path):
    """Deserialize after checking metadata against this GPU and TensorRT version."""
    trt = require("tensorrt", "gpu", "TensorRT engines")
    meta_path = folder / ENGINE_META
    if not meta_path.is_file():
        raise BuildError(f"{meta_path} is missing: cannot tell which GPU and TensorRT version built the engine")
    meta = json.loads(meta_path.read_text())
    check_engine_compat(meta, trt.__version__, gpu_identity())
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if meta.get("version_compatible"):
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine((folder / ENGINE).read_bytes())
    if engine is None:
        raise BuildError(f"TensorRT could not deserialize {folder / ENGINE}")
    return engine, meta


class TrtVision:
    """Vision engine on TensorRT: host numpy in, host numpy out, torch CUDA buffers between."""

    def __init__(self, folder: Path) -> None:
        import torch

        self.torch = torch
        self.engine, self.meta = load_engine(Path(folder))
        self.profile = VisionProfile.from_dict(self.meta["profile"])
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        torch = self.torch
        self.profile.check(pixel_values.shape)
        x = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).cuda()
        self.context.set_input_shape("pixel_values", tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape("image_embeds"))
        y = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("pixel_values", x.data_ptr())
        self.context.set_tensor_address("image_embeds", y.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BuildError("TensorRT execution failed")
        self.stream.synchronize()
        return y.cpu().numpy()


def plan_to_dict(plan: BuildPlan) -> dict[str, Any]:
    d = asdict(plan)
    d["profile"] = plan.profile.to_dict()
    return d
