"""`export llm --backend tensorrt-llm`: the LLM quantized by ModelOpt for TensorRT-LLM.

`fmt="engine"`: a TensorRT-LLM checkpoint for `trtllm-build` (TensorRT-LLM 0.12-jetson..1.2.x);
`fmt="hf"`: ModelOpt's unified Hugging Face checkpoint for the PyTorch backend (1.x, the only
flow from 1.3). Both calibrate on multimodal prompts: the calibration images through the
tower, spliced into templated questions, as the model will see them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Progress = Callable[[str], None]


def calibration_sequences(ref: Any, calib_images: str | None, prompts: str | Path | None, limit: int, progress: Progress) -> list[np.ndarray]:
    """The spliced prompts ModelOpt calibrates on (calibration.dataset.multimodal_calibration),
    at the checkpoint's own preprocessing."""
    from ..calibration.dataset import multimodal_calibration
    from ..preprocess import PreprocessConfig

    cfg = PreprocessConfig.from_preprocessor_config(ref.info.preprocessor_config)
    _, seqs, source = multimodal_calibration(ref, cfg, calib_images, limit, prompts, progress)
    progress(f"{len(seqs)} multimodal calibration prompts from {source}")
    return seqs


def export_llm_tensorrt(
    checkpoint: str | Path,
    folder: Path,
    precision: str,
    fmt: str = "engine",
    awq_block_size: int = 128,
    calib_images: str | None = None,
    prompts: str | Path | None = None,
    calib_limit: int = 32,
    vision_tower: str | Path | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    """Quantize and write the checkpoint of `fmt` into `folder`; returns its metadata (for the
    engine flow with `next`: the trtllm-build command to run on the GPU)."""
    from ..engines.tensorrt_llm import TrtLlmBuildConfig, export_checkpoint, trtllm_build_command
    from ..model.reference import ReferenceModel
    from ..preprocess import PreprocessConfig

    cuda = _cuda()  # calibrate on the GPU when there is one (minutes at 7B); on CPU in fp32, which works for every format
    ref = ReferenceModel.load(checkpoint, vision_tower=vision_tower, dtype="fp16" if cuda else "fp32", device="cuda" if cuda else "cpu", progress=progress)
    seqs: Sequence[np.ndarray] = [] if precision == "fp16" else calibration_sequences(ref, calib_images, prompts, calib_limit, progress)
    meta = export_checkpoint(ref.llm, seqs, precision, folder, fmt, awq_block_size, progress=progress)
    if fmt == "hf":
        from ..tokenizer import copy_tokenizer

        copy_tokenizer(ref.info.path, folder)  # tensorrt_llm.LLM / trtllm-serve read the tokenizer from the folder
        return meta
    tokens = (PreprocessConfig.from_preprocessor_config(ref.info.preprocessor_config).resolution // 64) ** 2
    meta["next"] = " ".join(trtllm_build_command(folder, folder / "engine", TrtLlmBuildConfig(max_visual_tokens=tokens)))
    return meta


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
