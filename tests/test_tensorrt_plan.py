"""TensorRT: everything decided without a GPU (plans, profiles, compatibility), plus GPU-only runs."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from convllava_export.engines.profiles import VisionProfile
from convllava_export.engines.tensorrt import check_engine_compat, plan_build
from convllava_export.errors import BuildError, ExportError

PROFILE = VisionProfile.from_strings("64x64", "1536x1536", "2048x2048", (1, 1, 4))


def test_profile_shapes_and_ep_options():
    assert PROFILE.shapes() == ((1, 3, 64, 64), (1, 3, 1536, 1536), (4, 3, 2048, 2048))
    opts = PROFILE.ort_trt_options()
    assert opts["trt_profile_max_shapes"] == "pixel_values:4x3x2048x2048"
    assert opts["trt_profile_min_shapes"] == "pixel_values:1x3x64x64"
    assert PROFILE.max_visual_tokens == 1024
    assert VisionProfile.from_dict(PROFILE.to_dict()) == PROFILE


def test_profile_rejects_outside_shapes_with_range():
    PROFILE.check((2, 3, 1536, 2048))
    with pytest.raises(ExportError, match=r"height 64\.\.2048, width 64\.\.2048"):
        PROFILE.check((1, 3, 2560, 1536))
    with pytest.raises(ExportError, match=r"batch 1\.\.4"):
        PROFILE.check((8, 3, 64, 64))


@pytest.mark.parametrize("bad", [("100x64", "64x64", "128x128"), ("512x512", "256x256", "1024x1024"), ("64", "a", "128")])
def test_profile_validation(bad):
    with pytest.raises(ExportError):
        VisionProfile.from_strings(*bad)


def test_plan_trt10_uses_builder_flags():
    plan = plan_build("int8", "10.3.0", PROFILE)
    assert not plan.strongly_typed and plan.builder_flags == ["INT8", "FP16"]
    assert plan_build("fp16", "10.7.0", PROFILE).builder_flags == ["FP16"]
    assert plan_build("fp32", "10.7.0", PROFILE, version_compatible=True).builder_flags == ["VERSION_COMPATIBLE"]


def test_plan_trt11_is_strongly_typed():
    for precision in ("fp16", "int8", "fp8"):
        plan = plan_build(precision, "11.2.0", PROFILE, compute_capability=(9, 0))
        assert plan.strongly_typed and plan.builder_flags == []


def test_fp8_refused_on_orin():
    with pytest.raises(ExportError, match="Jetson Orin is 8.7"):
        plan_build("fp8", "10.3.0", PROFILE, compute_capability=(8, 7))
    assert plan_build("fp8", "10.3.0", PROFILE, compute_capability=(8, 9)).builder_flags == ["FP8", "FP16"]


META = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0], "version_compatible": False}


def test_engine_compat():
    gpu = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
    check_engine_compat(META, "10.3.0", gpu)
    with pytest.raises(BuildError, match="built with TensorRT 10.3.0 but this is TensorRT 10.7.0"):
        check_engine_compat(META, "10.7.0", gpu)
    with pytest.raises(BuildError, match="sm_87"):
        check_engine_compat(META, "10.3.0", {"gpu_name": "Orin", "compute_capability": [8, 7]})
    with pytest.raises(BuildError, match="Rebuild it on this GPU"):
        check_engine_compat(META, "10.3.0", {"gpu_name": "NVIDIA H200", "compute_capability": [9, 0]})
    compat = {**META, "version_compatible": True}
    check_engine_compat(compat, "10.7.0", gpu)
    with pytest.raises(BuildError, match="version-compatible"):
        check_engine_compat(compat, "11.0.0", gpu)


def _gpu_and_trt() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'convllava-export[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_and_trt() is not None, reason=_gpu_and_trt() or "")
def test_build_and_run_engine(reference, tmp_path):
    from convllava_export.engines.tensorrt import TrtVision, build_engine
    from convllava_export.export.vision import export_fp32

    export_fp32(reference.vision, tmp_path)
    import tensorrt as trt

    plan = plan_build("fp32", trt.__version__, VisionProfile.from_strings("64x64", "256x256", "512x512", (1, 1, 2)))
    build_engine(tmp_path / "vision.onnx", tmp_path, plan, timing_cache=tmp_path / "timing.cache")
    engine = TrtVision(tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 3, 192, 320)).astype(np.float32)
    np.testing.assert_allclose(engine.encode(x), reference.encode_images(x), atol=1e-3, rtol=1e-3)
    with pytest.raises(ExportError, match="outside the engine's profile"):
        engine.encode(np.zeros((1, 3, 1024, 64), np.float32))
