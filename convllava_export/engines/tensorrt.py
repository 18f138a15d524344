"""TensorRT vision engines: build from the ONNX graph, save with metadata, load safely, run.

The plan (network flags, builder flags, profile, compatibility rules, timing-cache key, I/O
dtypes) is plain code over plain data, tested without a GPU. Only `build_engine`,
`load_engine` and `TrtVision` touch TensorRT itself.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import BuildError, ExportError
from ..extras import require
from ..targets import FP8_MIN_CC, TARGETS, Target, check_target, get_target, jetson_target_for, parse_trt_version
from .profiles import VisionProfile

ENGINE = "vision.engine"
ENGINE_META = "vision.engine.json"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
VERSION_COMPAT_MIN = (8, 6)  # "Version compatibility is supported from version 8.6" (both builder and runtime)
LEAN_EMBEDDED = "embedded"
# Across a major-version boundary only these (built major, runtime major) pairs load a
# version-compatible engine. TensorRT 10 docs (Version Compatibility): TensorRT 8 engines run on
# TensorRT 9 and 10; TensorRT 11.4 support matrix (Engine Portability): "TensorRT 10
# version-compatible engines can run with a TensorRT 11 runtime, and TensorRT 8 [...] with a
# TensorRT 10 runtime. No other combination across major versions is supported."
CROSS_MAJOR_COMPAT = frozenset({(8, 9), (8, 10), (10, 11)})

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# versions


# parse_trt_version (re-exported here) lives in convllava_export.targets, beside the rules that use it.


def trt_major(version: str) -> int:
    return parse_trt_version(version)[0]


def _version_str(version: str) -> str:
    return ".".join(map(str, parse_trt_version(version)))


def _release(version: str) -> tuple[int, int, int]:
    """(major, minor, patch); a missing patch counts as 0."""
    p = parse_trt_version(version)
    return (p + (0, 0))[:3]  # type: ignore[return-value]


def _same_version(a: str, b: str) -> bool:
    """Same release: equal major.minor.patch, and equal build numbers where both strings have one
    ('10.3.0' == '10.3.0.26': `tensorrt.__version__` is usually written without the build)."""
    pa, pb = parse_trt_version(a), parse_trt_version(b)
    if _release(a) != _release(b):
        return False
    return len(pa) < 4 or len(pb) < 4 or pa[3:] == pb[3:]


# ---------------------------------------------------------------------------------------------
# build plan


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
    network_flags: list[str] = field(default_factory=list)
    lean_runtime: str | None = None  # "embedded" for version-compatible engines, else None
    target: str = "tensorrt"  # the concrete build target (targets.TARGETS): tensorrt, orin, thor


def plan_build(
    precision: str,
    trt_version: str,
    profile: VisionProfile,
    compute_capability: tuple[int, int] | None = None,
    version_compatible: bool = False,
    workspace_bytes: int = 4 << 30,
    target: str | Target | None = None,
    jetson: Mapping[str, Any] | None = None,
) -> BuildPlan:
    """Decide network typing and builder flags for a precision on a TensorRT version and GPU.

    `target` is a `--target` name or `targets.Target` (`jetson` resolves to orin / thor by
    `compute_capability`); its rules (`targets.check_target`: precisions, TensorRT versions, GPU)
    are applied first. None, for callers that predate targets: a Jetson GPU (sm_87, sm_110) gets
    its Jetson target's rules, any other GPU those of `tensorrt`. `jetson` is this machine's
    `jetson_identity()` (None off Jetson); TensorRT 11 on Jetson needs its JetPack version.

    Version-compatible builds set `VERSION_COMPATIBLE` and deliberately *not*
    `EXCLUDE_LEAN_RUNTIME`. The TensorRT docs (Version Compatibility) call embedding "the
    recommended approach": the plan carries a copy of the lean runtime of the building version,
    and a newer TensorRT loads that copy to deserialize and run it, once the runtime is told to
    trust host code in the plan (`engine_host_code_allowed`). With `EXCLUDE_LEAN_RUNTIME` the
    plan only loads through `Runtime.load_runtime(path)` of a lean runtime library "built with
    the same version of TensorRT" as the plan (Runtime.load_runtime docstring; trtexec's
    `--excludeLeanRuntime`: "the user must explicitly specify a valid lean runtime"), i.e. a
    `libnvinfer_lean` of the *build* machine's TensorRT would have to be shipped beside the
    engine and match the target's CUDA/driver. The build folder is meant to be self-contained
    and checksummed as a whole, so the lean runtime goes inside the plan.
    """
    profile.validate()
    cc = (int(compute_capability[0]), int(compute_capability[1])) if compute_capability is not None else None
    if target is None:
        chosen = jetson_target_for(cc) or TARGETS["jetson" if jetson is not None else "tensorrt"]
    else:
        chosen = get_target(target) if isinstance(target, str) else target
    if chosen.backend != "tensorrt":
        raise ExportError(f"target '{chosen.name}' runs ONNX Runtime; it builds no TensorRT engine")
    if precision == "fp8" and cc is not None and cc < FP8_MIN_CC:
        raise ExportError(
            f"fp8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is sm_{''.join(map(str, cc))} "
            "(Jetson Orin is 8.7): use --vision-precision int8 with calibration instead"
        )
    chosen = check_target(chosen, precision, trt_version, cc, jetson)
    if precision not in ("fp32", "fp16", "int8", "fp8"):
        raise ExportError(f"unknown TensorRT precision '{precision}'")
    major = trt_major(trt_version)
    notes: list[str] = [f"target {chosen.name}: {chosen.description}"] if chosen.jetson else []
    if major >= 11:
        # Strong typing is always on in 11.x: create_network() takes no typing flag.
        strongly_typed, flags = True, []
        notes.append("TensorRT 11: strongly typed; precision comes from the ONNX graph")
    else:
        strongly_typed = False
        flags = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"]}[precision]
        notes.append("TensorRT 10: builder precision flags")
    lean = None
    if version_compatible:
        if parse_trt_version(trt_version)[:2] < VERSION_COMPAT_MIN:
            raise ExportError(f"version-compatible engines need TensorRT >= 8.6 to build; this is {trt_version}")
        flags = [*flags, "VERSION_COMPATIBLE"]
        lean = LEAN_EMBEDDED
        notes.append("version-compatible: the lean runtime is embedded in the plan; loading it runs host code from the plan")
        if not strongly_typed and precision != "fp32":
            notes.append("version-compatible engines restrict tactics; expect slower kernels")
    return BuildPlan(
        precision, str(trt_version), strongly_typed, flags, profile, version_compatible, workspace_bytes, notes,
        network_flags=[], lean_runtime=lean, target=chosen.name,
    )


def plan_to_dict(plan: BuildPlan) -> dict[str, Any]:
    d = asdict(plan)
    d["profile"] = plan.profile.to_dict()
    return d


# ---------------------------------------------------------------------------------------------
# timing cache


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "gpu"


def timing_cache_key(gpu: dict[str, Any], trt_version: str) -> str:
    """A file-name-safe key naming the GPU model, its compute capability and the TensorRT version.

    A timing cache records tactic timings of one device and one TensorRT build: `set_timing_cache`
    fails when "the CUDA device property in the provided cache is different from current
    environment", and `ITimingCache.combine` only accepts a cache "generated by a TensorRT build
    of exact same version". The short hash covers the exact strings so names that slug alike stay
    apart.
    """
    cc = "".join(str(int(c)) for c in gpu["compute_capability"])
    version = _version_str(trt_version)
    exact = json.dumps([gpu["gpu_name"], list(gpu["compute_capability"]), str(trt_version)])
    digest = hashlib.sha256(exact.encode()).hexdigest()[:8]
    return f"{_slug(gpu['gpu_name'])}-sm{cc}-trt{version}-{digest}"


def timing_cache_path(base: Path | str | None, gpu: dict[str, Any], trt_version: str) -> Path | None:
    """Where the timing cache for this GPU and TensorRT version lives.

    `base` is a folder (no suffix, or an existing directory): the cache is
    `base/timing-<key>.cache`; or a file name (`~/.cache/convllava-export/timing.cache`): the
    cache is its sibling `timing-<key>.cache`. None: no persistent cache.
    """
    if base is None:
        return None
    base = Path(base).expanduser()
    key = timing_cache_key(gpu, trt_version)
    if base.is_dir() or not base.suffix:
        return base / f"timing-{key}.cache"
    return base.with_name(f"{base.stem}-{key}{base.suffix}")


def read_timing_cache(path: Path | None, progress: Progress = print) -> bytes:
    """The stored cache bytes, or b"" (a fresh cache) when there is none or it cannot be read."""
    if path is None or not path.is_file():
        return b""
    try:
        return path.read_bytes()
    except OSError as exc:
        progress(f"warning: cannot read the TensorRT timing cache {path} ({exc}); starting a fresh one")
        return b""


def write_timing_cache(path: Path, data: bytes) -> None:
    """Replace `path` atomically (a unique temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _attach_timing_cache(config, blob: bytes, path: Path | None, progress: Progress):
    """Create and attach a timing cache from `blob`; a corrupt or mismatched one is replaced by a fresh one.

    `IBuilderConfig.set_timing_cache` returns False when the cache's device header does not match
    (we keep `ignore_mismatch=False`: the file is keyed per GPU and TensorRT version, so a
    mismatch means the file is wrong); `create_timing_cache` of damaged bytes may return None or
    raise. The fresh cache overwrites the bad file after the build. The returned cache must
    outlive the build ("The cache must not be destroyed until after the engine is built").
    """
    if blob:
        try:
            cache = config.create_timing_cache(blob)
            why = "could not be loaded"
            if cache is not None:
                if config.set_timing_cache(cache, ignore_mismatch=False):
                    return cache
                why = "does not match this GPU / TensorRT version"
        except Exception as exc:  # noqa: BLE001 - any failure here means "unusable cache"
            why = f"is unreadable ({exc})"
        progress(f"warning: TensorRT timing cache {path} {why}; starting a fresh one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        progress("warning: TensorRT refused a fresh timing cache; building without one")
        return None
    return cache


# ---------------------------------------------------------------------------------------------
# compatibility


def gpu_identity(device: int | None = None) -> dict[str, Any]:
    """Name and compute capability of a GPU (the current one by default), through torch."""
    import torch

    if not torch.cuda.is_available():
        raise BuildError("no CUDA GPU is visible: TensorRT engines need one (use --target cpu for ONNX Runtime)")
    index = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(index)
    return {"gpu_name": props.name, "compute_capability": [props.major, props.minor]}


NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
_L4T_LINE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")


def parse_l4t_release(text: str) -> str:
    """'# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, ...' -> '36.4.3'."""
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else ""
    m = _L4T_LINE.match(first)
    if not m:
        raise BuildError(
            f"cannot read the L4T release from '{first[:80]}' (expected '# R36 (release), REVISION: 4.3, ...' in "
            f"{NV_TEGRA_RELEASE}); is this Jetson's Jetson Linux installation intact?"
        )
    return f"{m.group(1)}.{m.group(2)}"


def parse_jetpack_version(text: str | None) -> str | None:
    """The `nvidia-jetpack` package version as a JetPack release: '6.2+b77' -> '6.2'; None when empty."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)", text or "")
    return m.group(1) if m else None


def _dpkg_jetpack() -> str | None:
    """Version of the `nvidia-jetpack` meta package, if dpkg knows it (containers often lack it)."""
    try:
        done = subprocess.run(
            ["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def jetson_identity(release_file: Path | str = NV_TEGRA_RELEASE, read_jetpack: Callable[[], str | None] | None = None) -> dict[str, Any] | None:
    """{'l4t': '36.4.3', 'jetpack': '6.2' or None} on a Jetson; None elsewhere (no L4T release file).

    L4T (Jetson Linux) comes from the first line of /etc/nv_tegra_release; JetPack from the
    `nvidia-jetpack` dpkg package when it is installed (`read_jetpack` replaces the dpkg query).
    A release file that exists but cannot be read is refused rather than guessed.
    """
    path = Path(release_file)
    if not path.is_file():
        return None
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise BuildError(f"cannot read {path} ({exc}): the L4T release of this Jetson is needed to build or load engines") from None
    return {"l4t": parse_l4t_release(text), "jetpack": parse_jetpack_version((read_jetpack or _dpkg_jetpack)())}


def _l4t_release(ident: Mapping[str, Any]) -> tuple[int, int] | None:
    """(major, minor) of an identity's L4T ('36.4.3' -> (36, 4)); None when missing or unreadable."""
    parts = str(ident.get("l4t") or "").split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        return None
    return int(parts[0]), int(parts[1])


def _describe_jetson(ident: Mapping[str, Any]) -> str:
    jetpack = f", JetPack {ident['jetpack']}" if ident.get("jetpack") else ""
    return f"L4T r{ident.get('l4t')}{jetpack}"


def check_jetson_compat(meta: dict[str, Any], jetson: Mapping[str, Any] | None) -> None:
    """Refuse an engine built for another L4T release, or on a Jetson when this is none (and the reverse).

    An engine's metadata has `jetson`: the builder's `jetson_identity()` (None when it was not a
    Jetson). Engines from before it was recorded have no such key and are not checked here (the
    TensorRT-version and GPU checks still apply). L4T major.minor must match (r36.4.0 and r36.4.3
    are one release; r36.3 and r36.4 are not): the release fixes the TensorRT, CUDA and driver.
    """
    if "jetson" not in meta:
        return
    built = meta["jetson"]
    if built and not jetson:
        raise BuildError(
            f"engine was built on a Jetson ({_describe_jetson(built)}) but this machine is not one "
            f"({NV_TEGRA_RELEASE} is missing). Rebuild it here (convllava-export build ... --target tensorrt)."
        )
    if jetson and not built:
        raise BuildError(
            f"engine was built off Jetson but this machine is a Jetson ({_describe_jetson(jetson)}). "
            "Rebuild it here (convllava-export build ... --target jetson)."
        )
    if built and jetson:
        rb, rh = _l4t_release(built), _l4t_release(jetson)
        if rb is None:
            raise BuildError(f"engine metadata names L4T '{built.get('l4t')}', which cannot be compared with this Jetson's. Rebuild it here.")
        if rb != rh:
            raise BuildError(
                f"engine was built on {_describe_jetson(built)} but this Jetson runs {_describe_jetson(jetson)}: an L4T "
                "release fixes the TensorRT, CUDA and driver an engine was built against. Rebuild it here (--target jetson)."
            )


def check_engine_compat(meta: dict[str, Any], trt_version: str, gpu: dict[str, Any], jetson: Mapping[str, Any] | None = None) -> None:
    """Refuse an engine this TensorRT and GPU cannot load, saying how to fix it.

    - Plain engines load only on the TensorRT version that built them.
    - Version-compatible engines with the lean runtime embedded (`lean_runtime: "embedded"`) load
      on the same or a newer TensorRT of the same major version, or across the major-version pairs
      TensorRT documents (`CROSS_MAJOR_COMPAT`: 10 -> 11, 8 -> 9/10); never on an older one.
    - Version-compatible engines without `lean_runtime` in their metadata were built by an
      earlier convllava-export with `EXCLUDE_LEAN_RUNTIME`; they need `load_runtime()` of the
      building version's lean library, which a build folder does not carry: refused, rebuild.
    - Version compatibility is not hardware compatibility: the GPU model must still match.
    - Jetson (`check_jetson_compat`): the L4T release must match, and an engine built on a Jetson
      does not load off one, nor the reverse. `jetson` is this machine's `jetson_identity()`.
    """
    check_jetson_compat(meta, jetson)
    built = str(meta.get("tensorrt_version", "?"))
    try:
        pb, pr = parse_trt_version(built), parse_trt_version(trt_version)
    except BuildError:
        raise BuildError(
            f"engine metadata names TensorRT version '{built}', which cannot be compared with {trt_version}. Rebuild it here."
        ) from None
    if meta.get("version_compatible"):
        if meta.get("lean_runtime") != LEAN_EMBEDDED:
            raise BuildError(
                f"engine was built version-compatible with TensorRT {built} without an embedded lean runtime "
                "(EXCLUDE_LEAN_RUNTIME), so only that version's lean runtime library could load it and the build "
                "does not include one. Rebuild it (convllava-export build ... --target tensorrt)."
            )
        if pb[:2] < VERSION_COMPAT_MIN or pr[:2] < VERSION_COMPAT_MIN:
            raise BuildError(f"version compatibility needs TensorRT >= 8.6 on both sides (built {built}, this is {trt_version}). Rebuild it here.")
        same_major = pb[0] == pr[0]
        if _release(trt_version) < _release(built) or not (same_major or (pb[0], pr[0]) in CROSS_MAJOR_COMPAT):
            raise BuildError(
                f"engine was built version-compatible with TensorRT {built}; this is TensorRT {trt_version}, which cannot "
                "load it (a version-compatible engine loads on the same or a newer TensorRT of the same major version, "
                "or TensorRT 10 engines on TensorRT 11). Rebuild it here."
            )
    elif not _same_version(built, trt_version):
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


def runtime_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """Runtime attributes to set before deserializing an engine with this metadata.

    An embedded lean runtime is host code inside the plan: TensorRT deserializes such a plan only
    when `Runtime.engine_host_code_allowed` is True ("only deserialize trusted plans this way").
    The plan is trusted because `Pipeline.from_build` verifies the build's checksums first.
    """
    return {"engine_host_code_allowed": bool(meta.get("version_compatible")) and meta.get("lean_runtime") == LEAN_EMBEDDED}


# ---------------------------------------------------------------------------------------------
# I/O tensors and dtypes

# TensorRT DataType member names -> numpy (None: numpy has no such type).
TRT_TO_NUMPY: dict[str, Any] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "BF16": None,
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "FP8": None,
    "INT4": None,
    "FP4": None,
}
# Float types a device buffer for `pixel_values` / `image_embeds` may have -> torch dtype name.
TRT_FLOAT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}


def trt_dtype_name(dtype: Any) -> str:
    """'HALF' from trt.DataType.HALF (pybind enum `.name`) or from the string 'DataType.HALF'."""
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = str(dtype)
    return name.rsplit(".", 1)[-1].upper()


def numpy_dtype(trt_name: str) -> np.dtype:
    """The numpy dtype of a TensorRT DataType name; refuses types numpy lacks."""
    name = trt_dtype_name(trt_name)
    if name not in TRT_TO_NUMPY:
        raise BuildError(f"unknown TensorRT data type {name}")
    dt = TRT_TO_NUMPY[name]
    if dt is None:
        raise BuildError(f"TensorRT data type {name} has no numpy equivalent")
    return dt


@dataclass(frozen=True)
class IoPlan:
    """Device buffer dtypes for the engine's tensors; the host side is always fp32."""

    input_torch: str
    output_torch: str
    cast_input: bool  # host fp32 is uploaded, then cast on the device to the engine's input type
    cast_output: bool  # the engine's output is cast to fp32 on the device before the copy back


def plan_io(input_dtype: str, output_dtype: str) -> IoPlan:
    """Buffers for `pixel_values` / `image_embeds` of the given TensorRT dtypes (names or enums)."""
    i, o = trt_dtype_name(input_dtype), trt_dtype_name(output_dtype)
    for what, name in ((INPUT_NAME, i), (OUTPUT_NAME, o)):
        if name not in TRT_FLOAT_TO_TORCH:
            raise BuildError(
                f"engine tensor '{what}' is {name}; only FLOAT, HALF or BF16 are supported (keep the graph's I/O in "
                "floating point). Rebuild it from this tool's ONNX export."
            )
    return IoPlan(TRT_FLOAT_TO_TORCH[i], TRT_FLOAT_TO_TORCH[o], i != "FLOAT", o != "FLOAT")


def check_io_tensors(inputs: list[str], outputs: list[str]) -> None:
    """The engine must take exactly `pixel_values` and produce `image_embeds`."""
    if list(inputs) != [INPUT_NAME] or OUTPUT_NAME not in outputs:
        raise BuildError(
            f"engine has inputs {list(inputs)} and outputs {list(outputs)}; expected input '{INPUT_NAME}' and output "
            f"'{OUTPUT_NAME}'. Rebuild it from this tool's ONNX export."
        )


def resolved_shape(dims: Any, name: str) -> tuple[int, ...]:
    """A tensor shape with every dimension known (TensorRT reports -1 for unresolved ones)."""
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise BuildError(f"TensorRT could not resolve the shape of '{name}' ({shape}); the input shape was not accepted")
    return shape


# ---------------------------------------------------------------------------------------------
# TensorRT: build, load, run

_TRT_LOGGER = None


def _logger(trt):
    """One process-wide logger: it must outlive every builder, runtime and engine created with it."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER


def engine_metadata(plan: BuildPlan, trt_version: str, gpu: dict[str, Any], jetson: Mapping[str, Any] | None, onnx_name: str) -> dict[str, Any]:
    """What `build_engine` writes to vision.engine.json: what `check_engine_compat` and `runtime_settings` read back.

    `jetson` is the building machine's `jetson_identity()`; it is always written (None off
    Jetson), so a missing key marks an engine from before L4T was recorded.
    """
    return {
        "tensorrt_version": str(trt_version),
        **gpu,
        "jetson": dict(jetson) if jetson else None,
        "target": plan.target,
        "precision": plan.precision,
        "strongly_typed": plan.strongly_typed,
        "builder_flags": plan.builder_flags,
        "network_flags": plan.network_flags,
        "version_compatible": plan.version_compatible,
        "lean_runtime": plan.lean_runtime,
        "profile": plan.profile.to_dict(),
        "onnx": onnx_name,
    }


def build_engine(onnx_path: Path, folder: Path, plan: BuildPlan, timing_cache: Path | None = None, progress: Progress = print) -> Path:
    """Build and serialize the engine into `folder` with its metadata JSON; returns the engine path.

    `timing_cache` is a base path (folder or file name); the file actually used is keyed by GPU
    and TensorRT version (`timing_cache_path`).
    """
    trt = require("tensorrt", "gpu", "TensorRT engines")
    gpu = gpu_identity()
    jetson = jetson_identity()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    net_flags = 0
    for name in plan.network_flags:
        net_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    progress(f"parsing {onnx_path.name} for TensorRT {trt.__version__}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    lo, opt, hi = plan.profile.shapes()
    profile.set_shape(INPUT_NAME, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = timing_cache_path(timing_cache, gpu, trt.__version__)
    cache = _attach_timing_cache(config, read_timing_cache(cache_path, progress), cache_path, progress)
    progress(f"building TensorRT engine ({plan.precision}, profile {lo} .. {hi}); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    engine_path = folder / ENGINE
    engine_path.write_bytes(bytes(serialized))
    if cache_path is not None and cache is not None:
        try:
            write_timing_cache(cache_path, bytes(cache.serialize()))
        except OSError as exc:
            progress(f"warning: could not save the TensorRT timing cache {cache_path} ({exc})")
    meta = engine_metadata(plan, trt.__version__, gpu, jetson, onnx_path.name)
    (folder / ENGINE_META).write_text(json.dumps(meta, indent=2))
    return engine_path


def load_engine(folder: Path):
    """Deserialize after checking metadata against this GPU and TensorRT version.

    Returns (engine, meta, runtime): keep the runtime alive as long as the engine (TensorRT:
    destroying the runtime before its engines is undefined behaviour).
    """
    trt = require("tensorrt", "gpu", "TensorRT engines")
    meta_path = folder / ENGINE_META
    if not meta_path.is_file():
        raise BuildError(f"{meta_path} is missing: cannot tell which GPU and TensorRT version built the engine")
    meta = json.loads(meta_path.read_text())
    check_engine_compat(meta, trt.__version__, gpu_identity(), jetson_identity())
    runtime = trt.Runtime(_logger(trt))
    for attr, value in runtime_settings(meta).items():
        setattr(runtime, attr, value)
    engine = runtime.deserialize_cuda_engine((folder / ENGINE).read_bytes())
    if engine is None:
        raise BuildError(f"TensorRT could not deserialize {folder / ENGINE} (see the TensorRT log above); rebuild it here")
    return engine, meta, runtime


class TrtVision:
    """Vision engine on TensorRT: host numpy in, host fp32 numpy out, torch CUDA buffers between.

    Copy in, inference and copy out are all enqueued on one torch stream whose handle is given to
    `execute_async_v3`, and that stream is synchronized before the output is read, so the three
    are ordered; the device buffers are allocated while that stream is current, so torch's
    caching allocator does not hand their memory to other work on another stream too early. One
    execution context runs one inference at a time: `encode` is serialized by a lock.
    """

    def __init__(self, folder: Path) -> None:
        import torch

        self.torch = torch
        trt = require("tensorrt", "gpu", "TensorRT engines")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.logger = _logger(trt)
        self.engine, self.meta, self.runtime = load_engine(Path(folder))
        self.profile = VisionProfile.from_dict(self.meta["profile"])
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        check_io_tensors(inputs, [n for n in names if n not in inputs])
        self.io = plan_io(self.engine.get_tensor_dtype(INPUT_NAME), self.engine.get_tensor_dtype(OUTPUT_NAME))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BuildError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = torch.cuda.Stream(device=self.device)
        self._lock = threading.Lock()

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        torch = self.torch
        self.profile.check(pixel_values.shape)
        host_in = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
        with self._lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            x = host_in.to(self.device, non_blocking=True)
            if self.io.cast_input:
                x = x.to(getattr(torch, self.io.input_torch))
            if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
                raise BuildError(f"TensorRT refused input shape {tuple(x.shape)} (outside the engine's profile?)")
            out_shape = resolved_shape(self.context.get_tensor_shape(OUTPUT_NAME), OUTPUT_NAME)
            y = torch.empty(out_shape, dtype=getattr(torch, self.io.output_torch), device=self.device)
            if not (self.context.set_tensor_address(INPUT_NAME, x.data_ptr()) and self.context.set_tensor_address(OUTPUT_NAME, y.data_ptr())):
                raise BuildError("TensorRT refused the I/O buffer addresses")
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BuildError("TensorRT execution failed (see the TensorRT log above)")
            y32 = y.float() if self.io.cast_output else y
            host_out = torch.empty(out_shape, dtype=torch.float32, pin_memory=True)
            host_out.copy_(y32, non_blocking=True)
            self.stream.synchronize()
        return host_out.numpy()
