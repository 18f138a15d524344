"""Rewrite a large decoder graph's weights one tensor at a time: int4/int8 MatMulNBits, fp32.

ONNX Runtime's MatMulNBitsQuantizer and onnxruntime-genai's builder both hold the whole model
as a ModelProto (for a 7B decoder: 27 GB of fp32 weights) while they quantize. This pass reads
the graph without its data, then reads, converts and appends each initializer to a new data
file in turn, so memory holds the graph structure plus one tensor (at most the lm_head).

It also retypes a graph exported in the checkpoint's fp16/bf16 to fp32 activations (casts,
constants, inputs and outputs), which is how a 7B decoder is exported without an fp32 copy in
memory: torch exports it in its own dtype, this pass writes the fp32 (or quantized) graph.
Quantization is the same block-wise symmetric scheme as MatMulNBitsQuantizer (its C++ kernel).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import ExportError
from ..precisions import names, part_backend
from ..progress import Meter

Progress = Callable[[str], None]
# Weights per scale. 128 rather than llama.cpp's 32: on the 7B shapes it decoded 1.46x faster,
# prefilled 1.6x faster and took 1.9 GB less memory at run time than 32, and on the trained mid
# model it agreed better with the reference (top-1 0.993 vs 0.964; docs/real-size.md).
BLOCK_SIZE = 128
# what the rewrite makes: fp32, and every blockwise ONNX Runtime row (its bits from the row)
REWRITE_PRECISIONS = ("fp32",) + names("llm", "onnxruntime", block_scaled=True)


def weight_bits(precision: str) -> int | None:
    """4 or 8 for a blockwise row (MatMulNBits), None for fp32."""
    row = part_backend("llm", "onnxruntime").get(precision)
    return int(row.weight_bytes * 8) if row is not None and row.block_scaled else None
LOW_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
FLOATS = (TensorProto.FLOAT, *LOW_FLOATS)
INLINE_BYTES = 1024  # smaller tensors stay inside the .onnx file
ALIGN = 4096


def read_initializer(t: TensorProto, base: Path) -> np.ndarray:
    """One initializer's values, read from its external file (only its own bytes) or inline."""
    try:
        return numpy_helper.to_array(t, base_dir=str(base))
    except ValueError as exc:
        raise ExportError(f"the weights of '{t.name}' cannot be read from {base}: the data file is truncated or corrupt ({exc})") from None


def _quantize(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """w [K,N] float32 → (packed [N, blocks, blob] uint8, scales [N, blocks] float32), symmetric."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w.shape
    blocks = (k + block - 1) // block
    if blocks * block != k:
        w = np.pad(w, ((0, blocks * block - k), (0, 0)))
    packed = np.zeros((n, blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero = np.zeros((n, (blocks + (8 // bits) - 1) // (8 // bits)), dtype=np.uint8)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, np.ascontiguousarray(w), scales, zero, block, n, k, True)
    return packed, scales


class _DataWriter:
    """Appends tensors to one external data file and points their protos at it."""

    def __init__(self, path: Path, location: str) -> None:
        self.location = location  # the name the graph will find the file under
        self.fh = path.open("wb")
        self.offset = 0

    def put(self, name: str, array: np.ndarray) -> TensorProto:
        t = numpy_helper.from_array(np.zeros((0,), array.dtype), name)
        del t.dims[:]
        t.dims.extend(array.shape)
        data = np.ascontiguousarray(array).tobytes()
        if len(data) < INLINE_BYTES:
            t.raw_data = data
            return t
        pad = (-self.offset) % ALIGN
        if pad:
            self.fh.write(b"\0" * pad)
            self.offset += pad
        self.fh.write(data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(len(data)))):
            e = t.external_data.add()
            e.key, e.value = key, value
        self.offset += len(data)
        return t

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()


def _retype_graph(graph: onnx.GraphProto) -> int:
    """fp16/bf16 → fp32 in value types, Cast targets and constant attributes. Returns the count."""
    changed = 0
    for v in [*graph.input, *graph.output, *graph.value_info]:
        tt = v.type.tensor_type
        if tt.elem_type in LOW_FLOATS:
            tt.elem_type = TensorProto.FLOAT
            changed += 1
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i in LOW_FLOATS:
                attr.i = TensorProto.FLOAT
                changed += 1
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in LOW_FLOATS:
                value = numpy_helper.to_array(attr.t).astype(np.float32)
                attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
                changed += 1
            elif attr.type == onnx.AttributeProto.GRAPH:
                changed += _retype_graph(attr.g)
    return changed


def _initializer_uses(graph: onnx.GraphProto, inits: dict[str, TensorProto]) -> dict[str, list[onnx.NodeProto]]:
    """initializer name → the nodes that read it."""
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                uses.setdefault(name, []).append(node)
    return uses


def _matmul_weights(inits: dict[str, TensorProto], uses: dict[str, list[onnx.NodeProto]]) -> set[str]:
    """The 2-D float initializers read only as the weight (second input) of MatMuls: what MatMulNBits replaces."""
    targets = set()
    for name, nodes in uses.items():
        t = inits[name]
        if len(t.dims) == 2 and t.data_type in FLOATS and all(n.op_type == "MatMul" and n.input[1] == name and n.input[0] != name for n in nodes):
            targets.add(name)
    return targets


def rewrite_weights(src: Path, dest: Path, precision: str, block_size: int = BLOCK_SIZE, accuracy_level: int = 4, progress: Progress = print) -> dict[str, Any]:
    """src graph (+ external data) → dest graph + dest.data at `precision`, streaming.

    fp32: every fp16/bf16 tensor and type becomes fp32. int4/int8: in addition, each MatMul
    whose weight is a 2-D float initializer used only by MatMuls becomes MatMulNBits
    (block-wise symmetric, `block_size` along K, accuracy level 4 = int8 compute on CPU).
    """
    if precision not in REWRITE_PRECISIONS:
        raise ExportError(f"cannot rewrite a decoder to '{precision}' (use {', '.join(REWRITE_PRECISIONS)})")
    bits = weight_bits(precision)
    if bits and (block_size < 16 or block_size & (block_size - 1)):
        raise ExportError(f"{precision} block size must be a power of two >= 16, got {block_size}")
    src, dest = Path(src), Path(dest)
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = _initializer_uses(graph, inits)
    targets = _matmul_weights(inits, uses) if bits else set()
    retyped = _retype_graph(graph)
    data_path = dest.parent / (dest.name + ".data")
    tmp_graph, tmp_data = dest.parent / (dest.name + ".partial"), dest.parent / (dest.name + ".data.partial")
    total = sum(int(np.prod(t.dims, dtype=np.int64)) for t in inits.values())
    meter = Meter(f"writing {precision} decoder weights", total, "params", progress)
    writer = _DataWriter(tmp_data, data_path.name)
    new_inits: list[TensorProto] = []
    try:
        for t in list(graph.initializer):
            value = read_initializer(t, src.parent)
            if t.name in targets:
                k, n = value.shape
                packed, scales = _quantize(value.astype(np.float32, copy=False), bits, block_size)
                new_inits += [writer.put(t.name + f"_Q{bits}", packed), writer.put(t.name + "_scales", scales)]
                del packed, scales
                for node in uses[t.name]:
                    _to_matmul_nbits(node, t.name, k, n, bits, block_size, accuracy_level)
            else:
                new_inits.append(writer.put(t.name, value.astype(np.float32) if t.data_type in LOW_FLOATS else value))
            meter.advance(value.size)
            del value
        writer.close()
        del graph.initializer[:]
        graph.initializer.extend(new_inits)
        if bits and not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        with tmp_graph.open("wb") as fh:
            fh.write(model.SerializeToString())
        # the graph names its data file by name: rename both into place (graph last)
        os.replace(tmp_data, data_path)
        os.replace(tmp_graph, dest)
    except BaseException:
        writer.close()
        for p in (tmp_graph, tmp_data):
            p.unlink(missing_ok=True)
        raise
    meter.done()
    return {"precision": precision, "quantized_matmuls": len(targets), "retyped": retyped, **({"block_size": block_size} if bits else {})}


def _to_matmul_nbits(node: onnx.NodeProto, weight: str, k: int, n: int, bits: int, block: int, accuracy_level: int) -> None:
    node.op_type, node.domain = "MatMulNBits", "com.microsoft"
    del node.input[1:]
    node.input.extend([weight + f"_Q{bits}", weight + "_scales"])
    del node.attribute[:]
    for key, value in (("K", k), ("N", n), ("bits", bits), ("block_size", block), ("accuracy_level", accuracy_level)):
        node.attribute.append(onnx.helper.make_attribute(key, value))
