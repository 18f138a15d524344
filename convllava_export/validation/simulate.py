"""Simulated builds: the accuracy of GPU-only formats, measured on CPU before any GPU.

A simulated build is a copy of the torch fp32 reference on which NVIDIA ModelOpt's *fake
quantization* is applied with the format's ModelOpt config (the one `export llm --backend
tensorrt-llm` uses), calibrated on multimodal prompts (real image features spliced into
templated prompts, as for the real export). Weights and activations are rounded to the format
and back to fp32, so the numbers are what the format's rounding does to this model; the matmuls
themselves still run in fp32 on CPU. A real engine's kernels (fp16/bf16 accumulation, fused
ops, other tactics) may differ a little, and the latency of a simulated build is torch's on CPU,
not an engine's.

- fp8: FP8 (E4M3) per-tensor weights and activations in every LLM Linear (not lm_head), and in
  the vision tower + projector's Conv and Linear layers (what the fp8 TensorRT vision engine
  quantizes: Conv, MatMul, Gemm), calibrated on the calibration images.
- int4-awq: 4-bit blockwise weights with AWQ (ModelOpt's awq_lite), LLM only.
- int8-sq: INT8 SmoothQuant (per-channel weights, per-tensor activations), LLM only.
- nvfp4: listed, but ModelOpt's NVFP4 fake quantization (dynamic 16-element blocks with FP8
  scales) is a CUDA/Triton kernel only: asking for it on CPU is an error that says so.

The simulated pipeline goes through exactly the metric code of real builds (`run.evaluate_build`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConvLlavaError, first_line
from ..precisions import MODELOPT, SIMULATED, SIMULATED_VISION, describe
from ..preprocess import PreprocessConfig
from .report import simulated_note
from ..model.reference import TorchVision
from ..runtime.pipeline import Pipeline

Progress = Callable[[str], None]

PREFIX = "simulated:"


@dataclass(frozen=True)
class SimFormat:
    config: str  # ModelOpt config name in modelopt.torch.quantization
    vision: bool  # also fake-quantize the vision tower + projector (Conv, Linear)
    describe: str


FORMATS: dict[str, SimFormat] = {
    name: SimFormat(MODELOPT[name].config, name in SIMULATED_VISION, describe("llm", "tensorrt-llm", name) + (" (LLM Linears; vision Conv + Linear)" if name in SIMULATED_VISION else " (LLM Linears)"))
    for name in SIMULATED
}
AWQ_BLOCK_SIZES = (128, 64, 32, 16, 8)


def _mtq():
    from ..extras import require

    return require("modelopt.torch.quantization", "quant", "simulated builds (ModelOpt fake quantization)")


def _modelopt_version() -> str:
    import modelopt

    return str(getattr(modelopt, "__version__", "unknown"))


def parse_formats(formats: Sequence[str]) -> list[str]:
    """Known format names in the order given, without repeats; an unknown name is an error."""
    out: list[str] = []
    for f in formats:
        name = str(f).strip().lower()
        if name.startswith(PREFIX):
            name = name[len(PREFIX):]
        if name not in FORMATS:
            raise ConvLlavaError(f"cannot simulate '{f}': known formats are {', '.join(FORMATS)}")
        if name not in out:
            out.append(name)
    return out


def format_config(fmt: str, awq_block_size: int = 128) -> dict[str, Any]:
    """The format's ModelOpt config (a copy); int4-awq with `awq_block_size`, as the real export sets it."""
    from ..engines.tensorrt_llm import modelopt_config

    _mtq()
    return modelopt_config(fmt, awq_block_size)  # the very config `export llm --backend tensorrt-llm` uses


def check_cpu_support(fmt: str) -> None:
    """Fake-quantize a small Linear on CPU with the format's config; a format ModelOpt can only
    fake-quantize with a CUDA kernel is a ConvLlavaError naming the reason."""
    mtq = _mtq()
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 64))
    x = torch.randn(2, 4, 64)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            q = mtq.quantize(layer, format_config(fmt, 32), lambda m: m(x))
            with torch.no_grad():
                q(x)
    except Exception as exc:  # ModelOpt raises AssertionError/RuntimeError/ImportError for missing kernels
        raise ConvLlavaError(
            f"cannot simulate {fmt} on CPU: ModelOpt {_modelopt_version()} fake-quantizes {FORMATS[fmt].config} only with a CUDA kernel "
            f"({type(exc).__name__}: {first_line(exc)}); validate a real {fmt} engine on a GPU instead"
        ) from None


def resolve_awq_block_size(hidden: int, intermediate: int, requested: int | None) -> int:
    """The INT4-AWQ block size: `requested` when it divides hidden and intermediate (the real
    export's rule), else with None the largest of 128/64/32/16/8 that does."""
    if requested is not None:
        if requested < 1 or hidden % requested or intermediate % requested:
            raise ConvLlavaError(f"int4-awq block size {requested} must divide hidden {hidden} and intermediate {intermediate}")
        return requested
    for b in AWQ_BLOCK_SIZES:
        if hidden % b == 0 and intermediate % b == 0:
            return b
    raise ConvLlavaError(f"no int4-awq block size in {AWQ_BLOCK_SIZES} divides hidden {hidden} and intermediate {intermediate}")


@dataclass
class Calibration:
    pixels: list[np.ndarray]  # [1,3,H,W] each, for the vision part
    sequences: list[np.ndarray]  # spliced prompt embeddings [S, hidden], for the LLM
    source: str
    info: dict[str, Any] = field(default_factory=dict)


def calibration_data(
    model,
    cfg: PreprocessConfig,
    calib: str | os.PathLike | None = "builtin",
    limit: int = 32,
    prompts: str | os.PathLike | None = None,
    progress: Progress = print,
) -> Calibration:
    """What `export llm --backend tensorrt-llm` calibrates on (calibration.dataset.multimodal_calibration)."""
    from ..calibration.dataset import multimodal_calibration

    pixels, seqs, source = multimodal_calibration(model, cfg, calib, limit, prompts, progress)
    info = {"source": source, "images": len(pixels), "prompts": len(seqs), "prompt_tokens": int(sum(len(s) for s in seqs))}
    progress(f"simulation calibration: {len(pixels)} images, {len(seqs)} multimodal prompts ({info['prompt_tokens']} tokens) from {source}")
    return Calibration(pixels, seqs, source, info)


def quantizer_counts(module: torch.nn.Module) -> dict[str, int]:
    """ModelOpt TensorQuantizers in `module`: how many, and how many are enabled."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    qs = [m for m in module.modules() if isinstance(m, TensorQuantizer)]
    return {"quantizers": len(qs), "enabled": sum(bool(q.is_enabled) for q in qs)}


def _quantize(module: torch.nn.Module, config: dict[str, Any], loop: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    mtq = _mtq()
    # ModelOpt prints its own progress ("Inserted N quantizers", "awq_lite: ..."): to stderr,
    # with ours, so that stdout keeps only results
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        return mtq.quantize(module, config, loop)


@dataclass
class SimulatedBuild:
    name: str  # "simulated:fp8"
    format: str
    model: Any  # a ReferenceModel whose llm (and vision for fp8) are fake-quantized copies
    info: dict[str, Any]

    def pipeline(self, preprocess_cfg: PreprocessConfig | None = None) -> Pipeline:
        from ..model.reference import TorchDecoder

        cfg = preprocess_cfg or PreprocessConfig.from_preprocessor_config(self.model.info.preprocessor_config)
        return Pipeline(TorchVision(self.model), TorchDecoder(self.model), self.model.tokenizer, cfg, self.info)


def simulate_build(model, fmt: str, calibration: Calibration, awq_block_size: int | None = None, progress: Progress = print) -> SimulatedBuild:
    """A fake-quantized copy of the fp32 reference `model` (left untouched) for one format."""
    (fmt,) = parse_formats([fmt])
    if model.dtype != torch.float32:
        raise ConvLlavaError(f"simulated builds start from the fp32 reference (got {model.dtype} on {model.device})")
    if model.llm is None or model.vision is None:
        raise ConvLlavaError("simulated builds need the reference loaded with both the vision part and the LLM")
    device = model.device
    if device.type == "cpu":
        check_cpu_support(fmt)  # nvfp4: ModelOpt's kernel is CUDA-only; on a GPU every format runs
    spec = FORMATS[fmt]
    lcfg = model.llm.config
    block = resolve_awq_block_size(lcfg.hidden_size, lcfg.intermediate_size, awq_block_size) if fmt == "int4-awq" else None
    name = PREFIX + fmt
    counts: dict[str, dict[str, int]] = {}
    llm = _simulate_llm(model.llm, format_config(fmt, block or 128), name, spec.config, calibration.sequences, device, counts, progress)
    vision = model.vision
    if spec.vision:
        vision = _simulate_vision(model.vision, format_config(fmt), name, spec.config, calibration.pixels, device, counts, progress)
    sim_model = dataclasses.replace(model, llm=llm, vision=vision)
    info = {
        "backend": f"torch {device.type.upper()} + ModelOpt fake quantization",
        "simulated": True,
        "note": simulated_note(device.type),
        "format": fmt,
        "vision": f"{fmt} (simulated)" if spec.vision else "fp32 (torch reference)",
        "llm": f"{fmt} (simulated)",
        "modelopt": _modelopt_version(),
        "modelopt_config": spec.config,
        "describe": spec.describe,
        "quantizers": counts,
        "calibration": calibration.info,
    }
    if block is not None:
        info["awq_block_size"] = block
    progress(f"{name}: {counts['llm']['enabled']} LLM quantizers enabled" + (f", {counts['vision']['enabled']} vision" if "vision" in counts else ""))
    return SimulatedBuild(name, fmt, sim_model, info)


def _simulate_llm(
    llm: torch.nn.Module, config: dict[str, Any], name: str, config_name: str, seqs: Sequence[np.ndarray], device: torch.device, counts: dict[str, dict[str, int]], progress: Progress
) -> torch.nn.Module:
    """A fake-quantized copy of the LLM, calibrated on the multimodal prompts' embeddings; its
    quantizer counts go to counts["llm"]; refused when ModelOpt enabled none."""
    llm = copy.deepcopy(llm).eval()
    passes = [0]  # AWQ and SmoothQuant run the loop more than once

    def llm_loop(m: torch.nn.Module) -> None:
        passes[0] += 1
        label = f" (pass {passes[0]})" if passes[0] > 1 else ""
        with torch.no_grad():
            for i, seq in enumerate(seqs, 1):
                m(inputs_embeds=torch.from_numpy(np.asarray(seq, np.float32))[None].to(device))
                if i % 8 == 0 or i == len(seqs):
                    progress(f"{name}: calibrating the LLM{label} {i}/{len(seqs)} multimodal prompts")

    progress(f"{name}: ModelOpt {config_name} on the LLM")
    return _quantize_counted(llm, config, llm_loop, counts, "llm", f"{name}: ModelOpt enabled no quantizer in the LLM; the simulation would be the fp32 model")


def _simulate_vision(
    vision: torch.nn.Module, config: dict[str, Any], name: str, config_name: str, pixels: Sequence[np.ndarray], device: torch.device, counts: dict[str, dict[str, int]],
    progress: Progress,
) -> torch.nn.Module:
    """A fake-quantized copy of the tower + projector (Conv, Linear), calibrated on the images;
    its quantizer counts go to counts["vision"]; refused when ModelOpt enabled none."""
    vision = copy.deepcopy(vision).eval()

    def vision_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for i, px in enumerate(pixels, 1):
                m(torch.from_numpy(np.asarray(px, np.float32)).to(device))
                if i % 8 == 0 or i == len(pixels):
                    progress(f"{name}: calibrating the vision tower {i}/{len(pixels)} images")

    progress(f"{name}: ModelOpt {config_name} on the vision tower + projector (Conv, Linear)")
    return _quantize_counted(vision, config, vision_loop, counts, "vision", f"{name}: ModelOpt enabled no quantizer in the vision tower")


def _quantize_counted(model: torch.nn.Module, config: dict[str, Any], loop, counts: dict[str, dict[str, int]], part: str, none_enabled: str) -> torch.nn.Module:
    """ModelOpt on `model`, its quantizer counts recorded under `part`; refused when none is enabled."""
    model = _quantize(model, config, loop).eval()
    counts[part] = quantizer_counts(model)
    if counts[part]["enabled"] == 0:
        raise ConvLlavaError(none_enabled)
    return model
