"""ConvNeXt† feature extractor and projector, as the official ConvLLaVA code computes them."""

from __future__ import annotations

import torch
from torch import nn
from transformers import ConvNextConfig
from transformers.models.convnext.modeling_convnext import ConvNextEmbeddings, ConvNextEncoder

TOTAL_STRIDE = 64


class ConvNextFeatures(nn.Module):
    """`ConvNextModel` without its pooled LayerNorm: returns the last stage's map.

    Parameter names equal ConvNextModel's (`embeddings.*`, `encoder.stages.*`), so released
    tower weights load unchanged. The stages are called directly (not through the encoder's
    output-capturing wrapper) to keep the graph plain for export.
    """

    def __init__(self, config: ConvNextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ConvNextEmbeddings(config)
        self.encoder = ConvNextEncoder(config)

    @property
    def stride(self) -> int:
        return config_stride(self.config)

    def forward(self, pixel_values: torch.Tensor, return_stages: bool = False):
        x = self.embeddings(pixel_values)
        states = [x]
        for stage in self.encoder.stages:
            x = stage(x)
            states.append(x)
        return states if return_stages else x


def config_stride(config: ConvNextConfig) -> int:
    """Total downsampling: the patchify stem times 2 per later stage (64 for ConvNeXt†)."""
    return config.patch_size * 2 ** (config.num_stages - 1)


def flatten_features(feature_map: torch.Tensor) -> torch.Tensor:
    """B×C×h×w → B×(h·w)×C, row-major, as LLaVA feeds the projector."""
    b, c = feature_map.shape[:2]
    return feature_map.permute(0, 2, 3, 1).reshape(b, -1, c)


def build_projector(kind: str, in_features: int, out_features: int) -> nn.Sequential:
    """`mlp2x_gelu`: Linear → GELU(erf) → Linear; indices 0 and 2 match the released keys."""
    if kind != "mlp2x_gelu":
        raise ValueError(f"unsupported projector {kind}")
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


class VisionEncoder(nn.Module):
    """pixel_values [B,3,H,W] → image_embeds [B,(H/64)(W/64),hidden]: the exported vision graph."""

    def __init__(self, tower: ConvNextFeatures, projector: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return flatten_features(self.tower(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(pixel_values))
