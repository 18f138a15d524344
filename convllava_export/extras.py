"""Lazy imports of optional dependencies, each reported in one line naming the extra."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingExtraError

EXTRAS = {
    "tensorrt": "gpu",
    "onnxruntime_gpu": "gpu",
    "tensorrt_llm": "trtllm",
    "modelopt": "quant",
    "ray": "ray",
    "onnxruntime_genai": "genai",
    "llama_cpp": "bench",
    "gguf": "bench",
}


def require(module: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import `module` or raise a one-line error telling which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on environment
        top = module.split(".")[0]
        extra = extra or EXTRAS.get(top, top)
        why = f" (needed for {purpose})" if purpose else ""
        raise MissingExtraError(
            f"'{top}' is not installed{why}: pip install 'convllava-export[{extra}]' ({exc})"
        ) from None


def available(module: str) -> bool:
    """True when `module` can be imported (without importing side effects beyond find_spec)."""
    return importlib.util.find_spec(module) is not None
