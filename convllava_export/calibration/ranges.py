"""Activation ranges for static int8: one ORT session on the fp32 graph, reductions in the graph.

Why not ONNX Runtime's calibrators: they hold the model three times (the caller's proto, their
own copy, the augmented copy) plus a session, so a full-size ConvNeXt† (2.8 GB fp32) peaked at
18 GB during an int8 export. Here the graph proto is loaded without its weights, the session
reads them once, and only the tensors that get Q/DQ (the activation inputs of the quantized
ops) are observed:

- minmax: ReduceMin/ReduceMax nodes are appended in the graph, so a run returns two scalars per
  tensor, never the activations themselves.
- entropy / percentile: the activations are fetched and fed to ONNX Runtime's own
  HistogramCollector (same algorithms and defaults as its calibrators), a group of tensors at
  a time so no run returns more than `fetch_budget` bytes.

The result is ONNX Runtime's `TensorsData`, which `quantize_static` takes as a calibration
cache, so the quantizer itself runs no calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from ..precisions import CALIB_METHODS

FETCH_BUDGET = 1 << 30  # bytes of activations one histogram run may return
HISTOGRAM_DEFAULTS = {  # ONNX Runtime's calibrator defaults, except the percentile (99.999 there)
    "entropy": {"num_bins": 128, "num_quantized_bins": 128, "symmetric": False, "percentile": None},
    "percentile": {"num_bins": 2048, "num_quantized_bins": None, "symmetric": True, "percentile": 99.99},
}


def quantized_activations(model: onnx.ModelProto, op_types: Iterable[str]) -> list[str]:
    """Names of the non-constant inputs of `op_types` nodes: the tensors static int8 quantizes."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    wanted = set(op_types)
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in wanted:
            for name in node.input:
                if name and name not in consts and name not in names:
                    names.append(name)
    return names


def _observer_graph(src: Path, tensors: list[str], dest: Path) -> None:
    """Write `dest` beside `src`: the same graph (sharing its external data file) plus, per
    tensor, ReduceMin/ReduceMax/Size outputs and the raw tensor as an output."""
    model = onnx.load(str(src), load_external_data=False)  # weights stay on disk
    g = model.graph
    for k, name in enumerate(tensors):
        for op in ("ReduceMin", "ReduceMax"):
            out = f"__calib_{op}_{k}"
            g.node.append(helper.make_node(op, [name], [out], keepdims=0, name=out))
            g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))
        g.node.append(helper.make_node("Size", [name], [f"__calib_size_{k}"], name=f"__calib_size_{k}"))
        g.output.append(helper.make_tensor_value_info(f"__calib_size_{k}", TensorProto.INT64, []))
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    onnx.save(model, str(dest))


def collect_ranges(
    graph: Path,
    pixels: list[np.ndarray],
    method: str = "minmax",
    op_types: Iterable[str] = ("MatMul", "Gemm"),
    threads: int | None = None,
    fetch_budget: int = FETCH_BUDGET,
    progress: Callable[[str], None] | None = None,
):
    """Run the fp32 `graph` on each calibration image; return ORT `TensorsData` for the
    activation inputs of `op_types` (min/max, or the histogram method's thresholds)."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        HistogramCollector,
        TensorsData,
    )

    from ..engines.onnxruntime import session_options

    if method not in CALIB_METHODS:
        raise ValueError(f"unknown calibration method '{method}' (use {', '.join(CALIB_METHODS)})")
    graph = Path(graph)
    tensors = quantized_activations(onnx.load(str(graph), load_external_data=False), op_types)
    observer = graph.parent / f".calib-{graph.stem}.onnx"
    _observer_graph(graph, tensors, observer)
    try:
        opts = session_options(threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # observed names must survive
        session = ort.InferenceSession(str(observer), sess_options=opts, providers=["CPUExecutionProvider"])
    finally:
        observer.unlink(missing_ok=True)
    scalars = [f"__calib_{op}_{k}" for k in range(len(tensors)) for op in ("ReduceMin", "ReduceMax", "size")]
    lo = np.full(len(tensors), np.inf, np.float32)
    hi = np.full(len(tensors), -np.inf, np.float32)
    collector = None
    if method != "minmax":
        d = HISTOGRAM_DEFAULTS[method]
        collector = HistogramCollector(method, d["symmetric"], d["num_bins"], d["num_quantized_bins"], d["percentile"], "same")
    from ..progress import Meter

    meter = Meter("calibrating int8 activations", len(pixels), "images", progress, every=0.0) if progress else None
    for px in pixels:
        feed = {"pixel_values": np.ascontiguousarray(px if px.ndim == 4 else px[None], dtype=np.float32)}
        out = session.run(scalars, feed)
        mins, maxs, sizes = (np.array(out[j::3]) for j in range(3))
        lo, hi = np.minimum(lo, mins), np.maximum(hi, maxs)
        if meter:
            meter.advance(1)
        if collector is not None:
            for group in _groups(tensors, sizes * 4, fetch_budget):
                arrays = session.run(group, feed)
                _quiet(collector.collect, {name: arr.ravel() for name, arr in zip(group, arrays)})
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        bad = [t for t, a, b in zip(tensors, lo, hi) if not (np.isfinite(a) and np.isfinite(b))]
        raise ValueError(f"non-finite activations during calibration at {bad[:3]}: the fp32 graph overflows on these images")
    if collector is None:
        return TensorsData(CalibrationMethod.MinMax, {t: (np.array([a], np.float32), np.array([b], np.float32)) for t, a, b in zip(tensors, lo, hi)})  # ORT's shapes
    kind = CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.Percentile
    return TensorsData(kind, _quiet(collector.compute_collection_result))


def _groups(names: list[str], nbytes: np.ndarray, budget: int) -> list[list[str]]:
    """Consecutive groups of tensors of at most `budget` bytes each (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    total = 0
    for name, size in zip(names, nbytes):
        if groups[-1] and total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += int(size)
    return groups


def _quiet(fn, *args):
    """HistogramCollector prints a line per call; our progress lines already say what runs."""
    import contextlib

    with contextlib.redirect_stdout(None):
        return fn(*args)
