"""TensorRT-LLM path for the language model.

1. Quantize the LLaMA decoder with NVIDIA ModelOpt, calibrated on *multimodal* prompts: real
   image features spliced into templated prompts (what the model will see), then export a
   TensorRT-LLM checkpoint. Runs on CPU for small models (tested here).
2. `trtllm-build` with a prompt-embedding table big enough for max batch × max visual tokens
   (the command is computed here; running it needs TensorRT-LLM and a GPU).
3. At run time image rows become fake ids `vocab_size + i` into the prompt table
   (`prompt.prompt_table_ids`).

Targets the TensorRT-engine flow of TensorRT-LLM 1.x (deprecated there, removed after 1.2)
and the v0.12 Jetson branch.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExportError
from ..extras import require

# our name → (ModelOpt config, TensorRT-LLM quant_algo we expect in the exported config)
PRECISIONS: dict[str, tuple[str | None, str | None]] = {
    "fp16": (None, None),
    "int8-sq": ("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL"),
    "int8": ("INT8_WEIGHT_ONLY_CFG", "W8A16"),
    "fp8": ("FP8_DEFAULT_CFG", "FP8"),
    "int4-awq": ("INT4_AWQ_CFG", "W4A16_AWQ"),
}
GPU_ONLY = {"fp8": (8, 9)}  # FP8 kernels: Ada/Hopper
META = "convllava_trtllm.json"
Progress = Callable[[str], None]


def check_precision(precision: str, compute_capability: tuple[int, int] | None) -> None:
    if precision not in PRECISIONS:
        raise ExportError(f"precision '{precision}' is not available for the tensorrt-llm backend (use {', '.join(PRECISIONS)})")
    need = GPU_ONLY.get(precision)
    if need and (compute_capability is None or tuple(compute_capability) < need):
        where = "no CUDA GPU is visible" if compute_capability is None else f"this GPU is sm_{''.join(map(str, compute_capability))}"
        raise ExportError(f"{precision} needs an Ada/Hopper GPU (sm_89 or newer) to calibrate and run, and {where}; use int8-sq or int4-awq")


def local_compute_capability() -> tuple[int, int] | None:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return (p.major, p.minor)
    return None


def _modelopt_config(precision: str, awq_block_size: int) -> dict[str, Any]:
    mtq = require("modelopt.torch.quantization", "quant", "TensorRT-LLM quantization")
    cfg = copy.deepcopy(getattr(mtq, PRECISIONS[precision][0]))
    if precision == "int4-awq":
        entries = cfg["quant_cfg"]
        items = entries if isinstance(entries, list) else [{"quantizer_name": k, "cfg": v} for k, v in entries.items()]
        for item in items:
            if item.get("quantizer_name") == "*weight_quantizer" and isinstance(item.get("cfg"), dict):
                item["cfg"]["block_sizes"] = {-1: awq_block_size, "type": "static"}
        if not isinstance(entries, list):
            cfg["quant_cfg"] = {i["quantizer_name"]: i["cfg"] for i in items}
    return cfg


def export_trtllm_checkpoint(
    llm: torch.nn.Module,
    calib_sequences: Sequence[np.ndarray],
    precision: str,
    dest: Path,
    awq_block_size: int = 128,
    dtype: torch.dtype = torch.float16,
    progress: Progress = print,
) -> dict[str, Any]:
    """ModelOpt-quantize `llm` on spliced multimodal embeddings, write a TensorRT-LLM checkpoint."""
    check_precision(precision, local_compute_capability() if precision in GPU_ONLY else (9, 0))
    me = require("modelopt.torch.export", "quant", "TensorRT-LLM checkpoints")
    hidden = llm.config.hidden_size
    if precision == "int4-awq" and (hidden % awq_block_size or llm.config.intermediate_size % awq_block_size):
        raise ExportError(f"int4-awq block size {awq_block_size} must divide hidden {hidden} and intermediate {llm.config.intermediate_size}")
    model = llm
    dest.mkdir(parents=True, exist_ok=True)
    calib_info: dict[str, Any] = {"sequences": len(calib_sequences), "tokens": int(sum(len(s) for s in calib_sequences))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if PRECISIONS[precision][0] is not None:
            if not calib_sequences:
                raise ExportError(f"{precision} needs calibration prompts (images spliced into templated prompts)")
            mtq = require("modelopt.torch.quantization", "quant", "TensorRT-LLM quantization")
            device = next(model.parameters()).device

            def forward_loop(m: torch.nn.Module) -> None:
                with torch.no_grad():
                    for i, seq in enumerate(calib_sequences, 1):
                        m(inputs_embeds=torch.from_numpy(np.asarray(seq, np.float32))[None].to(device, next(m.parameters()).dtype))
                        if i % 8 == 0 or i == len(calib_sequences):
                            progress(f"calibrating {precision}: {i}/{len(calib_sequences)} multimodal prompts")

            model = mtq.quantize(model, _modelopt_config(precision, awq_block_size), forward_loop)
        progress(f"writing the TensorRT-LLM checkpoint to {dest}")
        me.export_tensorrt_llm_checkpoint(model, "llama", dtype, str(dest), inference_tensor_parallel=1)
    config = json.loads((dest / "config.json").read_text())
    got = (config.get("quantization") or {}).get("quant_algo")
    want = PRECISIONS[precision][1]
    if got != want:
        raise ExportError(f"ModelOpt wrote quant_algo {got!r} for {precision}, expected {want!r}")
    # ModelOpt pads the vocabulary for some kernels (int4-awq: 1000 → 1024); TensorRT-LLM's
    # fake prompt-table ids start at the *engine's* vocab size, so record that one.
    meta = {
        "precision": precision,
        "quant_algo": got,
        "vocab_size": llm.config.vocab_size,
        "prompt_table_base": int(config["vocab_size"]),
        "hidden_size": hidden,
        "calibration": calib_info,
    }
    (dest / META).write_text(json.dumps(meta, indent=2))
    return meta


@dataclass
class TrtLlmBuildConfig:
    max_batch_size: int = 4
    max_input_len: int = 2048  # text + visual tokens of one prompt
    max_seq_len: int = 2560  # prompt + generated
    max_visual_tokens: int = 576  # per image
    max_images_per_prompt: int = 1
    gemm_plugin: str = "auto"

    @property
    def prompt_table_size(self) -> int:
        """Rows the engine's prompt table must hold: every image of every sequence in a batch."""
        return self.max_batch_size * self.max_visual_tokens * self.max_images_per_prompt

    def validate(self) -> None:
        if self.max_input_len <= self.max_visual_tokens * self.max_images_per_prompt:
            raise ExportError(f"max_input_len {self.max_input_len} leaves no room for text after {self.max_visual_tokens * self.max_images_per_prompt} visual tokens")
        if self.max_seq_len <= self.max_input_len:
            raise ExportError(f"max_seq_len {self.max_seq_len} must exceed max_input_len {self.max_input_len}")


def trtllm_build_command(checkpoint_dir: Path, engine_dir: Path, cfg: TrtLlmBuildConfig) -> list[str]:
    cfg.validate()
    return [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(engine_dir),
        "--max_batch_size", str(cfg.max_batch_size),
        "--max_input_len", str(cfg.max_input_len),
        "--max_seq_len", str(cfg.max_seq_len),
        "--max_prompt_embedding_table_size", str(cfg.prompt_table_size),
        "--gemm_plugin", cfg.gemm_plugin,
    ]  # fmt: skip


def build_trtllm_engine(checkpoint_dir: Path, engine_dir: Path, cfg: TrtLlmBuildConfig, progress: Progress = print) -> Path:
    require("tensorrt_llm", "trtllm", "TensorRT-LLM engines")
    if shutil.which("trtllm-build") is None:
        raise ExportError("trtllm-build is not on PATH: install TensorRT-LLM (pip install 'convllava-export[trtllm]')")
    cmd = trtllm_build_command(checkpoint_dir, engine_dir, cfg)
    progress(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExportError(f"trtllm-build failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    (engine_dir / "convllava_build.json").write_text(json.dumps(asdict(cfg), indent=2))
    return engine_dir


class TrtLlmGenerator:
    """TensorRT-LLM engine runner: spliced prompts go in as ids + a prompt-embedding table."""

    def __init__(self, engine_dir: Path) -> None:
        require("tensorrt_llm", "trtllm", "TensorRT-LLM engines")
        from tensorrt_llm.runtime import ModelRunner

        self.runner = ModelRunner.from_dir(str(engine_dir))
        self.meta = json.loads((Path(engine_dir) / "convllava_build.json").read_text())

    def generate(self, ids: Sequence[int], images: Sequence[np.ndarray], vocab_size: int, max_new_tokens: int, end_id: int, pad_id: int = 0, temperature: float = 1.0, top_p: float = 1.0) -> list[int]:
        from ..prompt import prompt_table_ids

        counts = [len(im) for im in images]
        fake = prompt_table_ids(ids, counts, vocab_size)
        table = torch.from_numpy(np.concatenate(images)).to(torch.float16).cuda()[None]
        out = self.runner.generate(
            batch_input_ids=[torch.tensor(fake, dtype=torch.int32)],
            prompt_table=table,
            prompt_tasks="0",
            max_new_tokens=max_new_tokens,
            end_id=end_id,
            pad_id=pad_id,
            temperature=max(temperature, 1e-5),
            top_k=1 if temperature == 0 else 0,
            top_p=top_p,
        )
        return out[0, 0, len(fake):].tolist()
