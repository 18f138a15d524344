"""Every list of precisions, LLM backends and graphs, defined once.

A leaf module (no imports from this package), so the CLI's choices, `build`'s validation, the
exporters and the runtime's registry read the same tuples. Which target runs which vision
precision is in `targets.py`; the per-precision smoke-test thresholds are in `gates.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

# vision tower + projector: ONNX graphs (and TensorRT engines built from them)
VISION = ("fp32", "fp16", "int8", "fp8")
CALIBRATED_VISION = ("int8", "fp8")  # need calibration images
DEVICES = ("cpu", "cuda")  # where ONNX Runtime and the torch reference run

# LLM on ONNX Runtime: our dynamo export takes all four; ORT's fused gqa layout three of them
ORT_LLM = ("fp32", "fp16", "int8", "int4")
GQA_LLM = ("fp32", "int8", "int4")
LLM_GRAPHS = ("dynamo", "gqa")  # the ONNX Runtime decoder layouts (`auto` chooses one, export/llm.py)

# the torch reference's dtype (`auto`: fp32 when it fits in memory, else the checkpoint's; sizing.py)
REFERENCE_DTYPES = ("auto", "fp32", "bf16", "fp16")
# activation-range calibration of int8 vision graphs (calibration/ranges.py)
CALIB_METHODS = ("minmax", "entropy", "percentile")

# LLM backends a build can hold, and the runtime backends a manifest can name
LLM_BACKENDS = ("onnxruntime", "tensorrt-llm")
VISION_RUNTIMES = ("onnxruntime", "tensorrt", "torch")
LLM_RUNTIMES = ("onnxruntime", "tensorrt-llm", "torch")


@dataclass(frozen=True)
class ModelOptFormat:
    """One ModelOpt quantization format: its config in `modelopt.torch.quantization` and the
    `quant_algo` ModelOpt writes into the exported checkpoint's config for it."""

    config: str | None  # None: no quantization (fp16)
    quant_algo: str | None
    describe: str


MODELOPT: dict[str, ModelOptFormat] = {
    "fp16": ModelOptFormat(None, None, "fp16 weights and activations"),
    "int8": ModelOptFormat("INT8_WEIGHT_ONLY_CFG", "W8A16", "INT8 per-channel weights, fp16 activations"),
    "int8-sq": ModelOptFormat("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL", "INT8 SmoothQuant: per-channel weights, per-tensor activations"),
    "fp8": ModelOptFormat("FP8_DEFAULT_CFG", "FP8", "FP8 E4M3 per-tensor weights and activations"),
    "int4-awq": ModelOptFormat("INT4_AWQ_CFG", "W4A16_AWQ", "INT4 blockwise weights with AWQ-lite scaling, fp16 activations"),
    "nvfp4": ModelOptFormat("NVFP4_DEFAULT_CFG", "NVFP4", "NVFP4: E2M1 weights and activations in 16-element blocks with FP8 scales"),
    "w4a8-awq": ModelOptFormat("W4A8_AWQ_BETA_CFG", "W4A8_AWQ", "INT4 AWQ weights with FP8 activations"),
}

# TensorRT-LLM, engine flow (`trtllm-build`, TensorRT-LLM 0.12-jetson .. 1.2.x): what `build
# --llm-backend tensorrt-llm` and `export llm --backend tensorrt-llm` make
TRTLLM_ENGINE = ("fp16", "int8", "int8-sq", "fp8", "int4-awq")
# TensorRT-LLM, PyTorch backend (ModelOpt's unified Hugging Face checkpoint): `export llm
# --backend tensorrt-llm --format hf`; no INT8 SmoothQuant there
TRTLLM_HF = ("fp16", "fp8", "nvfp4", "int4-awq", "w4a8-awq")
TRTLLM_FORMATS = ("engine", "hf")
AWQ = tuple(p for p in MODELOPT if p.endswith("-awq"))  # formats with an AWQ group size
# the ONNX Runtime precision whose weight bytes a TensorRT-LLM precision matches (memory/disk estimates)
TRTLLM_BYTES_LIKE = {"fp16": "fp16", "int8": "int8", "int8-sq": "int8", "fp8": "int8", "int4-awq": "int4", "nvfp4": "int4", "w4a8-awq": "int4"}

# formats `validate --simulate` fake-quantizes on CPU (ModelOpt); the vision tower too for fp8
SIMULATED = ("fp8", "int4-awq", "nvfp4", "int8-sq")
SIMULATED_VISION = ("fp8",)

# minimum compute capability to *run* each TensorRT-LLM format (its checkpoint is made on any
# machine: ModelOpt 0.47 calibrates and packs every format on the CPU; only fake-quantized
# *inference* of nvfp4, `validate --simulate nvfp4`, needs CUDA); docs/tensorrt-llm.md
TRTLLM_MIN_CC: dict[str, tuple[int, int]] = {
    "fp8": (8, 9),  # Ada, Hopper, Blackwell
    "w4a8-awq": (8, 9),  # FP8 activations
    "nvfp4": (10, 0),  # Blackwell FP4 tensor cores
}
