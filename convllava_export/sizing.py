"""What a checkpoint weighs and what a command will need, from its configs alone.

`build` and the reference loaders decide before they allocate: the reference runs in fp32
when fp32 fits in the memory available and in the checkpoint's dtype otherwise; a build
whose memory or disk need is not there stops with exit 2 before writing anything. The
per-phase factors are measured on the 7B shapes (benchmarks/real_size.py, docs/real-size.md).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .model.config import llama_config, tower_config
from .model.vision import ConvNextFeatures, build_projector
from .checkpoint import DTYPES, CheckpointInfo, dtype_name, weights_dtype
from .precisions import REFERENCE_DTYPES, Precision
from .errors import BuildError

GB = 1e9
BASE_BYTES = 1.2 * GB  # interpreter, torch, onnxruntime, tokenizer


@dataclass(frozen=True)
class ModelSize:
    llm_params: int
    vision_params: int  # tower + projector
    vocab: int
    hidden: int
    weights_dtype: torch.dtype

    @property
    def llm_bytes(self) -> int:
        """The LLM as stored (and as loaded in its own dtype)."""
        return self.llm_bytes_in(self.weights_dtype)

    def llm_bytes_in(self, dtype: torch.dtype) -> int:
        return self.llm_params * dtype.itemsize

    @property
    def vision_fp32_bytes(self) -> int:
        return self.vision_params * 4


def model_size(info: CheckpointInfo) -> ModelSize:
    """Parameter counts from the configs (meta tensors: nothing is allocated or read)."""
    cfg = llama_config(info.config)
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kvh = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or h // heads
    per_layer = h * heads * hd * 2 + h * kvh * hd * 2 + 3 * h * inter + 2 * h
    llm = layers * per_layer + h + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    with torch.device("meta"):
        tower = ConvNextFeatures(tower_config(info.tower_config))
        proj = build_projector(info.projector_type, info.config["mm_hidden_size"], h)
    vision = sum(p.numel() for p in tower.parameters()) + sum(p.numel() for p in proj.parameters())
    return ModelSize(llm, vision, cfg.vocab_size, h, weights_dtype(info))


def available_memory() -> int:
    """MemAvailable, bounded by the cgroup's limit where one is set (containers, CI)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            used = 0
            for cur in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                try:
                    used = int(Path(cur).read_text().strip())
                    break
                except (OSError, ValueError):
                    continue
            avail = min(avail, int(raw) - used)
    override = os.environ.get("CONVLLAVA_EXPORT_MEMORY_GB")  # to rehearse a smaller machine
    if override:
        avail = min(avail, int(float(override) * GB))
    return avail


def free_disk(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def reference_dtype(size: ModelSize, requested: str = "auto", with_vision: bool = True, budget: int | None = None) -> tuple[str, str]:
    """(dtype, why): fp32 when it fits in `budget` (default: memory available now), else the
    checkpoint's own dtype. A forced dtype is taken as given."""
    if requested not in REFERENCE_DTYPES:
        raise BuildError(f"unknown reference dtype '{requested}' (use {', '.join(REFERENCE_DTYPES)})")
    own = dtype_name(size.weights_dtype)
    if requested != "auto":
        return requested, f"--reference-dtype {requested}"
    budget = available_memory() if budget is None else budget
    need = size.llm_bytes_in(torch.float32) + (size.vision_fp32_bytes if with_vision else 0) + BASE_BYTES
    if need <= budget:
        return "fp32", f"fp32 fits ({need / GB:.1f} GB of {budget / GB:.1f} GB available)"
    if own == "fp32":
        own = "bf16"
    return own, f"fp32 would need {need / GB:.1f} GB, {budget / GB:.1f} GB available: running the reference in {own}"


def trace_dtype(size: ModelSize, precision: Precision, budget: int | None = None) -> str:
    """The dtype the dynamo graph is traced in: fp32 when an fp32 copy fits (exact, as small
    models always were), else the checkpoint's own dtype, which stream_quant.py rewrites to
    fp32 activations tensor by tensor (fp16 builds are traced in fp16)."""
    if precision.weight_bytes == 2 and not precision.block_scaled:
        return "fp16"
    budget = available_memory() if budget is None else budget
    if BASE_BYTES + 1.1 * size.llm_bytes_in(torch.float32) <= budget:
        return "fp32"
    return dtype_name(size.weights_dtype)


def quantized_llm_bytes(size: ModelSize, precision: Precision, block: int = 128) -> int:
    """Bytes of the exported decoder graph (or checkpoint) plus its fp32/fp16 embedding table."""
    matmul = size.llm_params - size.vocab * size.hidden  # the table is outside the graph
    per = precision.bytes_per_weight(block)
    table = size.vocab * size.hidden * (2 if size.weights_dtype == torch.float16 else 4)
    return int(matmul * per + table)


def trtllm_export_memory(size: ModelSize, precision: Precision, dtype: str) -> dict[str, int]:
    """Peak memory of each phase of a ModelOpt export on the CPU (`export llm --backend
    tensorrt-llm`): calibration holds the LLM in `dtype` and the fp32 tower that makes the image
    features; the export holds the LLM and the quantized copy ModelOpt builds before writing it
    (the tower is dropped by then). At 7B, fp16 LLM, fp8: 23.3 GB measured while the tower was
    still held in the export phase (what this model gives with it), 21.5 GB measured without it
    against 21.6 GB estimated (benchmarks/results/real_size_7b_trtllm_hf.json, BENCHMARKS.md)."""
    llm = size.llm_bytes_in(DTYPES[dtype])
    return {
        "calibration": int(BASE_BYTES + llm + size.vision_fp32_bytes),
        "export": int(BASE_BYTES + llm + quantized_llm_bytes(size, precision)),
    }


@dataclass
class Estimate:
    memory: int
    disk: int
    phases: dict[str, int] = field(default_factory=dict)
    reference_dtype: str = "fp32"
    reference_why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory_gb": round(self.memory / GB, 2), "disk_gb": round(self.disk / GB, 2),
            "phases_gb": {k: round(v / GB, 2) for k, v in self.phases.items()},
            "reference_dtype": self.reference_dtype, "reference_why": self.reference_why,
        }


def estimate_build(
    size: ModelSize, vision: Precision, llm: Precision, llm_graph: str | None, block: int, reference: str, smoke_test: bool, budget: int
) -> Estimate:
    """Peak memory of each build phase (they run one after another) and the disk the build
    folder and its scratch files take at their largest. `vision` and `llm` are precision rows
    (their bytes per weight); `llm_graph` is the ONNX layout (None for TensorRT-LLM)."""
    ref_dtype, why = reference_dtype(size, reference, with_vision=False, budget=budget)
    v32 = size.vision_fp32_bytes
    built_llm = quantized_llm_bytes(size, llm, block)
    phases = {
        # torch model + exported program + ORT sessions optimizing / calibrating the graph
        "vision export": BASE_BYTES + int(3.5 * v32),
        # gqa: the builder holds the LLM in its own dtype; dynamo: torch traces it in that dtype
        "LLM export": BASE_BYTES + int(1.1 * (size.llm_bytes if llm_graph == "gqa" else size.llm_bytes_in(DTYPES[trace_dtype(size, llm, budget)]))),
        "LLM rewrite": BASE_BYTES + 3 * size.vocab * size.hidden * 4,
    }
    if smoke_test:
        # the LLM alone: the reference image embeddings were computed in the vision phase
        phases["reference check"] = BASE_BYTES + size.llm_bytes_in(DTYPES[ref_dtype])
        phases["smoke test"] = BASE_BYTES + built_llm + int(v32 * max(vision.weight_bytes, 2.0) / 4)
    # the graph and its CPU-optimized copy, plus the fp32 graph it was made from
    vision_disk = int(v32 * vision.weight_bytes / 2) + (v32 if vision.weight_bytes < 4 else 0)
    scratch = size.llm_params * 4 if llm_graph == "gqa" else size.llm_bytes  # builder's fp32 graph / traced graph
    if llm.weight_bytes == 4 and llm_graph == "dynamo" and size.weights_dtype == torch.float32:
        scratch = 0
    disk = vision_disk + built_llm + scratch
    return Estimate(max(phases.values()), disk, phases, ref_dtype, why)


def check_fits(est: Estimate, dest: Path, budget: int, size: ModelSize, llm: Precision, smallest: Precision) -> None:
    """Exit-2 refusal, before any work, when memory or disk is short, naming what lowers it."""
    free = free_disk(Path(dest).parent)
    if est.disk > free:
        raise BuildError(
            f"this build needs about {est.disk / GB:.1f} GB of disk at its largest (scratch files included), "
            f"{free / GB:.1f} GB is free under {Path(dest).parent}: free some space or build to another disk (-o)"
        )
    if est.memory <= budget:
        return
    worst = max(est.phases, key=est.phases.get)
    hints = {
        "smoke test": f"the built {llm.name} LLM alone takes {quantized_llm_bytes(size, llm) / GB:.1f} GB; "
        f"{smallest.name} takes {quantized_llm_bytes(size, smallest) / GB:.1f} GB (--llm-precision {smallest.name})",
        "reference check": "compare against a smaller reference (--reference-dtype bf16) or skip the check (--no-smoke-test)",
        "LLM export": f"the LLM takes {size.llm_bytes / GB:.1f} GB in its stored dtype; close other programs or build on a larger machine",
    }
    raise BuildError(
        f"this build needs about {est.memory / GB:.1f} GB of memory at its peak ({worst}), {budget / GB:.1f} GB is available: "
        + hints.get(worst, "close other programs or build on a larger machine")
    )
