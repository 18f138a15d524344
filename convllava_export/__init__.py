"""convllava-export: export ConvLLaVA checkpoints to ONNX Runtime, TensorRT and TensorRT-LLM."""

import os as _os

# No model hub is reachable where this tool runs; never let transformers try.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# torch's OpenMP workers sleep at once after a parallel region instead of spinning: the bf16 prompt
# kernel unpacks weights on its own threads between GEMMs, and spinning workers halved that on 2
# cores (engines/bf16_prefill.py). Read when torch loads, so it only takes effect before that.
# OWN_ENV lists what we set, so a peer server a benchmark starts does not inherit it.
OWN_ENV = {k: v for k, v in {"GOMP_SPINCOUNT": "0"}.items() if k not in _os.environ}
_os.environ.update(OWN_ENV)

__version__ = "0.1.0"
