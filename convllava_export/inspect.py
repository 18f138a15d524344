"""`inspect PATH`: what a checkpoint holds, computed from configs and one mmap'd shard, or what a build folder is."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_checkpoint, load_shard
from .preprocess import native_size, visual_tokens

COMMON_RESOLUTIONS = (768, 1024, 1536)


def inspect_path(path: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> dict[str, Any]:
    """A build folder (it has a manifest.json) or a checkpoint folder, described."""
    if (Path(path) / "manifest.json").is_file():
        from .build import inspect_build

        return inspect_build(path)
    return inspect_checkpoint(path, vision_tower)


def inspect_checkpoint(path: str | os.PathLike, vision_tower: str | os.PathLike | None = None) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from .model.config import llama_config, tower_config
    from .model.vision import ConvNextFeatures, build_projector, config_stride

    info = read_checkpoint(path, vision_tower)
    with torch.device("meta"):
        tower = ConvNextFeatures(tower_config(info.tower_config))
        projector = build_projector(info.projector_type, info.config["mm_hidden_size"], info.config["hidden_size"])
        llm = LlamaForCausalLM(llama_config(info.config))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    dtypes: Counter[str] = Counter()
    for v in load_shard(info.weight_files[0], None).values():
        dtypes[str(v.dtype).replace("torch.", "")] += 1
    res = info.native_resolution
    stride = config_stride(tower.config)
    return {
        "checkpoint": str(info.path),
        "vision_tower": str(info.tower_path),
        "tower_weights_from": info.tower_weights_source,
        "tower": f"ConvNeXt, {tower.config.num_stages} stages, depths {tower.config.depths}, widths {tower.config.hidden_sizes}",
        "projector": f"{info.projector_type} {info.config['mm_hidden_size']}→{info.config['hidden_size']}→{info.config['hidden_size']}",
        "llm": f"LLaMA, {llm.config.num_hidden_layers} layers, hidden {llm.config.hidden_size}, "
        f"{llm.config.num_attention_heads} heads ({llm.config.num_key_value_heads} KV), vocab {llm.config.vocab_size}",
        "parameters": {"vision_tower": count(tower), "projector": count(projector), "llm": count(llm)},
        "config_dtype": info.config.get("torch_dtype", "unknown"),
        "stored_dtypes": dict(dtypes),
        "weight_files": [f.name for f in info.weight_files],
        "native_resolution": res,
        "total_stride": stride,
        "image_aspect_ratio": info.image_aspect_ratio,
        "visual_tokens": {f"{r}x{r}": visual_tokens(r, r, stride) for r in sorted({*COMMON_RESOLUTIONS, res})}
        | {"native 1536, 16:9": visual_tokens(*native_size(900, 1600, 1536), stride)},
    }
