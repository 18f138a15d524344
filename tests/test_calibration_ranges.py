"""Our calibration pass gives ONNX Runtime's calibrators' ranges, without their memory."""

from __future__ import annotations

import numpy as np
import pytest

from convllava_export.calibration.images import synthetic_pixels
from convllava_export.calibration.ranges import collect_ranges
from convllava_export.export.vision import INT8_OPS, export_fp32
from convllava_export.preprocess import PreprocessConfig


class _Reader:
    """CalibrationDataReader over preprocessed images, for ONNX Runtime's own calibrators."""

    def __init__(self, pixels):
        self._it = iter(pixels)

    def get_next(self):
        px = next(self._it, None)
        return None if px is None else {"pixel_values": px}


@pytest.fixture(scope="module")
def graph_and_pixels(tiny_reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    export_fp32(tiny_reference.vision, folder)
    pixels = synthetic_pixels(PreprocessConfig(resolution=256, mode="native", max_tokens=48), n=5, seed=4)
    assert len({p.shape for p in pixels}) > 1  # mixed aspect ratios
    return folder / "vision.onnx", pixels


def _orts_ranges(graph, pixels, method, tmp_path, **extra):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    kind = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    calibrator = create_calibrator(graph, INT8_OPS, str(tmp_path / "aug.onnx"), kind, extra_options=extra)
    for px in pixels:  # one image per call: ORT's histogram collector cannot stack mixed shapes
        calibrator.collect_data(_Reader([px]))
    return calibrator.compute_data()


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_ranges_match_onnxruntime_calibrators(graph_and_pixels, tmp_path, method):
    graph, pixels = graph_and_pixels
    ours = collect_ranges(graph, pixels, method, INT8_OPS, fetch_budget=1)  # one tensor per fetch
    extra = {"percentile": 99.99} if method == "percentile" else {}
    theirs = _orts_ranges(graph, pixels, method, tmp_path, **extra)
    assert ours.calibration_method == theirs.calibration_method
    matmul_inputs = set(ours.data)
    assert matmul_inputs and matmul_inputs <= set(theirs.data)  # ORT observes MatMul outputs too
    for name in matmul_inputs:
        np.testing.assert_allclose(np.ravel(ours[name].range_value), np.ravel(theirs[name].range_value), rtol=1e-5, atol=1e-6, err_msg=name)


def test_observer_graph_is_removed_and_bad_method_refused(graph_and_pixels):
    graph, pixels = graph_and_pixels
    collect_ranges(graph, pixels[:1])
    assert sorted(p.name for p in graph.parent.iterdir() if p.name.startswith(".calib")) == []
    with pytest.raises(ValueError, match="unknown calibration method"):
        collect_ranges(graph, pixels[:1], "mse")
