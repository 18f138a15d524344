"""TensorRT: everything decided without a GPU (plans, profiles, compatibility), plus GPU-only runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from convllava_export.engines.profiles import VisionProfile
from convllava_export.engines.tensorrt import (
    TRT_TO_NUMPY,
    check_engine_compat,
    check_io_tensors,
    engine_metadata,
    jetson_identity,
    numpy_dtype,
    parse_jetpack_version,
    parse_l4t_release,
    parse_trt_version,
    plan_build,
    plan_io,
    plan_to_dict,
    read_timing_cache,
    resolved_shape,
    runtime_settings,
    timing_cache_key,
    timing_cache_path,
    trt_dtype_name,
    write_timing_cache,
)
from convllava_export.errors import BuildError, ExportError

PROFILE = VisionProfile.from_strings("64x64", "1536x1536", "2048x2048", (1, 1, 4))


def test_profile_shapes():
    assert PROFILE.shapes() == ((1, 3, 64, 64), (1, 3, 1536, 1536), (4, 3, 2048, 2048))
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
    assert plan_build("fp32", "10.7.0", PROFILE).lean_runtime is None


def test_plan_version_compatible_embeds_lean_runtime():
    # VERSION_COMPATIBLE without EXCLUDE_LEAN_RUNTIME: the plan carries the lean runtime it needs.
    plan = plan_build("fp32", "10.7.0", PROFILE, version_compatible=True)
    assert plan.builder_flags == ["VERSION_COMPATIBLE"] and plan.lean_runtime == "embedded"
    assert plan_build("fp16", "10.7.0", PROFILE, version_compatible=True).builder_flags == ["FP16", "VERSION_COMPATIBLE"]
    plan11 = plan_build("int8", "11.1.0", PROFILE, version_compatible=True)
    assert plan11.builder_flags == ["VERSION_COMPATIBLE"] and plan11.network_flags == []
    for p in (plan, plan11):
        assert "EXCLUDE_LEAN_RUNTIME" not in p.builder_flags
        d = plan_to_dict(p)
        assert d["lean_runtime"] == "embedded" and d["profile"] == PROFILE.to_dict()
    with pytest.raises(ExportError, match="8.6"):
        plan_build("fp32", "8.5.3", PROFILE, version_compatible=True)


def test_plan_trt11_is_strongly_typed():
    for precision in ("fp16", "int8", "fp8"):
        plan = plan_build(precision, "11.2.0", PROFILE, compute_capability=(9, 0))
        # strong typing is always on in 11.x: no precision flags, no network typing flag
        assert plan.strongly_typed and plan.builder_flags == [] and plan.network_flags == []


def test_fp8_refused_on_orin():
    with pytest.raises(ExportError, match="Jetson Orin is 8.7"):
        plan_build("fp8", "10.3.0", PROFILE, compute_capability=(8, 7))
    assert plan_build("fp8", "10.3.0", PROFILE, compute_capability=(8, 9)).builder_flags == ["FP8", "FP16"]


META = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0], "version_compatible": False}
H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
COMPAT = {**META, "version_compatible": True, "lean_runtime": "embedded"}


def test_parse_trt_version():
    assert parse_trt_version("10.3.0.26") == (10, 3, 0, 26)
    assert parse_trt_version("10.7.0.post1") == (10, 7, 0)
    assert parse_trt_version(" 11.1 ") == (11, 1)
    for bad in ("ten", "10", "", "?"):
        with pytest.raises(BuildError, match="cannot read TensorRT version"):
            parse_trt_version(bad)


def test_engine_compat_plain_engine_needs_same_version():
    check_engine_compat(META, "10.3.0", H100)
    check_engine_compat(META, "10.3.0.26", H100)  # the build number is often left out of tensorrt.__version__
    check_engine_compat({**META, "tensorrt_version": "10.3.0.26"}, "10.3.0.26", H100)
    with pytest.raises(BuildError, match="built with TensorRT 10.3.0.26 but this is TensorRT 10.3.0.30"):
        check_engine_compat({**META, "tensorrt_version": "10.3.0.26"}, "10.3.0.30", H100)
    with pytest.raises(BuildError, match="built with TensorRT 10.3.0 but this is TensorRT 10.7.0"):
        check_engine_compat(META, "10.7.0", H100)
    with pytest.raises(BuildError, match="built with TensorRT 10.3.0 but this is TensorRT 10.2.0"):
        check_engine_compat(META, "10.2.0", H100)
    with pytest.raises(BuildError, match="cannot be compared"):
        check_engine_compat({**META, "tensorrt_version": "?"}, "10.3.0", H100)


def test_engine_compat_gpu_must_match():
    with pytest.raises(BuildError, match="sm_87"):
        check_engine_compat(META, "10.3.0", {"gpu_name": "Orin", "compute_capability": [8, 7]})
    with pytest.raises(BuildError, match="Rebuild it on this GPU"):
        check_engine_compat(META, "10.3.0", {"gpu_name": "NVIDIA H200", "compute_capability": [9, 0]})
    # version compatibility is not hardware compatibility
    with pytest.raises(BuildError, match="Rebuild it on this GPU"):
        check_engine_compat(COMPAT, "10.7.0", {"gpu_name": "NVIDIA H200", "compute_capability": [9, 0]})


def test_engine_compat_version_compatible_newer_runtime():
    for newer in ("10.3.0", "10.3.1", "10.7.0", "10.16.1.11", "11.0.0", "11.4.1"):
        check_engine_compat(COMPAT, newer, H100)
    for older in ("10.2.0", "10.0.1", "8.6.1"):
        with pytest.raises(BuildError, match="version-compatible with TensorRT 10.3.0"):
            check_engine_compat(COMPAT, older, H100)
    # only the documented cross-major pairs (10 -> 11, 8 -> 9/10)
    with pytest.raises(BuildError, match="cannot load it"):
        check_engine_compat(COMPAT, "12.0.0", H100)
    check_engine_compat({**COMPAT, "tensorrt_version": "8.6.1"}, "10.3.0", H100)
    with pytest.raises(BuildError, match="cannot load it"):
        check_engine_compat({**COMPAT, "tensorrt_version": "8.6.1"}, "11.0.0", H100)
    with pytest.raises(BuildError, match="8.6"):
        check_engine_compat({**COMPAT, "tensorrt_version": "8.5.3"}, "8.6.1", H100)


def test_engine_compat_refuses_excluded_lean_runtime():
    # what earlier builds wrote: version-compatible, built with EXCLUDE_LEAN_RUNTIME, no lean_runtime key
    legacy = {**META, "version_compatible": True}
    for version in ("10.3.0", "10.7.0"):
        with pytest.raises(BuildError, match="without an embedded lean runtime"):
            check_engine_compat(legacy, version, H100)


def test_runtime_settings_allow_host_code_only_for_embedded_lean_runtime():
    assert runtime_settings(COMPAT) == {"engine_host_code_allowed": True}
    assert runtime_settings(META) == {"engine_host_code_allowed": False}
    assert runtime_settings({**META, "version_compatible": True}) == {"engine_host_code_allowed": False}


def test_build_plan_and_load_rules_agree():
    """What plan_build writes into the metadata is what check_engine_compat / runtime_settings accept."""
    plan = plan_build("fp16", "10.3.0", PROFILE, version_compatible=True)
    meta = {**H100, "tensorrt_version": plan.trt_version, "version_compatible": plan.version_compatible, "lean_runtime": plan.lean_runtime}
    check_engine_compat(meta, "10.8.0", H100)
    assert runtime_settings(meta)["engine_host_code_allowed"]
    plain = plan_build("fp16", "10.3.0", PROFILE)
    meta = {**H100, "tensorrt_version": plain.trt_version, "version_compatible": plain.version_compatible, "lean_runtime": plain.lean_runtime}
    check_engine_compat(meta, "10.3.0", H100)
    assert not runtime_settings(meta)["engine_host_code_allowed"]


H200 = {"gpu_name": "NVIDIA H200", "compute_capability": [9, 0]}
ORIN = {"gpu_name": "Orin", "compute_capability": [8, 7]}


def test_timing_cache_key_distinct_per_gpu_and_version():
    keys = {
        timing_cache_key(gpu, version)
        for gpu in (H100, H200, ORIN, {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": [8, 9]})
        for version in ("10.3.0", "10.7.0", "11.1.0")
    }
    assert len(keys) == 12
    key = timing_cache_key(H100, "10.3.0")
    assert key.startswith("nvidia-h100-80gb-hbm3-sm90-trt10.3.0-")
    assert key == timing_cache_key(dict(H100), "10.3.0")  # deterministic
    assert all(c.isalnum() or c in "-." for c in key)
    # names that slug alike still get different files
    assert timing_cache_key({"gpu_name": "A/B", "compute_capability": [9, 0]}, "10.3.0") != timing_cache_key(
        {"gpu_name": "A B", "compute_capability": [9, 0]}, "10.3.0"
    )


def test_timing_cache_path(tmp_path):
    default = tmp_path / "convllava-export" / "timing.cache"  # what build.py passes
    p = timing_cache_path(default, H100, "10.3.0")
    assert p.parent == default.parent and p.name == f"timing-{timing_cache_key(H100, '10.3.0')}.cache"
    assert timing_cache_path(default, H200, "10.3.0") != p
    assert timing_cache_path(default, H100, "10.7.0") != p
    folder = tmp_path / "caches"
    assert timing_cache_path(folder, H100, "10.3.0") == folder / f"timing-{timing_cache_key(H100, '10.3.0')}.cache"
    existing = tmp_path / "dir.with.dots"
    existing.mkdir()
    assert timing_cache_path(existing, H100, "10.3.0").parent == existing
    assert timing_cache_path(None, H100, "10.3.0") is None


def test_timing_cache_read_write(tmp_path):
    lines: list[str] = []
    path = tmp_path / "sub" / "timing-x.cache"
    assert read_timing_cache(path, lines.append) == b""
    assert read_timing_cache(None, lines.append) == b""
    write_timing_cache(path, b"\x00cache")
    assert read_timing_cache(path, lines.append) == b"\x00cache"
    write_timing_cache(path, b"new")
    assert path.read_bytes() == b"new" and sorted(q.name for q in path.parent.iterdir()) == ["timing-x.cache"]
    assert lines == []


def test_timing_cache_not_a_file_starts_fresh(tmp_path):
    path = tmp_path / "timing-x.cache"
    path.mkdir()  # a folder where the file should be: a fresh cache, no crash
    assert read_timing_cache(path, lambda line: None) == b""


def test_timing_cache_unreadable_file_warns(tmp_path, monkeypatch):
    lines: list[str] = []
    path = tmp_path / "timing-x.cache"
    path.write_bytes(b"cache")

    def denied(self):  # an I/O error on read (what a chmod 000 file gives a non-root user)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert read_timing_cache(path, lines.append) == b""
    assert len(lines) == 1 and lines[0].startswith("warning: cannot read the TensorRT timing cache") and "fresh" in lines[0]


def test_dtype_table():
    assert TRT_TO_NUMPY["FLOAT"] == np.float32 and TRT_TO_NUMPY["HALF"] == np.float16
    assert TRT_TO_NUMPY["INT8"] == np.int8 and TRT_TO_NUMPY["UINT8"] == np.uint8
    assert TRT_TO_NUMPY["INT32"] == np.int32 and TRT_TO_NUMPY["INT64"] == np.int64 and TRT_TO_NUMPY["BOOL"] == np.bool_
    for name in ("BF16", "FP8", "INT4", "FP4"):
        assert TRT_TO_NUMPY[name] is None
        with pytest.raises(BuildError, match="no numpy equivalent"):
            numpy_dtype(name)
    assert numpy_dtype("DataType.HALF") == np.float16
    with pytest.raises(BuildError, match="unknown TensorRT data type"):
        numpy_dtype("COMPLEX")


def test_trt_dtype_name():
    class Enumish:  # what a pybind11 enum exposes: .name
        name = "BF16"

    assert trt_dtype_name(Enumish()) == "BF16"
    assert trt_dtype_name("DataType.FLOAT") == "FLOAT"
    assert trt_dtype_name("half") == "HALF"


def test_plan_io_reads_engine_dtypes():
    assert plan_io("FLOAT", "FLOAT") == plan_io("DataType.FLOAT", "DataType.FLOAT")
    p = plan_io("FLOAT", "FLOAT")
    assert (p.input_torch, p.output_torch, p.cast_input, p.cast_output) == ("float32", "float32", False, False)
    p = plan_io("FLOAT", "HALF")
    assert (p.output_torch, p.cast_output, p.cast_input) == ("float16", True, False)
    p = plan_io("HALF", "BF16")
    assert (p.input_torch, p.output_torch, p.cast_input, p.cast_output) == ("float16", "bfloat16", True, True)
    for bad in (("INT8", "FLOAT"), ("FLOAT", "FP8"), ("FLOAT", "INT32")):
        with pytest.raises(BuildError, match="only FLOAT, HALF or BF16"):
            plan_io(*bad)


def test_plan_io_torch_names_exist():
    import torch

    for name in ("FLOAT", "HALF", "BF16"):
        p = plan_io(name, name)
        assert isinstance(getattr(torch, p.output_torch), torch.dtype)


def test_io_tensor_names_and_shapes():
    check_io_tensors(["pixel_values"], ["image_embeds"])
    with pytest.raises(BuildError, match="expected input 'pixel_values'"):
        check_io_tensors(["images"], ["image_embeds"])
    with pytest.raises(BuildError, match="expected input"):
        check_io_tensors(["pixel_values", "mask"], ["image_embeds"])
    with pytest.raises(BuildError, match="expected input"):
        check_io_tensors(["pixel_values"], ["features"])
    assert resolved_shape([2, 144, 4096], "image_embeds") == (2, 144, 4096)
    with pytest.raises(BuildError, match="could not resolve the shape"):
        resolved_shape((2, -1, 4096), "image_embeds")


# ---------------------------------------------------------------------------------------------
# Jetson: targets in the plan, L4T / JetPack identity, metadata checks at load

ORIN_GPU = {"gpu_name": "Orin", "compute_capability": [8, 7]}
THOR_GPU = {"gpu_name": "NVIDIA Thor", "compute_capability": [11, 0]}
L4T_36_4_3 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"
JP62 = {"l4t": "36.4.3", "jetpack": "6.2"}


def test_plan_applies_jetson_target_rules():
    thor = plan_build("fp8", "10.13.3", PROFILE, (11, 0), target="jetson", jetson={"l4t": "38.2.0", "jetpack": "7.0"})
    assert thor.target == "thor" and thor.builder_flags == ["FP8", "FP16"] and not thor.strongly_typed
    assert any(n.startswith("target thor:") for n in thor.notes)
    orin = plan_build("int8", "10.3.0", PROFILE, (8, 7), target="orin", jetson=JP62)
    assert orin.target == "orin" and orin.builder_flags == ["INT8", "FP16"]
    assert plan_to_dict(orin)["target"] == "orin"
    with pytest.raises(BuildError, match="target 'thor' needs TensorRT 10.13"):
        plan_build("fp16", "10.8.0", PROFILE, (11, 0), target="thor")
    with pytest.raises(BuildError, match="nvfp4 vision engines are not built yet"):
        plan_build("nvfp4", "10.13.3", PROFILE, (11, 0), target="thor")
    with pytest.raises(BuildError, match="does not support Jetson/JetPack"):
        plan_build("int8", "11.2.0", PROFILE, (8, 7), target="jetson", jetson=JP62)
    with pytest.raises(BuildError, match="target 'orin' is for sm_87 but this GPU is sm_110"):
        plan_build("int8", "10.13.3", PROFILE, (11, 0), target="orin")
    with pytest.raises(BuildError, match="this machine is a Jetson"):
        plan_build("int8", "10.3.0", PROFILE, (8, 7), target="tensorrt")
    with pytest.raises(ExportError, match="runs ONNX Runtime"):
        plan_build("int8", "10.3.0", PROFILE, (9, 0), target="cpu")


def test_plan_trt11_on_jetson_needs_jetpack_7_2_2():
    with pytest.raises(BuildError, match="only on JetPack 7.2.2 or later; this is a JetPack this tool cannot read"):
        plan_build("fp8", "11.4.1", PROFILE, (11, 0), target="jetson")
    plan = plan_build("fp8", "11.4.1", PROFILE, (11, 0), target="jetson", jetson={"l4t": "38.4.0", "jetpack": "7.2.2"})
    assert plan.target == "thor" and plan.strongly_typed and plan.builder_flags == []


def test_plan_without_target_keeps_old_callers_working():
    """build.py calls plan_build(precision, version, profile, cc, version_compatible=...) without a target."""
    assert plan_build("fp16", "10.3.0", PROFILE, (9, 0)).target == "tensorrt"
    assert plan_build("fp16", "10.3.0", PROFILE).target == "tensorrt"
    assert plan_build("int8", "10.3.0", PROFILE, (8, 7)).target == "orin"  # a Jetson GPU gets its Jetson rules
    assert plan_build("fp8", "10.13.3", PROFILE, (11, 0)).target == "thor"
    with pytest.raises(BuildError, match="target 'orin' needs TensorRT 10.0"):
        plan_build("int8", "8.6.2", PROFILE, (8, 7))


def test_parse_l4t_and_jetpack():
    assert parse_l4t_release(L4T_36_4_3) == "36.4.3"
    assert parse_l4t_release("# R38 (release), REVISION: 2.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: x\nmore\n") == "38.2.0"
    assert parse_l4t_release("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref, EABI: aarch64") == "32.7.1"
    for bad in ("", "R36 4.3", "# R36 (release), GCID: 1", "Ubuntu 22.04"):
        with pytest.raises(BuildError, match="cannot read the L4T release"):
            parse_l4t_release(bad)
    assert parse_jetpack_version("6.2+b77") == "6.2"
    assert parse_jetpack_version("7.2.2-b12") == "7.2.2"
    assert parse_jetpack_version("") is None and parse_jetpack_version(None) is None


def test_jetson_identity_from_a_release_file(tmp_path):
    assert jetson_identity(tmp_path / "missing", read_jetpack=lambda: "6.2+b77") is None  # not a Jetson
    release = tmp_path / "nv_tegra_release"
    release.write_text(L4T_36_4_3)
    assert jetson_identity(release, read_jetpack=lambda: "6.2+b77") == {"l4t": "36.4.3", "jetpack": "6.2"}
    assert jetson_identity(release, read_jetpack=lambda: None) == {"l4t": "36.4.3", "jetpack": None}
    release.write_text("garbage\n")
    with pytest.raises(BuildError, match="cannot read the L4T release from 'garbage'"):
        jetson_identity(release, read_jetpack=lambda: None)


def test_engine_metadata_records_jetson_and_load_checks_it():
    import json

    plan = plan_build("int8", "10.3.0", PROFILE, (8, 7), target="jetson", jetson=JP62)
    meta = json.loads(json.dumps(engine_metadata(plan, "10.3.0", ORIN_GPU, JP62, "vision.onnx")))
    assert meta["jetson"] == JP62 and meta["target"] == "orin" and meta["compute_capability"] == [8, 7]
    check_engine_compat(meta, "10.3.0", ORIN_GPU, JP62)
    check_engine_compat(meta, "10.3.0", ORIN_GPU, {"l4t": "36.4.0", "jetpack": None})  # same L4T release (36.4)
    with pytest.raises(BuildError, match=r"built on L4T r36.4.3, JetPack 6.2 but this Jetson runs L4T r36.3.0.*Rebuild it here"):
        check_engine_compat(meta, "10.3.0", ORIN_GPU, {"l4t": "36.3.0", "jetpack": "6.0"})
    with pytest.raises(BuildError, match=r"but this Jetson runs L4T r38.4.0, JetPack 7.2.2"):
        check_engine_compat(meta, "10.3.0", ORIN_GPU, {"l4t": "38.4.0", "jetpack": "7.2.2"})
    with pytest.raises(BuildError, match="built on a Jetson .* but this machine is not one"):
        check_engine_compat(meta, "10.3.0", H100, None)
    # and the reverse: an engine from a discrete GPU on a Jetson
    off = engine_metadata(plan_build("fp16", "10.3.0", PROFILE, (9, 0)), "10.3.0", H100, None, "vision.onnx")
    assert off["jetson"] is None and off["target"] == "tensorrt"
    check_engine_compat(off, "10.3.0", H100)
    with pytest.raises(BuildError, match="built off Jetson but this machine is a Jetson"):
        check_engine_compat(off, "10.3.0", ORIN_GPU, JP62)
    # unreadable L4T in the metadata
    with pytest.raises(BuildError, match="cannot be compared"):
        check_engine_compat({**meta, "jetson": {"l4t": "?"}}, "10.3.0", ORIN_GPU, JP62)


def test_engines_from_before_l4t_was_recorded_are_not_refused_for_it():
    legacy = {"tensorrt_version": "10.3.0", **ORIN_GPU, "version_compatible": False}  # no "jetson" key
    check_engine_compat(legacy, "10.3.0", ORIN_GPU, JP62)
    with pytest.raises(BuildError, match="built with TensorRT 10.3.0 but this is TensorRT 10.7.0"):
        check_engine_compat(legacy, "10.7.0", ORIN_GPU, JP62)


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

    from convllava_export.engines.tensorrt import gpu_identity

    plan = plan_build("fp32", trt.__version__, VisionProfile.from_strings("64x64", "256x256", "512x512", (1, 1, 2)))
    lines: list[str] = []
    build_engine(tmp_path / "vision.onnx", tmp_path, plan, timing_cache=tmp_path / "timing.cache", progress=lines.append)
    cache = timing_cache_path(tmp_path / "timing.cache", gpu_identity(), trt.__version__)
    assert cache.is_file() and cache.stat().st_size > 0
    engine = TrtVision(tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 3, 192, 320)).astype(np.float32)
    out = engine.encode(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference.encode_images(x), atol=1e-3, rtol=1e-3)
    with pytest.raises(ExportError, match="outside the engine's profile"):
        engine.encode(np.zeros((1, 3, 1024, 64), np.float32))
    # a corrupt cache for this GPU/TensorRT: a warning line and a fresh cache, not a crash
    cache.write_bytes(b"not a timing cache")
    lines.clear()
    (tmp_path / "again").mkdir()
    build_engine(tmp_path / "vision.onnx", tmp_path / "again", plan, timing_cache=tmp_path / "timing.cache", progress=lines.append)
    assert any(line.startswith("warning: TensorRT timing cache") for line in lines)
    assert cache.read_bytes() != b"not a timing cache"


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_and_trt() is not None, reason=_gpu_and_trt() or "")
def test_version_compatible_engine_loads_with_embedded_lean_runtime(reference, tmp_path):
    from convllava_export.engines.tensorrt import TrtVision, build_engine
    from convllava_export.export.vision import export_fp32

    export_fp32(reference.vision, tmp_path)
    import tensorrt as trt

    plan = plan_build("fp32", trt.__version__, VisionProfile.from_strings("64x64", "128x128", "256x256", (1, 1, 1)), version_compatible=True)
    build_engine(tmp_path / "vision.onnx", tmp_path, plan, progress=lambda _: None)
    import json

    meta = json.loads((tmp_path / "vision.engine.json").read_text())
    assert meta["lean_runtime"] == "embedded" and "EXCLUDE_LEAN_RUNTIME" not in meta["builder_flags"]
    assert "jetson" in meta and meta["jetson"] == jetson_identity()
    x = np.random.default_rng(1).standard_normal((1, 3, 128, 192)).astype(np.float32)
    np.testing.assert_allclose(TrtVision(tmp_path).encode(x), reference.encode_images(x), atol=1e-3, rtol=1e-3)
