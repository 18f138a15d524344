"""`export llm`: the language model alone into a new folder, for either LLM backend.

The folder is written whole or not at all. A TensorRT-LLM checkpoint is made on any machine
(ModelOpt quantizes on the CPU); a note says when this machine's GPU could not run it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ConvLlavaError
from ..fsutil import atomic_output_dir, check_destination
from ..options import check_llm

Progress = Callable[[str], None]


def export_llm_folder(
    checkpoint: Path, output: Path, backend: str, fmt: str, precision: str, int4_block_size: int, llm_graph: str, awq_block_size: int,
    calib_images: str | None, prompts: Path | None, calib_limit: int, vision_tower: Path | None, force: bool, progress: Progress,
) -> None:
    row = check_llm(backend, precision, llm_graph, fmt)
    if backend == "tensorrt-llm":
        from ..engines.tensorrt_llm import gpu_note, local_compute_capability

        if row.calibrated and calib_images is None:
            raise ConvLlavaError(f"{precision} is calibrated on multimodal prompts: pass --calib-images DIR (or a `calibrate` set, or 'builtin' for the synthetic set)")
        note = gpu_note(precision, local_compute_capability())
        if note:  # a checkpoint is made anywhere; it runs on the GPU it is meant for
            progress(f"note: {note}; the checkpoint is written all the same, for the GPU that will run it")
    check_destination(output, force)
    with atomic_output_dir(output, force) as tmp:
        if backend == "onnxruntime":
            from ..checkpoint import read_checkpoint
            from .llm import export_llm_from_checkpoint

            export_llm_from_checkpoint(read_checkpoint(checkpoint, vision_tower), tmp, precision, int4_block_size, progress, llm_graph)
        else:
            from .trtllm import export_llm_tensorrt

            meta = export_llm_tensorrt(checkpoint, tmp, precision, fmt, awq_block_size, calib_images, prompts, calib_limit, vision_tower, progress)
            if "next" in meta:
                nxt = meta["next"].replace(str(tmp), str(output))
            else:  # the PyTorch backend: recorded beside the checkpoint, with the route for images
                import json

                from ..engines.tensorrt_llm import META
                from .trtllm import serve_notes

                meta["serve"] = serve_notes(output, checkpoint)
                (tmp / META).write_text(json.dumps(meta, indent=2))
                nxt = f"{meta['serve']['text']} (text; docs/tensorrt-llm.md). For images: {meta['serve']['images']}"
            progress(f"quant_algo {meta['quant_algo']}; next, on the GPU: {nxt}")
