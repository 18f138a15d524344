"""The TensorRT Python library, imported only when an engine is built or loaded, and the one
logger every builder, runtime and engine of this process shares."""

from __future__ import annotations

from ...extras import require

_TRT_LOGGER = None


def import_tensorrt():
    """`tensorrt`, or an error naming the extra to install."""
    return require("tensorrt", "gpu", "TensorRT engines")


def shared_logger(trt):
    """One process-wide logger: it must outlive every builder, runtime and engine created with it."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER
