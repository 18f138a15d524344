"""The engine's I/O tensors: their names, TensorRT data types as numpy / torch types, and the
device buffers `TrtVision` allocates for them (plain code, tested without TensorRT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import BuildError

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"

# TensorRT DataType member names -> numpy (None: numpy has no such type).
TRT_TO_NUMPY: dict[str, Any] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "BF16": None,
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "FP8": None,
    "INT4": None,
    "FP4": None,
}
# Float types a device buffer for `pixel_values` / `image_embeds` may have -> torch dtype name.
TRT_FLOAT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}


def trt_dtype_name(dtype: Any) -> str:
    """'HALF' from trt.DataType.HALF (pybind enum `.name`) or from the string 'DataType.HALF'."""
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = str(dtype)
    return name.rsplit(".", 1)[-1].upper()


def numpy_dtype(trt_name: str) -> np.dtype:
    """The numpy dtype of a TensorRT DataType name; refuses types numpy lacks."""
    name = trt_dtype_name(trt_name)
    if name not in TRT_TO_NUMPY:
        raise BuildError(f"unknown TensorRT data type {name}")
    dt = TRT_TO_NUMPY[name]
    if dt is None:
        raise BuildError(f"TensorRT data type {name} has no numpy equivalent")
    return dt


@dataclass(frozen=True)
class IoPlan:
    """Device buffer dtypes for the engine's tensors; the host side is always fp32."""

    input_torch: str
    output_torch: str
    cast_input: bool  # host fp32 is uploaded, then cast on the device to the engine's input type
    cast_output: bool  # the engine's output is cast to fp32 on the device before the copy back


def plan_io(input_dtype: str, output_dtype: str) -> IoPlan:
    """Buffers for `pixel_values` / `image_embeds` of the given TensorRT dtypes (names or enums)."""
    i, o = trt_dtype_name(input_dtype), trt_dtype_name(output_dtype)
    for what, name in ((INPUT_NAME, i), (OUTPUT_NAME, o)):
        if name not in TRT_FLOAT_TO_TORCH:
            raise BuildError(
                f"engine tensor '{what}' is {name}; only FLOAT, HALF or BF16 are supported (keep the graph's I/O in "
                "floating point). Rebuild it from this tool's ONNX export."
            )
    return IoPlan(TRT_FLOAT_TO_TORCH[i], TRT_FLOAT_TO_TORCH[o], i != "FLOAT", o != "FLOAT")


def check_io_tensors(inputs: list[str], outputs: list[str]) -> None:
    """The engine must take exactly `pixel_values` and produce `image_embeds`."""
    if list(inputs) != [INPUT_NAME] or OUTPUT_NAME not in outputs:
        raise BuildError(
            f"engine has inputs {list(inputs)} and outputs {list(outputs)}; expected input '{INPUT_NAME}' and output "
            f"'{OUTPUT_NAME}'. Rebuild it from this tool's ONNX export."
        )


def resolved_shape(dims: Any, name: str) -> tuple[int, ...]:
    """A tensor shape with every dimension known (TensorRT reports -1 for unresolved ones)."""
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise BuildError(f"TensorRT could not resolve the shape of '{name}' ({shape}); the input shape was not accepted")
    return shape
