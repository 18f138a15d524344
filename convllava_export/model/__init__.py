"""The PyTorch reference model: ConvNeXt† tower, mlp2x_gelu projector, LLaMA decoder.

`config` (transformers configs of the parts), `vision` (tower + projector) and `reference`
(the whole model, as the official code loads it). Import the module you need: this package
file imports nothing, so reading a config does not load the reference.
"""
