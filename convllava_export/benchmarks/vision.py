"""`convllava-export bench vision`: full-size ConvNeXt†+projector, torch vs ONNX Runtime fp32/int8.

Everything is measured in one run, side by side, on the real code paths (the exporter, the
quantizer and the ORT engine the runtime uses). Each backend runs in its own process so its
peak RSS is its own.
"""

from __future__ import annotations

import json
import os
from . import peak_rss_mb, run_in_fresh_process
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = [(768, 768), (1024, 1024), (1536, 1536), (1536, 2560)]


def build_vision(tower_shape: str = "convnext-dagger", seed: int = 0):
    """Random-weight ConvNeXt† (released shapes) + mlp2x_gelu projector."""
    import torch
    from transformers import ConvNextConfig

    from ..model.vision import ConvNextFeatures, VisionEncoder, build_projector
    from ..tiny import ModelShape, tower_config

    shape = ModelShape.preset(tower_shape)
    torch.manual_seed(seed)
    with torch.no_grad():
        tower = ConvNextFeatures(ConvNextConfig(**tower_config(shape)))
        for name, p in tower.named_parameters():  # keep activations in a sane range through 42 blocks
            if name.endswith("layer_scale_parameter"):
                p.fill_(0.1)
        projector = build_projector("mlp2x_gelu", shape.tower_hidden[-1], shape.hidden)
    return VisionEncoder(tower, projector).eval()


def count_flops(vision, hw: tuple[int, int]) -> float:
    """Multiply-adds ×2 of every Conv2d and Linear for one image of size hw (meta tensors: free)."""
    import torch

    total = 0.0
    hooks = []

    def conv_hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total += 2.0 * k * out.numel()

    def lin_hook(m, inp, out):
        nonlocal total
        total += 2.0 * m.in_features * out.numel()

    for mod in vision.modules():
        if isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(lin_hook))
    try:
        with torch.no_grad():
            vision.to("meta")(torch.empty(1, 3, *hw, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total


def gemm_ceiling(threads: int, n: int = 2048, reps: int = 5) -> float:
    """ONNX Runtime's own fp32 MatMul throughput (GFLOP/s): the machine's practical ceiling."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", [a, b], [c]), opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    sess.run(None, {"a": x, "b": x})
    best = min(_timed(lambda: sess.run(None, {"a": x, "b": x})) for _ in range(reps))
    return 2.0 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _worker(kind: str, path: str | None, shapes: list[tuple[int, int]], reps: int, threads: int, queue) -> None:
    """Runs in a fresh process: build/load one backend, time every shape, report peak RSS."""
    import torch

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"kind": kind, "latency_s": {}}
    if kind == "torch-fp32":
        model = build_vision()
        run = lambda x: model(torch.from_numpy(x))  # noqa: E731
    else:
        from ..engines.onnxruntime import OrtVision

        run = OrtVision(Path(path), threads=threads).encode
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for hw in shapes:
            x = rng.standard_normal((1, 3, *hw)).astype(np.float32)
            run(x)
            times = [_timed(lambda: run(x)) for _ in range(reps)]
            out["latency_s"][f"{hw[0]}x{hw[1]}"] = float(np.median(times))
    out["peak_rss_mb"] = peak_rss_mb()
    queue.put(out)


def _export_worker(folder: str, precision: str, n_calib: int, n_heldout: int, queue) -> None:
    """Export through the real exporter; calibration and held-out images are the built-in
    synthetic set at mixed aspect ratios with at most 144 tokens (768²'s budget)."""
    from ..calibration.images import synthetic_pixels
    from ..export.vision import export_vision
    from ..preprocess import PreprocessConfig

    vision = build_vision()
    pixels = synthetic_pixels(PreprocessConfig(resolution=768, mode="native", max_tokens=144), n=n_calib + n_heldout, seed=1)
    t = time.perf_counter()
    res = export_vision(vision, Path(folder), precision, pixels[:n_calib], pixels[n_calib:], progress=lambda m: None)
    queue.put({"export_s": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(), "report": res.report,
               "calibration_shapes": sorted({"x".join(map(str, p.shape[-2:])) for p in pixels[:n_calib]})})


def bench_vision(shapes: list[tuple[int, int]] = SHAPES, reps: int = 3, threads: int | None = None, workdir: str | None = None, progress=print) -> dict[str, Any]:
    threads = threads or os.cpu_count() or 1
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-vision-"))
    progress(f"counting FLOPs; measuring ONNX Runtime's fp32 GEMM ceiling ({threads} threads)")
    vision = build_vision()
    params = sum(p.numel() for p in vision.parameters())
    flops = {f"{h}x{w}": count_flops(vision, (h, w)) for h, w in shapes}
    del vision
    ceiling = gemm_ceiling(threads)
    progress(f"GEMM ceiling {ceiling:.0f} GFLOP/s; exporting fp32 and int8 graphs (full-size tower, {params / 1e6:.0f} M parameters)")
    exports = {}
    for precision in ("fp32", "int8"):
        if not (work / precision / "vision.ort.onnx").exists():
            exports[precision] = run_in_fresh_process(_export_worker, str(work / precision), precision, 8, 4)
            progress(f"exported {precision} in {exports[precision]['export_s']:.0f} s (peak RSS {exports[precision]['peak_rss_mb']:.0f} MB)")
    results = {}
    for kind, path in (("torch-fp32", None), ("ort-fp32", work / "fp32" / "vision.ort.onnx"), ("ort-int8", work / "int8" / "vision.ort.onnx")):
        progress(f"timing {kind} at {', '.join(f'{h}x{w}' for h, w in shapes)}")
        results[kind] = run_in_fresh_process(_worker, kind, str(path) if path else None, shapes, reps, threads)
    rows = []
    for h, w in shapes:
        key = f"{h}x{w}"
        t = {k: results[k]["latency_s"][key] for k in results}
        rows.append(
            {
                "shape": key,
                "visual_tokens": (h // 64) * (w // 64),
                "gflop": flops[key] / 1e9,
                **{f"{k}_s": v for k, v in t.items()},
                **{f"{k}_gflops": flops[key] / v / 1e9 for k, v in t.items()},
                "ort_fp32_vs_torch": t["ort-fp32"] / t["torch-fp32"],
                "ort_int8_vs_ort_fp32": t["ort-int8"] / t["ort-fp32"],
                "ort_fp32_of_ceiling": flops[key] / t["ort-fp32"] / 1e9 / ceiling,
            }
        )
    return {
        "machine": {"cpus": os.cpu_count(), "threads": threads},
        "parameters": params,
        "gemm_ceiling_gflops": ceiling,
        "exports": {k: {kk: vv for kk, vv in v.items() if kk != "report"} | {"heldout": v["report"].get("heldout", {})} for k, v in exports.items()},
        "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in results.items()},
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"GEMM ceiling (ONNX Runtime fp32 MatMul 2048³, {result['machine']['threads']} threads): {result['gemm_ceiling_gflops']:.0f} GFLOP/s",
        "",
        "| shape | tokens | GFLOP | torch fp32 s | ORT fp32 s | ORT int8 s | ORT fp32 / torch | ORT int8 / ORT fp32 | ORT fp32 GFLOP/s (of ceiling) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['visual_tokens']} | {r['gflop']:.0f} | {r['torch-fp32_s']:.2f} | {r['ort-fp32_s']:.2f} | {r['ort-int8_s']:.2f} | "
            f"{r['ort_fp32_vs_torch']:.2f}× | {r['ort_int8_vs_ort_fp32']:.2f}× | {r['ort-fp32_gflops']:.0f} ({r['ort_fp32_of_ceiling'] * 100:.0f} %) |"
        )
    lines.append("")
    lines.append("Peak RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in result["peak_rss_mb"].items()))
    for k, v in result.get("exports", {}).items():
        held = v.get("heldout", {})
        cos = f", held-out cosine vs torch fp32 mean {held.get('cosine_mean', float('nan')):.5f} / min {held.get('cosine_min', float('nan')):.5f}" if held else ""
        lines.append(f"- export {k}: {v['export_s']:.0f} s, peak RSS {v['peak_rss_mb']:.0f} MB{cos}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(bench_vision(), indent=2))
