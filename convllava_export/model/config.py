"""The transformers configs of a LLaVA checkpoint's parts, read from its config.json files.

A leaf of the model package (transformers only), so sizing, the exporters and the reference
read the same configs without importing the reference model.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import ConvNextConfig, LlamaConfig

LLAVA_ONLY_FIELDS = {"architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype"}


def llama_config(config: dict[str, Any]) -> LlamaConfig:
    """The LLaMA part of a LLaVA config.json."""
    fields = {k: v for k, v in config.items() if k not in LLAVA_ONLY_FIELDS and not k.startswith("mm_")}
    if fields.get("rope_scaling") is None:
        fields.pop("rope_scaling", None)
    with warnings.catch_warnings():  # 'rope_scaling is deprecated': released configs use it
        warnings.simplefilter("ignore", FutureWarning)
        return LlamaConfig(**fields)


def tower_config(config: dict[str, Any]) -> ConvNextConfig:
    fields = {k: v for k, v in config.items() if k not in LLAVA_ONLY_FIELDS}
    return ConvNextConfig(**fields)
