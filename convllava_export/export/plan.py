"""What `build` is asked (BuildOptions) and what it settled before any work (ResolvedBuild).

The resolved build is made once, passed explicitly to each part's builder (export/parts.py) and never
changed: the precision rows, the part backends, the preprocessing, the vision profile, the
token budget, the memory and disk estimate and each part's own settings (the LLM graph, the
TensorRT-LLM engine shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..precisions import PartBackend, Precision


@dataclass
class BuildOptions:
    target: str = "cpu"
    vision_precision: str = "fp32"
    llm_precision: str = "fp32"
    mode: str = "pad"
    resolution: int | None = None
    max_tokens: int | None = None
    calib_images: str | None = None
    calib_method: str = "minmax"
    calib_limit: int = 64
    min_size: str = "64x64"
    opt_size: str | None = None
    max_size: str = "2048x2048"
    max_batch: int = 4
    int4_block_size: int = 128  # export/stream_quant.py BLOCK_SIZE
    kv_cache: str = "auto"  # precisions.KV_CACHES: int8 = int8 KV cache of the gqa graph
    llm_graph: str = "auto"  # "dynamo", or "gqa" (ORT's fused attention layout; needs onnxruntime-genai); auto: export/llm.choose_graph
    llm_backend: str = "onnxruntime"  # or "tensorrt-llm": ModelOpt + trtllm-build (engine flow)
    awq_block_size: int = 128  # tensorrt-llm int4-awq group size
    calib_prompts: str | None = None  # tensorrt-llm: JSONL of calibration questions (default: built in)
    threads: int | None = None
    vision_tower: str | None = None
    force: bool = False
    smoke_test: bool = True
    reference_dtype: str = "auto"  # the torch reference the smoke test compares with (sizing.py)
    min_vision_cosine: float | None = None  # smoke-test gates; None: the precision's default (gates.py)
    min_token_agreement: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedPart:
    """One part of the build: its backend, its precision row and the settings its builder chose
    (`llm`: graph and why, or the TensorRT-LLM engine config; `vision`: none)."""

    backend: PartBackend
    row: Precision
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.backend.backend


@dataclass(frozen=True)
class ResolvedBuild:
    checkpoint: Any  # path of the checkpoint
    opts: BuildOptions
    target: Any  # targets.Target
    info: Any  # checkpoint.CheckpointInfo
    size: Any  # sizing.ModelSize
    budget: int  # memory available at the start (bytes)
    pcfg: Any  # preprocess.PreprocessConfig
    profile: Any  # engines.profiles.VisionProfile
    max_visual: int  # visual tokens per image
    max_context: int
    parts: dict[str, ResolvedPart]  # "vision", "llm"

    @property
    def vision(self) -> ResolvedPart:
        return self.parts["vision"]

    @property
    def llm(self) -> ResolvedPart:
        return self.parts["llm"]
