"""The PyTorch reference model: ConvNeXt† tower, mlp2x_gelu projector, LLaMA decoder."""

from .reference import ReferenceModel
from .vision import ConvNextFeatures, VisionEncoder, build_projector

__all__ = ["ConvNextFeatures", "ReferenceModel", "VisionEncoder", "build_projector"]
