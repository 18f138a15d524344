"""convllava-export: export ConvLLaVA checkpoints to ONNX Runtime, TensorRT and TensorRT-LLM."""

import os as _os

# No model hub is reachable where this tool runs; never let transformers try.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
