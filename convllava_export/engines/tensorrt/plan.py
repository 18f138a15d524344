"""The build plan: network typing, builder flags, profile and lean runtime for a precision on a
TensorRT version, GPU and target, decided in plain Python (tested without TensorRT)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import ExportError
from ...targets import FP8_MIN_CC, TARGETS, Target, check_target, get_target, jetson_target_for, parse_trt_version
from ..profiles import VisionProfile
from .versions import VERSION_COMPAT_MIN, trt_major

LEAN_EMBEDDED = "embedded"


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
    chosen = _resolve_target(target, cc, jetson)
    if precision == "fp8" and cc is not None and cc < FP8_MIN_CC:
        raise ExportError(
            f"fp8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is sm_{''.join(map(str, cc))} "
            "(Jetson Orin is 8.7): use --vision-precision int8 with calibration instead"
        )
    chosen = check_target(chosen, precision, trt_version, cc, jetson)  # refuses a precision the target's rows lack
    notes: list[str] = [f"target {chosen.name}: {chosen.description}"] if chosen.jetson else []
    strongly_typed, flags, typing_note = _typing_and_flags(precision, trt_major(trt_version))
    notes.append(typing_note)
    lean = None
    if version_compatible:
        compat_flags, compat_notes = _version_compatible_flags(precision, trt_version, strongly_typed)
        flags = [*flags, *compat_flags]
        lean = LEAN_EMBEDDED
        notes += compat_notes
    return BuildPlan(
        precision, str(trt_version), strongly_typed, flags, profile, version_compatible, workspace_bytes, notes,
        network_flags=[], lean_runtime=lean, target=chosen.name,
    )


def _resolve_target(target: str | Target | None, cc: tuple[int, int] | None, jetson: Mapping[str, Any] | None) -> Target:
    """The concrete TensorRT target: as named, or (None) the Jetson target of this GPU, else `tensorrt`."""
    if target is None:
        chosen = jetson_target_for(cc) or TARGETS["jetson" if jetson is not None else "tensorrt"]
    else:
        chosen = get_target(target) if isinstance(target, str) else target
    if chosen.backend != "tensorrt":
        raise ExportError(f"target '{chosen.name}' runs ONNX Runtime; it builds no TensorRT engine")
    return chosen


def _typing_and_flags(precision: str, major: int) -> tuple[bool, list[str], str]:
    """(strongly typed, builder precision flags, a note saying which) on a TensorRT major version."""
    if major >= 11:
        # Strong typing is always on in 11.x: create_network() takes no typing flag.
        return True, [], "TensorRT 11: strongly typed; precision comes from the ONNX graph"
    flags = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"]}[precision]
    return False, flags, "TensorRT 10: builder precision flags"


def _version_compatible_flags(precision: str, trt_version: str, strongly_typed: bool) -> tuple[list[str], list[str]]:
    """(builder flags, notes) a version-compatible build adds: the lean runtime stays embedded (see `plan_build`)."""
    if parse_trt_version(trt_version)[:2] < VERSION_COMPAT_MIN:
        raise ExportError(f"version-compatible engines need TensorRT >= 8.6 to build; this is {trt_version}")
    notes = ["version-compatible: the lean runtime is embedded in the plan; loading it runs host code from the plan"]
    if not strongly_typed and precision != "fp32":
        notes.append("version-compatible engines restrict tactics; expect slower kernels")
    return ["VERSION_COMPATIBLE"], notes


def plan_to_dict(plan: BuildPlan) -> dict[str, Any]:
    d = asdict(plan)
    d["profile"] = plan.profile.to_dict()
    return d
