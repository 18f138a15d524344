"""Which matrix kernels the prompt path can use on this CPU: one 7B-sized projection
(K=4096 → N=11008) at prompt lengths M, through each ONNX Runtime kernel our graphs could hold,
beside torch's bf16 GEMM (oneDNN: AMX where the CPU has it). Side by side in one process.

Usage: python benchmarks/prefill_kernels.py [--json benchmarks/results/prefill_kernels.json] [--m 1,16,256]
Variants (ONNX Runtime, CPU EP, 2 threads):
- int4 MatMulNBits, accuracy_level 4 (our default: activations quantized to int8, VNNI kernels)
- int4 MatMulNBits, accuracy_level 1 (fp32 compute)
- int8 MatMulNBits, accuracy_level 4
- int8 QGEMM (DynamicQuantizeMatMul, per-column int8 weights: MLAS's u8s8 GEMM, which has AMX kernels)
- fp32 MatMul
and torch bf16 / fp32 matmul, torch's int8 GEMM (_int_mm, oneDNN: VNNI/AMX-INT8), and our bf16,
int8 and q4 kernels end to end (engines/native_llm.py: int4 blocks unpacked or packed on every
call), and q4 over weights packed once (what Q4GqaDecoder runs for every step).
Reports GFLOP/s (2·M·K·N / time) and each against int4 acc4.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

K, N = 4096, 11008


def matmul_model(w: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    g = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def variants(w: np.ndarray, tmp: Path) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = {}
    fp32 = tmp / "fp32.onnx"
    onnx.save(matmul_model(w), fp32)
    out["fp32 MatMul"] = fp32
    for bits, acc in ((4, 4), (4, 1), (8, 4)):
        q = MatMulNBitsQuantizer(matmul_model(w), bits=bits, block_size=128, is_symmetric=True, accuracy_level=acc)
        q.process()
        p = tmp / f"nbits{bits}_acc{acc}.onnx"
        q.model.save_model_to_file(str(p))
        out[f"int{bits} MatMulNBits acc{acc}"] = p
    p = tmp / "qgemm.onnx"
    quantize_dynamic(str(fp32), str(p), weight_type=QuantType.QInt8, per_channel=True)
    out["int8 QGEMM (DynamicQuantizeMatMul)"] = p
    return out


def time_it(fn, min_s: float = 1.0) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el >= min_s and n >= 3:
            return el / n


def native_llm_rows(w: np.ndarray, ms: list[int]) -> dict[str, dict]:
    """Our GEMM prompt kernels on the same projection, end to end (engines/native_llm.py:
    unpacking the int4 blocks each call, activations in, fp32 out), from int4 blocks of 32."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from convllava_export.engines.native_llm import COMPUTE, NativeLlm, QuantWeight, _Span
    from convllava_export.engines.kernels import dequant_library

    wt = w.T.reshape(N, K // 32, 32)  # [N, blocks, 32]: MatMulNBits' layout, symmetric int4
    scale = np.abs(wt).max(-1) / 7
    q = (np.clip(np.round(wt / np.where(scale > 0, scale, 1)[..., None]), -8, 7) + 8).astype(np.uint8)
    packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(-1)  # low nibbles first, as the kernel unpacks
    qw = QuantWeight(N, K, 4, 32, _Span(0, packed), _Span(0, scale.astype(np.float32).reshape(-1).view(np.uint8)))
    pf = NativeLlm.__new__(NativeLlm)
    pf.lib, pf.threads, pf._buffers, pf._fd = dequant_library(), torch.get_num_threads(), {}, -1
    pf._pool = ThreadPoolExecutor(pf.threads) if pf.threads > 1 else None
    pf.resident = None
    res = {}
    for kernel in [*COMPUTE, "q4 resident"]:
        name = f"our {kernel} prompt kernel (unpack + GEMM)" if kernel in COMPUTE else "our q4 kernel, weights packed once (the q4 decoder)"
        pf.kernel, pf.compute = kernel.split()[0], COMPUTE[kernel.split()[0]]
        if kernel == "q4 resident":
            pf.resident = {id(qw): tuple(t.clone() for t in pf._pack_q4(qw, 0, N))}
        res[name] = {"ops": ["engines/native_llm.py"]}
        for m in ms:
            x = torch.randn(m, K)
            with torch.inference_mode():
                t = time_it(lambda: pf.linear([x], qw))
            res[name][str(m)] = round(2 * m * K * N / t / 1e9, 1)
        print(name, res[name], flush=True)
    return res


def main() -> None:
    import onnxruntime as ort
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--m", default="1,16,64,256")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from convllava_export.benchmarks.real_size import step_machine

    machine = step_machine()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    ms = [int(m) for m in args.m.split(",")]
    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for name, path in variants(w, Path(d)).items():
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            ops = sorted({n.op_type for n in __import__("onnx").load(str(path)).graph.node})
            res[name] = {"ops": ops}
            for m in ms:
                x = rng.standard_normal((m, K)).astype(np.float32)
                t = time_it(lambda: sess.run(None, {"x": x}))
                res[name][str(m)] = round(2 * m * K * N / t / 1e9, 1)
            print(name, res[name], flush=True)
    wt = torch.from_numpy(w)
    for name, dtype in (("torch bf16 matmul", torch.bfloat16), ("torch fp32 matmul", torch.float32)):
        res[name] = {"ops": ["aten::mm"]}
        wd = wt.to(dtype)
        for m in ms:
            x = torch.randn(m, K, dtype=dtype)
            with torch.inference_mode():
                t = time_it(lambda: x @ wd)
            res[name][str(m)] = round(2 * m * K * N / t / 1e9, 1)
        print(name, res[name], flush=True)
    res["torch int8 _int_mm (oneDNN)"] = {"ops": ["aten::_int_mm"]}
    w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    for m in ms:
        x8 = torch.randint(-127, 128, (max(m, 17), K), dtype=torch.int8)  # _int_mm takes M > 16
        with torch.inference_mode():
            t = time_it(lambda: torch._int_mm(x8, w8.t()))
        res["torch int8 _int_mm (oneDNN)"][str(m)] = round(2 * max(m, 17) * K * N / t / 1e9, 1)
    print("torch int8 _int_mm (oneDNN)", res["torch int8 _int_mm (oneDNN)"], flush=True)
    res.update(native_llm_rows(w, ms))
    base = res["int4 MatMulNBits acc4"]
    ratios = {name: {m: round(v[m] / base[m], 2) for m in map(str, ms)} for name, v in res.items()}
    out = {"what": "GFLOP/s of one K=4096 x N=11008 projection at M prompt rows, 2 threads", "machine": machine, "gflops": res, "vs_int4_acc4": ratios}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
