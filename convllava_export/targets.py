"""Build targets: the one table of what each `--target` builds, on which GPUs and TensorRT versions.

A leaf module (it imports only `errors` and `precisions`), so the CLI, `build`, the TensorRT engine code and the
loaders can all read the same rules without importing torch or TensorRT. Which precisions a
target accepts is not written here: each precision row in `precisions.BACKENDS` lists its targets.

| target | vision backend | GPUs | TensorRT | vision precisions |
| --- | --- | --- | --- | --- |
| cpu | ONNX Runtime CPU | any | - | fp32, fp16, int8 |
| cuda | ONNX Runtime CUDA EP | any | - | fp32, fp16, int8, fp8 |
| tensorrt | TensorRT | discrete GPUs (not Jetson) | any (plan_build's rules) | fp32, fp16, int8, fp8 (fp8: sm_89+) |
| orin | TensorRT | sm_87 (Jetson Orin) | 10.x | fp32, fp16, int8 |
| thor | TensorRT | sm_110 (Jetson Thor) | 10.13+ | fp32, fp16, int8, fp8 |
| jetson | alias: orin or thor, chosen by the GPU found | | | |

TensorRT 11 on Jetson: NVIDIA's "Migrating TensorRT from 10.x to 11.x on Jetson/JetPack" pages
say TensorRT 11.0 to 11.4.0 do not support JetPack ("Jetson deployments must remain on a
TensorRT 10.x release supported by their JetPack version"), and that "TensorRT 11.4.1 supports
NVIDIA JetPack 7.2.2 or later on Jetson AGX Orin and Jetson Thor" (not Orin on JetPack 6.x).
`check_target` follows that: TensorRT 11 on a Jetson target needs 11.4.1+ *and* a JetPack of
7.2.2+ read from the `nvidia-jetpack` package; anything else is refused.

nvfp4: TensorRT has the E2M1 FP4 type from 10.8 ("Added support for E2M1 FP4 data type on NVIDIA
Blackwell GPUs using explicit quantization", TensorRT 10.8.0 release notes), but this tool's
vision export writes no nvfp4 graph (see the vision rows in `precisions.BACKENDS`), so nvfp4 is refused
on every target with the reason that applies first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BuildError
from .precisions import FP4_CC, FP8_CC, names

NVFP4 = "nvfp4"  # known to TensorRT on Blackwell, not exported by this tool yet

FP8_MIN_CC = FP8_CC  # FP8 tensor cores: Ada / Hopper / Blackwell; Jetson Orin (8.7) has none
FP4_MIN_CC = FP4_CC  # FP4 tensor cores: Blackwell (Jetson Thor is 11.0)
FP4_MIN_TRT = (10, 8)  # E2M1 FP4 with explicit quantization, TensorRT 10.8.0 release notes
JETSON_TRT11_MIN = (11, 4, 1)  # first TensorRT 11 that supports JetPack (11.4.1 Jetson migration page)
JETSON_TRT11_MIN_JETPACK = (7, 2, 2)  # ... and only on JetPack 7.2.2 or later


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # vision backend: "onnxruntime" or "tensorrt"
    ort_device: str  # where ONNX Runtime runs the LLM (and a vision graph): "cpu" or "cuda"
    compute_capabilities: tuple[tuple[int, int], ...]  # () = any GPU (or none, for cpu)
    min_trt: tuple[int, ...] | None  # oldest TensorRT this target builds with; None = no rule here
    max_trt_major: int | None  # newest TensorRT major version; None = no rule here
    jetson: bool
    description: str
    alias_of: tuple[str, ...] = ()  # non-empty for `jetson`: the targets it resolves to

    @property
    def is_alias(self) -> bool:
        return bool(self.alias_of)

    @property
    def vision_precisions(self) -> tuple[str, ...]:
        """Read from the precision rows (precisions.py), which list the targets that accept them."""
        return names("vision", target=self.name)


_ORIN = Target(
    "orin", "tensorrt", "cuda", ((8, 7),), (10, 0), 11, True,
    "Jetson Orin (sm_87), JetPack 6.1+ / TensorRT 10.x: fp16 and int8 vision, no fp8 or nvfp4 (no FP8/FP4 tensor cores)",
)
_THOR = Target(
    "thor", "tensorrt", "cuda", ((11, 0),), (10, 13), 11, True,
    "Jetson Thor (Blackwell, sm_110), JetPack 7 / TensorRT 10.13+: fp16, int8 and fp8 vision (nvfp4 not built yet)",
)
TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", "onnxruntime", "cpu", (), None, None, False,
                  "ONNX Runtime on the CPU (fp8 Q/DQ graphs are for TensorRT; the CPU kernels do not run them)"),
    "cuda": Target("cuda", "onnxruntime", "cuda", (), None, None, False, "ONNX Runtime CUDA execution provider"),
    "tensorrt": Target("tensorrt", "tensorrt", "cuda", (), None, None, False,
                       "TensorRT vision engine on a discrete GPU (fp8 needs sm_89+)"),
    "orin": _ORIN,
    "thor": _THOR,
    "jetson": Target(
        "jetson", "tensorrt", "cuda", _ORIN.compute_capabilities + _THOR.compute_capabilities, None, 11, True,
        "the Jetson this runs on: orin for sm_87, thor for sm_110", alias_of=("orin", "thor"),
    ),
}
TARGET_NAMES = tuple(TARGETS)  # for --target choices: cpu, cuda, tensorrt, orin, thor, jetson
TRT_TARGETS = tuple(n for n, t in TARGETS.items() if t.backend == "tensorrt")
GPU_TARGETS = tuple(n for n, t in TARGETS.items() if t.ort_device == "cuda")
JETSON_TARGETS = tuple(n for n, t in TARGETS.items() if t.jetson)


# ---------------------------------------------------------------------------------------------
# versions


def parse_trt_version(version: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); '10.7.0.post1' -> (10, 7, 0). Refuses anything else."""
    parts: list[int] = []
    for piece in str(version).strip().split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    if len(parts) < 2:
        raise BuildError(f"cannot read TensorRT version '{version}' (expected MAJOR.MINOR[.PATCH[.BUILD]])")
    return tuple(parts)


def _dotted(version: tuple[int, ...] | list[int]) -> str:
    return ".".join(map(str, version))


def _pad(version: tuple[int, ...], n: int = 3) -> tuple[int, ...]:
    return (tuple(version) + (0,) * n)[:n]


def _version_prefix(text: Any) -> tuple[int, ...] | None:
    """Leading dotted digits of a version string ('6.2+b77' -> (6, 2)); None if there are none."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)", str(text)) if text is not None else None
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def sm(cc: tuple[int, int] | list[int] | None) -> str:
    """(8, 7) -> 'sm_87'; (11, 0) -> 'sm_110'."""
    return "sm_" + "".join(str(int(c)) for c in cc) if cc else "no GPU"


def _gpu(cc: tuple[int, int] | None, gpu_name: str | None) -> str:
    return f"{gpu_name} ({sm(cc)})" if gpu_name else sm(cc)


# ---------------------------------------------------------------------------------------------
# lookup


def get_target(name: str) -> Target:
    """The target called `name` (the `jetson` alias included); refuses unknown names."""
    try:
        return TARGETS[name]
    except KeyError:
        raise BuildError(f"unknown target '{name}' (use {', '.join(TARGET_NAMES)})") from None


def jetson_target_for(gpu_cc: tuple[int, int] | None) -> Target | None:
    """The Jetson target whose GPU has this compute capability, or None."""
    if gpu_cc is None:
        return None
    for name in TARGETS["jetson"].alias_of:
        if tuple(gpu_cc) in TARGETS[name].compute_capabilities:
            return TARGETS[name]
    return None


def resolve_target(name: str, gpu_cc: tuple[int, int] | None, gpu_name: str | None = None) -> Target:
    """The concrete target for `name`: `jetson` becomes orin (sm_87) or thor (sm_110) by the GPU found."""
    target = get_target(name)
    if not target.is_alias:
        return target
    if gpu_cc is None:
        raise BuildError(
            "target 'jetson' picks orin or thor by the GPU, but no CUDA GPU is visible: run it on the Jetson, "
            "or name the board with --target orin / --target thor"
        )
    found = jetson_target_for(gpu_cc)
    if found is None:
        known = ", ".join(f"{t} ({sm(TARGETS[t].compute_capabilities[0])})" for t in target.alias_of)
        raise BuildError(
            f"target 'jetson' found the GPU {_gpu(gpu_cc, gpu_name)}, which is not a Jetson it knows ({known}); "
            "on a discrete GPU use --target tensorrt"
        )
    return found


# ---------------------------------------------------------------------------------------------
# rules


def _refuse_precision(target: Target, precision: str, trt: tuple[int, ...] | None, gpu_cc: tuple[int, int] | None) -> None:
    if precision == NVFP4:
        if target.compute_capabilities and all(cc < FP4_MIN_CC for cc in target.compute_capabilities):
            raise BuildError(
                f"nvfp4 is not available on target '{target.name}': its GPU ({sm(target.compute_capabilities[0])}) has no FP4 "
                "tensor cores (FP4 needs Blackwell). Use --vision-precision int8 (with calibration images) or fp16."
            )
        if target.backend != "tensorrt":
            raise BuildError(f"nvfp4 needs a TensorRT target on a Blackwell GPU; target '{target.name}' runs ONNX Runtime. Use fp16 or int8.")
        if gpu_cc is not None and tuple(gpu_cc) < FP4_MIN_CC:
            raise BuildError(f"nvfp4 needs FP4 tensor cores (Blackwell, sm_100 or newer); this GPU is {sm(gpu_cc)}. Use fp8 (sm_89+) or int8.")
        if trt is not None and trt[:2] < FP4_MIN_TRT:
            raise BuildError(
                f"nvfp4 needs TensorRT {_dotted(FP4_MIN_TRT)} or newer (FP4 arrived in 10.8); this is TensorRT {_dotted(trt)}. "
                "Upgrade TensorRT, or use fp8."
            )
        raise BuildError(
            f"nvfp4 vision engines are not built yet: the vision export writes {', '.join(names('vision'))} graphs only. "
            f"Use fp8{' (supported on ' + target.name + ')' if 'fp8' in target.vision_precisions else ''} or int8."
        )
    if precision not in names("vision"):
        raise BuildError(f"unknown vision precision '{precision}' (use {', '.join(names('vision'))})")
    if precision not in target.vision_precisions:
        why = {
            ("orin", "fp8"): "Jetson Orin (sm_87) has no FP8 tensor cores. Use --vision-precision int8 (with calibration images) or fp16.",
            ("cpu", "fp8"): "fp8 Q/DQ graphs are for TensorRT; ONNX Runtime's CPU kernels do not run them. Use int8 on CPU.",
        }.get((target.name, precision), f"it builds {', '.join(target.vision_precisions)}.")
        raise BuildError(f"vision precision {precision} is not available on target '{target.name}': {why}")


def _refuse_trt(target: Target, trt: tuple[int, ...], version: str, jetson: Mapping[str, Any] | None) -> None:
    if not target.jetson:
        return
    major = trt[0]
    if target.max_trt_major is not None and major > target.max_trt_major:
        raise BuildError(
            f"TensorRT {version} is not known to support JetPack; target '{target.name}' builds with TensorRT "
            f"{_dotted(target.min_trt or (10,))} to {target.max_trt_major}.x. Use the TensorRT that ships with your JetPack."
        )
    if major >= 11:
        if _pad(trt) < JETSON_TRT11_MIN:
            raise BuildError(
                f"TensorRT {version} does not support Jetson/JetPack (NVIDIA: TensorRT 11 supports JetPack from 11.4.1 on "
                f"JetPack {_dotted(JETSON_TRT11_MIN_JETPACK)}+). Use the TensorRT 10.x that ships with your JetPack."
            )
        jetpack = (jetson or {}).get("jetpack")
        jp = _version_prefix(jetpack)
        if jp is None or _pad(jp) < JETSON_TRT11_MIN_JETPACK:
            seen = f"JetPack {jetpack}" if jetpack else "a JetPack this tool cannot read (no nvidia-jetpack package)"
            raise BuildError(
                f"TensorRT {version} supports Jetson only on JetPack {_dotted(JETSON_TRT11_MIN_JETPACK)} or later; this is {seen}. "
                "Upgrade JetPack, or use the TensorRT 10.x that ships with your JetPack."
            )
        return
    if target.min_trt is not None and _pad(trt) < _pad(target.min_trt):
        fix = {
            "orin": "Upgrade to JetPack 6.1 or later, which ships TensorRT 10.x.",
            "thor": "Use the TensorRT that JetPack 7 ships (10.13 or later).",
        }.get(target.name, "Use the TensorRT that ships with your JetPack.")
        raise BuildError(f"target '{target.name}' needs TensorRT {_dotted(target.min_trt)} or newer; this is TensorRT {version}. {fix}")


def check_target(
    target: Target | str,
    precision: str,
    trt_version: str | None = None,
    gpu_cc: tuple[int, int] | None = None,
    jetson: Mapping[str, Any] | None = None,
    gpu_name: str | None = None,
) -> Target:
    """Refuse a build this target cannot make here, with one line saying what, why and what to do.

    `target` is a Target or a name (`jetson` is resolved by `gpu_cc`, or checked against the
    union of orin and thor while `gpu_cc` is unknown). `trt_version`, `gpu_cc` (compute
    capability) and `jetson` (`engines.tensorrt.jetson_identity()`: L4T / JetPack of this
    machine, None off Jetson) are checked when given, so this can run early (name and precision
    only) and again once TensorRT and the GPU are known. Returns the concrete target.
    """
    if isinstance(target, str):
        target = resolve_target(target, gpu_cc, gpu_name) if gpu_cc is not None else get_target(target)
    elif target.is_alias and gpu_cc is not None:
        target = resolve_target(target.name, gpu_cc, gpu_name)
    trt = parse_trt_version(trt_version) if trt_version is not None else None
    if gpu_cc is not None and target.compute_capabilities and tuple(gpu_cc) not in target.compute_capabilities:
        other = jetson_target_for(gpu_cc)
        fix = f"use --target {other.name} (or --target jetson)" if other else "use --target tensorrt on a discrete GPU"
        want = " or ".join(sm(cc) for cc in target.compute_capabilities)
        raise BuildError(f"target '{target.name}' is for {want} but this GPU is {_gpu(gpu_cc, gpu_name)}: {fix}")
    if target.backend == "tensorrt" and not target.jetson:
        board = jetson_target_for(gpu_cc)
        if jetson is not None or board is not None:
            where = f"L4T {jetson['l4t']}" if jetson and jetson.get("l4t") else _gpu(gpu_cc, gpu_name)
            raise BuildError(
                f"this machine is a Jetson ({where}): build with --target jetson"
                f"{f' (here: {board.name})' if board else ' (orin or thor)'} so the Jetson TensorRT and precision rules apply"
            )
    _refuse_precision(target, precision, trt, gpu_cc)
    if trt is not None:
        _refuse_trt(target, trt, str(trt_version), jetson)
    return target
