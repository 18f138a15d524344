"""Vision ONNX export: parity with torch at many shapes, conformance, precisions, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from convllava_export.calibration.images import split_heldout, synthetic_pixels
from convllava_export.cli import cli
from convllava_export.engines.onnxruntime import OrtVision
from convllava_export.export.spec import PartSpec
from convllava_export.export.vision import export_vision, fp16_overflow_report
from convllava_export.fsutil import atomic_output_dir
from convllava_export.preprocess import PreprocessConfig, load_image, preprocess

# (batch, H, W): tiny, square, 3:1 wide, 1:4 tall, never-exported shapes, batch > 2
SHAPES = [(1, 64, 64), (1, 256, 256), (2, 192, 576), (1, 512, 128), (1, 320, 448), (3, 128, 128), (1, 64, 1024)]


@pytest.fixture(scope="module")
def fp32_export(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision32") / "out"
    pixels = synthetic_pixels(PreprocessConfig(resolution=256, mode="native", max_tokens=32), n=4)
    return export_vision(reference.vision, folder, "fp32", heldout_pixels=pixels)


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_torch(fp32_export, reference, shape):
    engine = OrtVision(fp32_export.folder / "vision.onnx")
    x = np.random.default_rng(sum(shape)).standard_normal((shape[0], 3, shape[1], shape[2])).astype(np.float32)
    got = engine.encode(x)
    want = reference.encode_images(x)
    assert got.shape == (shape[0], (shape[1] // 64) * (shape[2] // 64), 64)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_optimized_graph_matches(fp32_export, reference):
    x = np.random.default_rng(0).standard_normal((1, 3, 192, 320)).astype(np.float32)
    got = OrtVision(fp32_export.folder / "vision.ort.onnx").encode(x)
    want = reference.encode_images(x)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    assert fp32_export.report["heldout"]["cosine_min"] > 0.99999
    ort_graph = onnx.load(str(fp32_export.folder / "vision.ort.onnx"), load_external_data=False)
    ops = {n.op_type for n in ort_graph.graph.node}
    assert "BiasGelu" in ops and "Erf" not in ops  # our GELU fusion reached the ORT graph
    portable = {n.op_type for n in onnx.load(str(fp32_export.folder / "vision.onnx"), load_external_data=False).graph.node}
    assert "Erf" in portable and "BiasGelu" not in portable  # the TensorRT graph keeps standard ops


def test_conformance_end_to_end(fp32_export, reference, conformance, manifest):
    engine = OrtVision(fp32_export.folder / "vision.onnx")
    cfg = PreprocessConfig.from_preprocessor_config(reference.info.preprocessor_config)
    for name, entry in manifest["images"].items():
        g = np.load(conformance / "golden" / entry["npz"])
        px = preprocess(load_image(conformance / "images" / name), cfg)[None]
        np.testing.assert_allclose(engine.encode(px), g["projected_features"], atol=1e-5, rtol=1e-4)


def test_graph_structure_and_spec(fp32_export):
    path = fp32_export.folder / "vision.onnx"
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    spec = PartSpec.load(fp32_export.folder / "vision.json")
    assert spec.inputs[0].name == "pixel_values" and spec.outputs[0].name == "image_embeds"
    assert spec.attributes["stride"] == 64 and spec.precision == "fp32"


@pytest.fixture(scope="module")
def tiny_pixels():
    cfg = PreprocessConfig(resolution=256, mode="native", max_tokens=48)
    return split_heldout(synthetic_pixels(cfg, n=16, seed=1))


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_qdq(tiny_reference, tiny_pixels, tmp_path, method):
    cal, held = tiny_pixels
    res = export_vision(tiny_reference.vision, tmp_path / "v8", "int8", cal, held, method=method)
    assert len({p.shape for p in cal}) > 1  # mixed aspect ratios went into calibration
    model = onnx.load(str(tmp_path / "v8" / "vision.onnx"))
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q, "no Q/DQ nodes"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all((z == 0).all() for z in zero_points)  # symmetric
    assert any(z.ndim == 1 and z.size > 1 for z in zero_points)  # per-channel weights
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert all(producers.get(n.input[0]) == "DequantizeLinear" for n in matmuls)  # Q/DQ on inputs
    consumers = {i: n.op_type for n in model.graph.node for i in n.input}
    assert not any(consumers.get(n.output[0]) == "QuantizeLinear" for n in matmuls)  # not on outputs
    ort_inits = onnx.load(str(tmp_path / "v8" / "vision.ort.onnx")).graph.initializer
    int8_weights = [onnx.numpy_helper.to_array(i) for i in ort_inits if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert int8_weights and max(int(np.abs(w).max()) for w in int8_weights) <= 64  # 7-bit on the CPU graph
    assert res.report["ort_graph_rewrites"]["int8_weights_narrowed_to_7_bits"] == len(matmuls)
    assert (tmp_path / "v8" / "vision_calibration.json").is_file()
    held_report = res.report["heldout"]
    assert held_report["finite"] and held_report["cosine_mean"] > 0.99 and held_report["cosine_min"] > 0.98


def test_narrow_int8_weights_matches_qdq_semantics(tmp_path):
    """The 7-bit CPU graph's integer kernel computes what its Q/DQ graph means, on any CPU.

    Activations span the full int8 range and weights ±127 before narrowing: the case where
    non-VNNI x86 kernels saturate. After narrowing, ORT's fused integer MatMul must equal the
    same graph evaluated in float (no fusion) to float rounding.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from convllava_export.engines.ort_fusions import narrow_int8_weights

    rng = np.random.default_rng(0)
    k, n = 256, 64
    w = rng.choice(np.array([-127, 127], np.int8), size=(k, n))
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.float32(1 / 127), "xs"), numpy_helper.from_array(np.int8(0), "xz"),
        numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
    ]
    graph = helper.make_graph(nodes, "qmm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    assert narrow_int8_weights(model) == 1
    narrowed = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    assert np.abs(narrowed).max() == 64 and np.array_equal(np.sign(narrowed), np.sign(w))
    path = tmp_path / "qmm.onnx"
    onnx.save(model, str(path))
    x = np.sign(rng.standard_normal((8, k))).astype(np.float32)  # ±1 → ±127 after quantization

    def run(level):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    exact = run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL), exact, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(exact, x @ (narrowed.astype(np.float32) * 0.02), rtol=1e-5, atol=1e-4)


def test_fp16_keeps_layernorm_fp32(tiny_reference, tiny_pixels, tmp_path):
    cal, held = tiny_pixels
    res = export_vision(tiny_reference.vision, tmp_path / "v16", "fp16", cal, held)
    model = onnx.load(str(tmp_path / "v16" / "vision.onnx"))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(inits[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
    lns = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    casts = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}

    def is_fp32(name: str) -> bool:
        if name in inits:
            return inits[name] == onnx.TensorProto.FLOAT
        cast = casts.get(name)
        return cast is not None and cast.attribute[0].i == onnx.TensorProto.FLOAT

    assert lns and all(is_fp32(n.input[0]) and is_fp32(n.input[1]) for n in lns)
    assert res.report["heldout"]["cosine_min"] > 0.999
    assert res.report["fp16_overflow"]["count"] == 0


def test_fp16_overflow_detected(tiny_reference, tiny_pixels):
    import copy

    vision = copy.deepcopy(tiny_reference.vision)
    with torch.no_grad():
        vision.tower.encoder.stages[4].downsampling_layer[1].weight.mul_(3e4)
    report = fp16_overflow_report(vision, tiny_pixels[1])
    assert report["count"] > 0 and any("stages.4" in k for k in report["overflows_fp16"])


def _no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name]


def test_cli_export_and_errors(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    dest = tmp_path / "vis"
    res = runner.invoke(cli, ["export", "vision", str(tiny_checkpoint), "-o", str(dest), "--precision", "int8", "--calib-images", "builtin"])
    assert res.exit_code == 0, res.output
    report = json.loads((dest / "vision_report.json").read_text())
    assert report["heldout"]["cosine_mean"] > 0.97 and "cosine vs torch fp32" in res.output
    spec = PartSpec.load(dest / "vision.json")
    assert spec.attributes["profile"]["max_hw"] == [2048, 2048]
    before = sorted(p.name for p in dest.iterdir())
    # a destination that exists
    res = runner.invoke(cli, ["export", "vision", str(tiny_checkpoint), "-o", str(dest)])
    assert res.exit_code == 2 and "already exists" in res.output
    assert sorted(p.name for p in dest.iterdir()) == before
    # sizes
    for args, msg in (
        (["--min-size", "100x64"], "not a multiple of 64"),
        (["--min-size", "1024x1024", "--max-size", "512x512"], "min <= opt <= max"),
    ):
        res = runner.invoke(cli, ["export", "vision", str(tiny_checkpoint), "-o", str(tmp_path / "x"), *args])
        assert res.exit_code == 2 and msg in res.output, res.output
    # calibration folders: empty, then holding a non-image
    calib = tmp_path / "calib"
    calib.mkdir()
    res = runner.invoke(cli, ["export", "vision", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--precision", "int8", "--calib-images", str(calib)])
    assert res.exit_code == 2 and "holds no images" in res.output
    Image.new("RGB", (96, 64), (1, 2, 3)).save(calib / "a.png")
    (calib / "b.png").write_bytes(b"this is not a png")
    res = runner.invoke(cli, ["export", "vision", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--precision", "int8", "--calib-images", str(calib)])
    assert res.exit_code == 2 and "b.png" in res.output and "not an image" in res.output
    res = runner.invoke(cli, ["export", "vision", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--precision", "int8"])
    assert res.exit_code == 2 and "--calib-images" in res.output
    assert not (tmp_path / "x").exists() and _no_leftovers(tmp_path)


def test_atomic_dir_keeps_previous_on_failure(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("previous build")
    (dest / "vision.json").write_text(json.dumps({"part": "vision", "graph": "vision.onnx", "opset": 18, "inputs": []}))  # one of ours: --force may replace it
    with pytest.raises(RuntimeError):
        with atomic_output_dir(dest, force=True) as tmp:
            (tmp / "half.onnx").write_text("partial")
            raise RuntimeError("killed mid-export")
    assert (dest / "old.txt").read_text() == "previous build" and not (dest / "half.onnx").exists()
    assert _no_leftovers(tmp_path)
    with atomic_output_dir(dest, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"] and _no_leftovers(tmp_path)
