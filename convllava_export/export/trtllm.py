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

from ..precisions import precision as precision_row

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
    from ..progress import release_memory

    cuda = _cuda()  # calibrate on the GPU when there is one (the model is held in GPU memory there)
    dtype = "fp16" if cuda else _cpu_dtype(checkpoint, vision_tower, precision, progress)
    ref = ReferenceModel.load(checkpoint, vision_tower=vision_tower, dtype=dtype, device="cuda" if cuda else "cpu", progress=progress)
    seqs: Sequence[np.ndarray] = [] if not precision_row("llm", "tensorrt-llm", precision).calibrated else calibration_sequences(ref, calib_images, prompts, calib_limit, progress)
    llm, info = ref.llm, ref.info
    del ref  # the tower goes before ModelOpt builds its quantized copy of the LLM
    release_memory()
    meta = export_checkpoint(llm, seqs, precision, folder, fmt, awq_block_size, progress=progress)
    if fmt == "hf":
        from ..tokenizer import copy_tokenizer

        copy_tokenizer(info.path, folder)  # tensorrt_llm.LLM / trtllm-serve read the tokenizer from the folder
        return meta
    tokens = (PreprocessConfig.from_preprocessor_config(info.preprocessor_config).resolution // 64) ** 2
    meta["next"] = " ".join(trtllm_build_command(folder, folder / "engine", TrtLlmBuildConfig(max_visual_tokens=tokens)))
    return meta


def serve_notes(folder: Path | str, checkpoint: Path | str = "CHECKPOINT") -> dict[str, str]:
    """How the PyTorch-backend checkpoint in `folder` is served: the LLM alone, on text; images
    through the whole model written by `export vllm` and our custom module
    (`convllava_export/plugins/trtllm`, TensorRT-LLM 1.2.x / 1.3.x, not yet run on a GPU)."""
    from ..plugins.trtllm_core import MODULE_DIR_SHELL, serve_shell

    return {
        "text": f"trtllm-serve {folder}",
        "images": f"convllava-export export vllm {checkpoint} -o FOLDER && {serve_shell('FOLDER')}",
        "custom_module_dirs": MODULE_DIR_SHELL,
        "note": "this checkpoint is the quantized LLM alone and serves text; images need the tower and projector, "
                "which the `export vllm` folder holds (unquantized) and the custom module registers (docs/tensorrt-llm.md)",
    }


def _cpu_dtype(checkpoint: str | Path, vision_tower: str | Path | None, precision: str, progress: Progress) -> str:
    """The LLM's dtype for a CPU export: fp32 where it fits, else the checkpoint's; refused (exit 2)
    before anything loads when its phases would not fit in the memory available."""
    from ..checkpoint import read_checkpoint
    from ..errors import ExportError
    from ..sizing import GB, available_memory, model_size, reference_dtype, trtllm_export_memory

    size, budget = model_size(read_checkpoint(checkpoint, vision_tower)), available_memory()
    dtype, why = reference_dtype(size, "auto", with_vision=True, budget=budget)
    phases = trtllm_export_memory(size, precision_row("llm", "tensorrt-llm", precision), dtype)
    worst = max(phases, key=phases.__getitem__)
    progress(f"estimated peak memory {phases[worst] / GB:.1f} GB ({worst}), {budget / GB:.1f} GB available; the LLM in {dtype}: {why}")
    if phases[worst] > budget:
        raise ExportError(
            f"this export needs about {phases[worst] / GB:.1f} GB of memory at its peak ({worst}: the {dtype} LLM "
            f"{'and the vision tower' if worst == 'calibration' else 'and its quantized copy'}), {budget / GB:.1f} GB is available: "
            "run it on a machine with more memory, or on the GPU (the model is then held in GPU memory)"
        )
    return dtype


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
