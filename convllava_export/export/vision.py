"""ConvNeXt†+projector → one dynamic-shape ONNX graph, then fp16 / int8 / fp8 variants.

The fp32 graph (`vision.onnx`) is exported with torch.onnx's dynamo exporter: batch, height
and width are symbolic (height and width as 64·k), LayerNorm is the ONNX op (opset ≥ 17).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..errors import ExportError
from ..precisions import precision as precision_row
from ..model.vision import VisionEncoder, config_stride
from .spec import PartSpec, vision_spec

GRAPH = "vision.onnx"
OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # use external data above 1 GiB (protobuf's hard limit is 2 GiB)
FP16_MAX = 65504.0
FP16_KEEP_FP32 = ["LayerNormalization"]

Progress = Callable[[str], None]


def _noop(msg: str) -> None:
    pass


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Exporters and quantizers log advice to the root logger; our progress lines say what matters."""
    import logging

    root, tonnx = logging.getLogger(), logging.getLogger("torch.onnx")
    levels = root.level, tonnx.level
    root.setLevel(logging.ERROR)
    tonnx.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(levels[0])
        tonnx.setLevel(levels[1])


def cosine_report(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, Any]:
    """Cosine of image_embeds per image (mean over its tokens), then mean and min over images."""
    per_image = []
    for a, b in zip(reference, candidate):
        a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
        per_image.append(float(cos.mean()))
    finite = all(np.isfinite(b).all() for b in candidate)
    return {
        "images": len(per_image),
        "cosine_mean": float(np.mean(per_image)) if finite else float("nan"),
        "cosine_min": float(np.min(per_image)) if finite else float("nan"),
        "finite": bool(finite),
        "per_image": per_image,
    }


def export_fp32(vision: VisionEncoder, folder: Path, progress: Progress = _noop, opset: int = OPSET) -> PartSpec:
    """Export the fp32 graph into `folder` and check it; returns its spec (also saved)."""
    if opset < 17:
        raise ExportError("opset must be >= 17 so LayerNorm stays one fused ONNX op")
    stride = config_stride(vision.tower.config)
    hidden = vision.projector[-1].out_features
    vision = vision.float().eval()
    nbytes = sum(p.numel() * 4 for p in vision.parameters())
    example = torch.zeros(2, 3, 2 * stride, 3 * stride)  # batch 2, two different sides: nothing specializes
    batch = torch.export.Dim("batch", min=1, max=1024)
    h = torch.export.Dim("h64", min=1, max=1024)
    w = torch.export.Dim("w64", min=1, max=1024)
    progress(f"exporting vision graph ({nbytes / 1e9:.2f} GB of fp32 weights, opset {opset})")
    with quiet_logs(), warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(None):
            program = torch.onnx.export(
                vision,
                (example,),
                dynamo=True,
                input_names=["pixel_values"],
                output_names=["image_embeds"],
                dynamic_shapes={"pixel_values": {0: batch, 2: stride * h, 3: stride * w}},
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    axes = {"pixel_values": ["batch", 3, "height", "width"], "image_embeds": ["batch", "num_visual_tokens", hidden]}
    external = save_checked(program, folder / GRAPH, nbytes, axes, progress)
    del program
    spec = vision_spec(GRAPH, "fp32", opset, hidden, stride, external_data=external)
    spec.save(folder)
    return spec


def save_checked(program: Any, path: Path, nbytes: int, axes: dict[str, list[int | str | None]], progress: Progress) -> bool:
    """Save an exported program (external data above 1 GiB), name its dynamic axes, run the
    checker on the path (which follows external data). Returns whether data went external."""
    external = nbytes > EXTERNAL_DATA_BYTES
    progress(f"saving {path.name}{' with external data' if external else ''}")
    program.save(str(path), external_data=external)
    _name_dynamic_axes(path, axes)
    onnx.checker.check_model(str(path))
    return external


def _name_dynamic_axes(path: Path, names: dict[str, list[int | str | None]]) -> None:
    """Give the graph's I/O dims readable names (the exporter writes s39*s94 and the like);
    None leaves a dim as exported."""
    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in names:
            for dim, want in zip(value.type.tensor_type.shape.dim, names[value.name]):
                if isinstance(want, str):
                    dim.dim_param = want
                elif want is not None:
                    dim.dim_value = want
    onnx.save(model, str(path))


def fp16_overflow_report(vision: VisionEncoder, pixels: list[np.ndarray], limit: float = FP16_MAX) -> dict[str, Any]:
    """Run the fp32 torch model and find activations fp16 cannot hold.

    Reports the largest |activation| at each LayerNorm input (its (x-u)² overflows fp16 once
    |x-u| > 256) and each layer output above fp16's range.
    """
    peaks: dict[str, float] = {}
    hooks = []
    for name, mod in vision.named_modules():
        if isinstance(mod, (torch.nn.LayerNorm, torch.nn.Linear, torch.nn.Conv2d)):

            def hook(m, inp, out, name=name):
                x = inp[0]
                if isinstance(m, torch.nn.LayerNorm):
                    dims = tuple(range(-len(m.normalized_shape), 0))
                    dev = (x - x.mean(dims, keepdim=True)).abs().amax().item()
                    peaks[f"{name} (x-mean)^2"] = max(peaks.get(f"{name} (x-mean)^2", 0.0), dev * dev)
                peaks[name] = max(peaks.get(name, 0.0), out.abs().amax().item())

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for px in pixels:
                vision.float()(torch.from_numpy(px))
    finally:
        for hk in hooks:
            hk.remove()
    over = {k: v for k, v in peaks.items() if not np.isfinite(v) or v > limit}
    return {"max_abs": max(peaks.values()) if peaks else 0.0, "overflows_fp16": sorted(over), "count": len(over)}


def convert_fp16(src: Path, dest: Path) -> None:
    """fp16 weights and compute; LayerNormalization kept in fp32 (its variance overflows fp16)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32)
    save_model(model16, dest)


def save_model(model: onnx.ModelProto, dest: Path) -> None:
    """Save a converted/quantized graph, with external data above 1 GiB."""
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save(model, str(dest), save_as_external_data=large, location=dest.name + ".data" if large else None)


INT8_OPS = ["MatMul", "Gemm"]


def quantize_int8(src: Path, dest: Path, pixels: list[np.ndarray], method: str = "minmax", progress: Progress = _noop) -> Path:
    """Explicit symmetric Q/DQ, per-channel int8 weights, int8 activations calibrated on images.

    This QDQ form runs on ONNX Runtime (fused to integer ops on CPU) and is what TensorRT's
    explicit-quantization path consumes. LayerNorm and the GELU stay in float. Only the MatMuls
    (the blocks' pointwise MLPs and the projector: nearly all of ConvNeXt's FLOPs) are quantized;
    the convolutions (stem, downsampling, depthwise 7×7) stay in float. Measured on a
    full-width tower at 768² (BENCHMARKS.md): quantizing the convolutions too was slower (0.83×
    vs 0.74× of fp32 time) and less accurate (embeds cosine 0.982 vs 0.987).

    Calibration runs first on its own (calibration/ranges.py: one session, weights read once)
    and its ranges are saved beside `dest` as `vision_calibration.json` (ONNX Runtime's
    calibration cache format), which `quantize_static` then reads instead of calibrating.
    Returns that file's path.
    """
    import inspect

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from ..calibration.ranges import collect_ranges

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime

        raise ExportError(f"int8 export needs an onnxruntime whose quantize_static takes calibration_cache_path (1.32 works; installed: {onnxruntime.__version__}): pip install -U onnxruntime")
    progress(f"calibrating int8 ({method}) on {len(pixels)} images")
    try:
        ranges = collect_ranges(src, pixels, method, INT8_OPS, progress=progress)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    cache = dest.parent / "vision_calibration.json"
    save_tensors_data(ranges, cache)
    progress(f"quantizing {len(ranges.data)} activations and their MatMul weights to int8")
    # Q/DQ on the MatMul inputs only (TensorRT's recommended placement): a Q/DQ pair on the
    # outputs as well made ORT requantize and dequantize every MLP output (0.76x vs 0.65x of
    # fp32 time on a full-width tower at 768², same cosine).
    extra: dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True, "OpTypesToExcludeOutputQuantization": INT8_OPS}
    with quiet_logs(), contextlib.redirect_stdout(None):
        quantize_static(
            str(src),
            str(dest),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=ranges.calibration_method,
            op_types_to_quantize=INT8_OPS,
            use_external_data_format=src.stat().st_size > EXTERNAL_DATA_BYTES or (src.parent / (src.name + ".data")).exists(),
            extra_options=extra,
            calibration_cache_path=str(cache),
        )
    return cache


def quantize_fp8(src: Path, dest: Path, pixels: list[np.ndarray], progress: Progress = _noop) -> None:
    """FP8 (E4M3) Q/DQ for TensorRT on Ada/Hopper, through NVIDIA ModelOpt's ONNX quantizer."""
    from ..extras import require

    mq = require("modelopt.onnx.quantization", "quant", "FP8 quantization")
    progress(f"calibrating fp8 with ModelOpt on {len(pixels)} images")
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:  # ModelOpt stacks calibration arrays: use the most common shape
        common = max(shapes, key=lambda s: sum(p.shape == s for p in pixels))
        pixels = [p for p in pixels if p.shape == common]
    data = np.concatenate(pixels, axis=0)
    mq.quantize(
        onnx_path=str(src),
        quantize_mode="fp8",
        calibration_data={"pixel_values": data},
        calibration_method="max",
        output_path=str(dest),
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
    )


@dataclass
class VisionExport:
    folder: Path
    spec: PartSpec
    report: dict[str, Any]


def export_vision(
    vision: VisionEncoder,
    folder: Path,
    precision: str = "fp32",
    calib_pixels: list[np.ndarray] | None = None,
    heldout_pixels: list[np.ndarray] | None = None,
    method: str = "minmax",
    threads: int | None = None,
    progress: Progress = _noop,
) -> VisionExport:
    """Write `vision.onnx` (+ spec, ORT-optimized graph, report) at `precision` into `folder`.

    The report holds the cosine of image_embeds against the torch fp32 model on held-out
    images, for every precision, fp32 included (that one is the parity check).
    """
    from ..engines.onnxruntime import OrtVision, save_optimized

    if precision_row("vision", "onnxruntime", precision).calibrated and not calib_pixels:
        raise ExportError(f"{precision} needs calibration images (--calib-images DIR)")
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / "fp32" if precision != "fp32" else folder
    scratch.mkdir(exist_ok=True)
    spec = export_fp32(vision, scratch, progress)
    src = scratch / GRAPH
    report: dict[str, Any] = {"precision": precision}
    if precision == "fp16":
        progress("checking fp16 range on the calibration images")
        report["fp16_overflow"] = fp16_overflow_report(vision, calib_pixels or heldout_pixels or [])
        progress("converting to fp16 (LayerNorm kept in fp32)")
        convert_fp16(src, folder / GRAPH)
    elif precision == "int8":
        quantize_int8(src, folder / GRAPH, calib_pixels or [], method, progress)
        report["calibration"] = {"method": method, "images": len(calib_pixels or [])}
    elif precision == "fp8":
        quantize_fp8(src, folder / GRAPH, calib_pixels or [], progress)
        report["calibration"] = {"method": "max", "images": len(calib_pixels or [])}
    if scratch != folder:
        import shutil

        shutil.rmtree(scratch)
    spec.precision = precision
    spec.attributes["keep_fp32"] = FP16_KEEP_FP32 if precision == "fp16" else []
    spec.save(folder)
    if precision != "fp8":  # fp8 Q/DQ is for TensorRT; ONNX Runtime's CPU kernels do not run it
        progress("saving the ONNX Runtime-optimized graph")
        report["ort_graph_rewrites"] = save_optimized(folder / GRAPH, folder / "vision.ort.onnx", threads)
        if heldout_pixels:
            progress(f"comparing against the torch fp32 reference on {len(heldout_pixels)} held-out images")
            engine = OrtVision(folder / "vision.ort.onnx", threads=threads)
            with torch.no_grad():
                ref = [vision.float()(torch.from_numpy(p)).numpy() for p in heldout_pixels]
            got = [engine.encode(p) for p in heldout_pixels]
            report["heldout"] = cosine_report(ref, got)
            report["heldout"]["max_rel_error"] = float(max(np.abs(a - b).max() / (np.abs(a).max() + 1e-30) for a, b in zip(ref, got)))
            if not report["heldout"]["finite"]:
                report["warning"] = f"{precision} engine produced NaN/inf on held-out images"
    import json

    (folder / "vision_report.json").write_text(json.dumps(report, indent=2))
    return VisionExport(folder, spec, report)


def export_vision_from_checkpoint(
    checkpoint: str | Path,
    output: Path,
    precision: str = "fp32",
    calib_images: str | None = None,
    calib_method: str = "minmax",
    calib_limit: int = 64,
    profile: tuple[str, str | None, str, int] = ("64x64", None, "2048x2048", 4),
    vision_tower: str | Path | None = None,
    threads: int | None = None,
    force: bool = False,
    mode: str = "native",
    resolution: int | None = None,
    max_tokens: int | None = None,
    size: tuple[int, int] | None = None,
    progress: Progress = _noop,
) -> VisionExport:
    """`export vision`: the checkpoint's tower + projector into a new folder `output` (written
    whole or not at all), with the engine profile (min, opt, max HxW; max batch) in its spec."""
    from ..calibration.dataset import calibration_source
    from ..calibration.images import split_heldout
    from ..engines.profiles import VisionProfile
    from ..fsutil import atomic_output_dir, check_destination
    from ..model.reference import ReferenceModel
    from ..options import check_vision
    from ..preprocess import PreprocessConfig

    row = check_vision("onnxruntime", precision)
    check_destination(output, force)
    if calib_images is None and row.calibrated:
        raise ExportError(
            f"{precision} needs calibration images: pass --calib-images DIR (images like those you will serve), "
            "a set from `convllava-export calibrate`, or --calib-images builtin for the synthetic set"
        )
    ref = ReferenceModel.load(checkpoint, vision_tower=vision_tower, load_llm=False, progress=progress)
    cfg = PreprocessConfig.from_preprocessor_config(ref.info.preprocessor_config, mode=mode, resolution=resolution, max_tokens=max_tokens, size=size)
    res = ref.info.native_resolution
    min_size, opt_size, max_size, max_batch = profile
    vprofile = VisionProfile.from_strings(min_size, opt_size or f"{res}x{res}", max_size, (1, 1, max_batch))
    pixels, source = calibration_source(calib_images, cfg, calib_limit, progress)
    cal, held = split_heldout(pixels)
    progress(f"calibration/held-out images: {len(cal)}/{len(held)} from {source}")
    with atomic_output_dir(output, force) as tmp:
        result = export_vision(ref.vision, tmp, precision, cal, held, calib_method, threads, progress)
        spec = PartSpec.load(tmp / "vision.json")
        spec.attributes["profile"] = vprofile.to_dict()
        spec.save(tmp)
    return result
