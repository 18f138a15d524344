"""TensorRT vision engines: build from the ONNX graph, save with metadata, load safely, run.

The plan (network flags, builder flags, profile, compatibility rules, timing-cache key, I/O
dtypes) is plain code over plain data, tested without a GPU. Only `build_engine`,
`load_engine` and `TrtVision` touch TensorRT itself, and import it only when called.

- TensorRT 10.x (and JetPack 6 on Orin): weak typing still exists, so reduced precision comes
  from builder flags (FP16; INT8/FP8 with the graph's explicit Q/DQ).
- TensorRT 11.x: every network is strongly typed and the precision flags are removed
  (TensorRT 11 migration guide, "Strongly Typed Networks Are Now Required"); precision must
  already be in the ONNX (fp16 casts, Q/DQ nodes): no precision or network flags are set.

Version-compatible engines embed TensorRT's lean runtime (see `plan_build` and
`check_engine_compat` for why, and docs/tensorrt.md).

Jetson: which TensorRT versions and precisions a Jetson target builds is decided in
`convllava_export.targets` (`check_target`); `plan_build` applies it. The engine metadata records
the L4T / JetPack release of a Jetson build (`jetson_identity`), and `check_engine_compat`
refuses an engine from another L4T release, or one built on a Jetson loaded elsewhere (and the
reverse).

Modules, one job each:

- `versions`: TensorRT version strings, and which versions load a version-compatible engine
- `plan`: `plan_build` / `BuildPlan`, what a build decides
- `timing_cache`: the builder's timing cache, keyed per GPU and TensorRT version
- `device`: `gpu_identity`, `jetson_identity` (L4T / JetPack) of this machine
- `metadata`: vision.engine.json (`engine_metadata`) and the load rules (`check_engine_compat`)
- `tensors`: I/O tensor names and TensorRT dtypes as numpy / torch types
- `library`: the lazy `tensorrt` import and the process-wide TensorRT logger
- `builder`: `build_engine`, the TensorRT builder calls
- `runner`: `load_engine` and `TrtVision`, loading and running an engine
"""

from __future__ import annotations

from ...targets import parse_trt_version
from .builder import build_engine
from .device import NV_TEGRA_RELEASE, gpu_identity, jetson_identity, parse_jetpack_version, parse_l4t_release
from .metadata import ENGINE, ENGINE_META, check_engine_compat, check_jetson_compat, engine_metadata, runtime_settings
from .plan import LEAN_EMBEDDED, BuildPlan, plan_build, plan_to_dict
from .runner import TrtVision, load_engine
from .tensors import (
    INPUT_NAME,
    OUTPUT_NAME,
    TRT_FLOAT_TO_TORCH,
    TRT_TO_NUMPY,
    IoPlan,
    check_io_tensors,
    numpy_dtype,
    plan_io,
    resolved_shape,
    trt_dtype_name,
)
from .timing_cache import Progress, read_timing_cache, timing_cache_key, timing_cache_path, write_timing_cache
from .versions import CROSS_MAJOR_COMPAT, VERSION_COMPAT_MIN, trt_major

__all__ = [
    "CROSS_MAJOR_COMPAT",
    "ENGINE",
    "ENGINE_META",
    "INPUT_NAME",
    "LEAN_EMBEDDED",
    "NV_TEGRA_RELEASE",
    "OUTPUT_NAME",
    "TRT_FLOAT_TO_TORCH",
    "TRT_TO_NUMPY",
    "VERSION_COMPAT_MIN",
    "BuildPlan",
    "IoPlan",
    "Progress",
    "TrtVision",
    "build_engine",
    "check_engine_compat",
    "check_io_tensors",
    "check_jetson_compat",
    "engine_metadata",
    "gpu_identity",
    "jetson_identity",
    "load_engine",
    "numpy_dtype",
    "parse_jetpack_version",
    "parse_l4t_release",
    "parse_trt_version",
    "plan_build",
    "plan_io",
    "plan_to_dict",
    "read_timing_cache",
    "resolved_shape",
    "runtime_settings",
    "timing_cache_key",
    "timing_cache_path",
    "trt_dtype_name",
    "trt_major",
    "write_timing_cache",
]
