"""Build targets (convllava_export.targets): the table, `jetson` resolution and every refusal. Pure logic, no GPU."""

from __future__ import annotations

import pytest

from convllava_export.errors import BuildError
from convllava_export.targets import (
    GPU_TARGETS,
    JETSON_TARGETS,
    TARGET_NAMES,
    TARGETS,
    TRT_TARGETS,
    check_target,
    get_target,
    resolve_target,
    sm,
)

ORIN, THOR, H100 = (8, 7), (11, 0), (9, 0)
JP62 = {"l4t": "36.4.3", "jetpack": "6.2"}
JP722 = {"l4t": "38.4.0", "jetpack": "7.2.2"}


def refused(match: str, *args, **kwargs) -> str:
    with pytest.raises(BuildError, match=match) as info:
        check_target(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message  # one line: what, why, what to do
    return message


def test_vision_precisions_match_the_export():
    from convllava_export.precisions import names

    PRECISIONS = names("vision")
    for target in TARGETS.values():
        assert set(target.vision_precisions) <= set(PRECISIONS), target.name
    assert TARGETS["tensorrt"].vision_precisions == PRECISIONS
    assert "nvfp4" not in PRECISIONS  # if it is ever added, thor's row and the nvfp4 refusals need revisiting


def test_table():
    assert TARGET_NAMES == ("cpu", "cuda", "tensorrt", "orin", "thor", "jetson")
    assert TRT_TARGETS == ("tensorrt", "orin", "thor", "jetson")
    assert GPU_TARGETS == ("cuda", "tensorrt", "orin", "thor", "jetson")
    assert JETSON_TARGETS == ("orin", "thor", "jetson")
    orin, thor = TARGETS["orin"], TARGETS["thor"]
    assert orin.compute_capabilities == (ORIN,) and "fp8" not in orin.vision_precisions and orin.min_trt == (10, 0)
    assert thor.compute_capabilities == (THOR,) and "fp8" in thor.vision_precisions and thor.min_trt == (10, 13)
    assert TARGETS["jetson"].alias_of == ("orin", "thor") and TARGETS["jetson"].is_alias
    assert sm((8, 7)) == "sm_87" and sm([11, 0]) == "sm_110"
    with pytest.raises(BuildError, match="unknown target 'xavier'"):
        get_target("xavier")


def test_jetson_resolves_by_gpu():
    assert resolve_target("jetson", ORIN).name == "orin"
    assert resolve_target("jetson", THOR).name == "thor"
    assert resolve_target("tensorrt", ORIN).name == "tensorrt"  # only the alias is resolved
    with pytest.raises(BuildError, match=r"found the GPU NVIDIA H100 80GB HBM3 \(sm_90\).*--target tensorrt"):
        resolve_target("jetson", H100, "NVIDIA H100 80GB HBM3")
    with pytest.raises(BuildError, match=r"sm_101"):  # Thor as CUDA 12.x named it; JetPack 7 (CUDA 13) reports 11.0
        resolve_target("jetson", (10, 1))
    with pytest.raises(BuildError, match="no CUDA GPU is visible"):
        resolve_target("jetson", None)


def test_check_target_returns_the_concrete_target():
    assert check_target("jetson", "fp8", "10.13.0", THOR).name == "thor"
    assert check_target("jetson", "int8", "10.3.0", ORIN).name == "orin"
    assert check_target("jetson", "fp8").name == "jetson"  # GPU unknown yet: checked against orin + thor
    assert check_target(TARGETS["jetson"], "int8", "10.3.0", ORIN).name == "orin"
    assert check_target("tensorrt", "fp8", "10.3.0", H100).name == "tensorrt"
    assert check_target("cuda", "fp8").name == "cuda"  # unchanged: the CUDA EP target accepts every exported precision


def test_orin_precisions():
    for precision in ("fp32", "fp16", "int8"):
        check_target("orin", precision, "10.3.0", ORIN, JP62)
    refused(r"fp8 is not available on target 'orin': Jetson Orin \(sm_87\) has no FP8 tensor cores.*int8", "orin", "fp8")
    refused(r"fp8 is not available on target 'orin'", "jetson", "fp8", "10.3.0", ORIN)
    refused(r"nvfp4 is not available on target 'orin'.*no FP4 tensor cores", "orin", "nvfp4", "10.3.0", ORIN)


def test_nvfp4_refusals_say_why():
    # thor has FP4 tensor cores and every TensorRT it accepts has FP4: the reason left is the export
    msg = refused("nvfp4 vision engines are not built yet", "thor", "nvfp4", "10.13.0", THOR)
    assert "fp8 (supported on thor)" in msg
    refused(r"nvfp4 needs TensorRT 10.8 or newer.*this is TensorRT 10.7.0", "tensorrt", "nvfp4", "10.7.0", (10, 0))
    refused(r"FP4 tensor cores.*sm_90", "tensorrt", "nvfp4", "10.13.0", H100)
    refused("not built yet", "tensorrt", "nvfp4", "10.8.0", (10, 0))
    refused("runs ONNX Runtime", "cpu", "nvfp4")
    refused("unknown vision precision 'bf16'", "thor", "bf16")
    refused("ONNX Runtime's CPU kernels", "cpu", "fp8")


def test_trt_versions_on_jetson():
    check_target("orin", "int8", "10.3.0.30", ORIN, JP62)
    check_target("thor", "fp8", "10.13.3", THOR)
    refused(r"target 'orin' needs TensorRT 10.0 or newer; this is TensorRT 8.6.2.*JetPack 6.1", "orin", "int8", "8.6.2", ORIN)
    refused(r"target 'thor' needs TensorRT 10.13 or newer; this is TensorRT 10.8.0", "thor", "fp8", "10.8.0", THOR)
    refused(r"target 'thor' needs TensorRT 10.13", "jetson", "fp16", "10.12.0", THOR)


def test_trt11_on_jetson():
    # TensorRT 11.0 - 11.4.0 do not support JetPack at all
    for version in ("11.0.0", "11.2.1", "11.3.0", "11.4.0"):
        refused(rf"TensorRT {version} does not support Jetson/JetPack.*TensorRT 10.x", "orin", "int8", version, ORIN, JP62)
        refused("does not support Jetson/JetPack", "thor", "fp8", version, THOR, JP722)
    # 11.4.1+ only on JetPack 7.2.2+, which must be readable
    refused(r"only on JetPack 7.2.2 or later; this is JetPack 6.2", "orin", "int8", "11.4.1", ORIN, JP62)
    refused(r"this is JetPack 7.1\b", "thor", "fp8", "11.4.1", THOR, {"l4t": "38.3.0", "jetpack": "7.1"})
    refused(r"cannot read \(no nvidia-jetpack package\)", "thor", "fp8", "11.4.1", THOR, {"l4t": "38.4.0", "jetpack": None})
    refused("cannot read", "thor", "fp8", "11.4.1", THOR)  # no identity at all
    assert check_target("thor", "fp8", "11.4.1", THOR, JP722).name == "thor"
    assert check_target("jetson", "int8", "11.5.0", ORIN, {"l4t": "39.1.0", "jetpack": "7.3"}).name == "orin"
    refused(r"TensorRT 12.0.0 is not known to support JetPack", "thor", "fp8", "12.0.0", THOR, JP722)
    check_target("tensorrt", "fp8", "11.2.0", H100)  # off Jetson, TensorRT 11 is plan_build's business


def test_gpu_must_match_the_target():
    refused(r"target 'orin' is for sm_87 but this GPU is NVIDIA Thor \(sm_110\): use --target thor", "orin", "int8", "10.13.0", THOR, gpu_name="NVIDIA Thor")
    refused(r"target 'thor' is for sm_110 but this GPU is sm_87: use --target orin", "thor", "int8", "10.3.0", ORIN)
    refused(r"target 'thor' is for sm_110 but this GPU is sm_90: use --target tensorrt", "thor", "fp8", "10.13.0", H100)


def test_tensorrt_target_refused_on_a_jetson():
    refused(r"this machine is a Jetson \(Orin \(sm_87\)\): build with --target jetson \(here: orin\)", "tensorrt", "int8", "10.3.0", ORIN, gpu_name="Orin")
    refused(r"Jetson \(L4T 38.2.0\).*--target jetson \(orin or thor\)", "tensorrt", "fp16", "10.13.0", None, {"l4t": "38.2.0", "jetpack": None})
    check_target("cuda", "int8", None, ORIN, JP62)  # ONNX Runtime's CUDA EP on a Jetson is not a TensorRT build
