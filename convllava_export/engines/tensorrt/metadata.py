"""vision.engine.json: what a build records beside the engine (`engine_metadata`), and the rules
that refuse an engine this machine cannot load (`check_engine_compat`, `check_jetson_compat`)
or say how to load it (`runtime_settings`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import BuildError
from ...targets import parse_trt_version
from .device import NV_TEGRA_RELEASE
from .plan import LEAN_EMBEDDED, BuildPlan
from .versions import CROSS_MAJOR_COMPAT, VERSION_COMPAT_MIN, release, same_version

ENGINE = "vision.engine"
ENGINE_META = "vision.engine.json"


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
    _check_trt_version(meta, trt_version)
    _check_gpu(meta, gpu)


def _check_trt_version(meta: dict[str, Any], trt_version: str) -> None:
    """The TensorRT-version rules of `check_engine_compat`."""
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
        if release(trt_version) < release(built) or not (same_major or (pb[0], pr[0]) in CROSS_MAJOR_COMPAT):
            raise BuildError(
                f"engine was built version-compatible with TensorRT {built}; this is TensorRT {trt_version}, which cannot "
                "load it (a version-compatible engine loads on the same or a newer TensorRT of the same major version, "
                "or TensorRT 10 engines on TensorRT 11). Rebuild it here."
            )
    elif not same_version(built, trt_version):
        raise BuildError(
            f"engine was built with TensorRT {built} but this is TensorRT {trt_version}: engines are tied to the "
            "TensorRT version that built them. Rebuild it here (convllava-export build ... --target tensorrt)."
        )


def _check_gpu(meta: dict[str, Any], gpu: dict[str, Any]) -> None:
    """The GPU rules of `check_engine_compat`: same compute capability, same GPU model."""
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
    The plan is trusted because `runtime.build_loader.load_pipeline` verifies the build's checksums first.
    """
    return {"engine_host_code_allowed": bool(meta.get("version_compatible")) and meta.get("lean_runtime") == LEAN_EMBEDDED}
