"""vLLM general plugin (entry point `vllm.general_plugins`: convllava = ...:register).

vLLM calls `register` in every process it starts. The model is registered by its import path,
so vLLM imports it (and torch's model code) only when a folder names the architecture.
"""

from __future__ import annotations

from .common import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "convllava_export.plugins.vllm_model:ConvLlavaForConditionalGeneration")
