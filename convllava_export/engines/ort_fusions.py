"""Rewrites for the ONNX Runtime CPU graph (`vision.ort.onnx`) that ORT's own optimizer lacks.

The exported GELU is `x · ½ · (1 + erf(x / √2))` in five ops, after a separate bias Add (the
MLP's Linear on NHWC is MatMul + Add). ORT's GeluFusion does not match the order the exporter
writes, so each GELU ran as Div, Erf, Add, Mul, Mul over the block's widest activation (4×C
channels). `fuse_gelu` replaces bias Add + GELU with one com.microsoft.BiasGelu (Gelu when there
is no constant bias). Contrib ops only run on ONNX Runtime, so this is applied to the
`vision.ort.onnx` graph only; the portable graph TensorRT consumes keeps standard ops.

`narrow_int8_weights` works around the integer kernels of CPUs without VNNI (see its docstring).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

SQRT2 = float(np.sqrt(2.0))


def _scalar(value: np.ndarray | None) -> float | None:
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


class _GraphIndex:
    """Who produces and who consumes each tensor of a graph, and its constant value when it has one."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.inits = {i.name: i for i in graph.initializer}
        self.nodes = list(graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant" and p.attribute:
            return numpy_helper.to_array(p.attribute[0].t)
        return None

    def sole_consumer(self, name: str, op: str) -> onnx.NodeProto | None:
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op else None


def _other_input(node: onnx.NodeProto, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


def _match_gelu(erf: onnx.NodeProto, g: _GraphIndex) -> list[onnx.NodeProto] | None:
    """The five ops of `x · ½ · (1 + erf(x / √2))` around `erf` ([scale, erf, +1, ·½, ·x]), or
    None when they do not match or x (or a middle result) feeds anything else."""
    scale = g.producer.get(erf.input[0])
    if scale is None or scale.op_type not in ("Div", "Mul"):
        return None
    s = _scalar(g.const(scale.input[1]))
    if s is None or not np.isclose(s if scale.op_type == "Div" else 1 / s, SQRT2, rtol=1e-3):
        return None
    x = scale.input[0]
    add_one = g.sole_consumer(erf.output[0], "Add")
    if add_one is None or not np.isclose(_scalar(g.const(_other_input(add_one, erf.output[0]))) or 0.0, 1.0):
        return None
    half = g.sole_consumer(add_one.output[0], "Mul")
    if half is None or not np.isclose(_scalar(g.const(_other_input(half, add_one.output[0]))) or 0.0, 0.5):
        return None
    times_x = g.sole_consumer(half.output[0], "Mul")
    if times_x is None or _other_input(times_x, half.output[0]) != x:
        return None
    if {id(n) for n in g.consumers.get(x, [])} != {id(scale), id(times_x)}:
        return None  # x feeds something else too: it must stay
    return [scale, erf, add_one, half, times_x]


def _fused_node(chain: list[onnx.NodeProto], g: _GraphIndex) -> onnx.NodeProto:
    """BiasGelu over the Add that feeds x when it adds a constant 1-D bias (the Add joins the
    front of `chain`), else Gelu over x."""
    scale, erf, times_x = chain[0], chain[1], chain[-1]
    x = scale.input[0]
    bias_add = g.producer.get(x)
    bias = None
    if bias_add is not None and bias_add.op_type == "Add":
        for k in (0, 1):
            b = g.const(bias_add.input[k])
            if b is not None and b.ndim == 1 and b.size > 1:
                bias = (bias_add.input[1 - k], bias_add.input[k])
    if bias is not None:
        chain.insert(0, bias_add)
        return helper.make_node("BiasGelu", list(bias), [times_x.output[0]], domain="com.microsoft", name=f"{erf.name}/BiasGelu")
    return helper.make_node("Gelu", [x], [times_x.output[0]], domain="com.microsoft", name=f"{erf.name}/Gelu")


def fuse_gelu(model: onnx.ModelProto) -> int:
    """Fuse every erf-GELU (with its bias Add when there is one) in place; returns how many."""
    g = _GraphIndex(model.graph)
    replaced: dict[int, onnx.NodeProto] = {}  # id(first node of a chain) → fused node
    removed: set[int] = set()
    for erf in (n for n in g.nodes if n.op_type == "Erf"):
        chain = _match_gelu(erf, g)
        if chain is None:
            continue
        fused = _fused_node(chain, g)
        replaced[id(chain[0])] = fused
        removed.update(id(n) for n in chain)
    if not replaced:
        return 0
    kept = []
    for n in g.nodes:  # the fused node takes the place of its chain's first node: topological order holds
        if id(n) in replaced:
            kept.append(replaced[id(n)])
        if id(n) not in removed:
            kept.append(n)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


def narrow_int8_weights(model: onnx.ModelProto) -> int:
    """Requantize int8 weights feeding DequantizeLinear to 7 bits ([-64, 64], scale ×2), in place.

    Why: on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) ONNX Runtime's int8 GEMM uses
    VPMADDUBSW, which adds pairs of u8×s8 products in saturating int16: 2·255·127 overflows,
    2·255·64 does not. Measured on a full-width ConvNeXt† at 768² on such a CPU: embeds cosine
    0.987 with 8-bit weights against 0.9997 with 7-bit ones, while the same Q/DQ graph evaluated
    in float (no integer kernel) gives 0.9998, so the loss is the kernel's saturation, not the
    quantization. The portable graph keeps 8-bit weights (TensorRT and VNNI CPUs do not saturate).
    Returns how many weight tensors were narrowed.
    """
    inits = {i.name: i for i in model.graph.initializer}
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[0] in done:
            continue
        weight = numpy_helper.to_array(inits[node.input[0]])
        if weight.dtype != np.int8 or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if len(node.input) > 2 and node.input[2] in inits and numpy_helper.to_array(inits[node.input[2]]).any():
            continue  # asymmetric weights: not what our quantizer writes; leave them
        scale = numpy_helper.to_array(inits[node.input[1]])
        narrowed = np.clip(np.rint(weight.astype(np.float32) / 2), -64, 64).astype(np.int8)
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(narrowed, node.input[0]))
        inits[node.input[1]].CopyFrom(numpy_helper.from_array((scale * 2).astype(scale.dtype), node.input[1]))
        done.add(node.input[0])
    return len(done)
