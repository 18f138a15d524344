"""convllava-export: export ConvLLaVA checkpoints to ONNX Runtime, TensorRT and TensorRT-LLM."""

import os as _os

# No model hub is reachable where this tool runs; never let transformers try.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# What our commands set for their own kernels (cli.py, before torch loads), so that a peer server a
# benchmark starts does not inherit it. Not set on import: inside vLLM (our plugin) it would reach
# vLLM's own engine processes.
OWN_ENV: dict[str, str] = {}


def set_kernel_env() -> None:
    """torch's OpenMP workers sleep at once after a parallel region instead of spinning: the bf16
    prompt kernel unpacks weights on its own threads between GEMMs, and spinning workers halved
    that on 2 cores (engines/native_llm.py). libgomp reads it when torch loads."""
    for k, v in {"GOMP_SPINCOUNT": "0"}.items():
        if k not in _os.environ:
            _os.environ[k] = OWN_ENV[k] = v

__version__ = "0.1.0"
