"""Loading and running a built vision engine: the metadata checked against this machine before
deserializing, then `TrtVision` runs it on torch CUDA buffers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from ...errors import BuildError
from ..profiles import VisionProfile
from . import device
from .library import import_tensorrt, shared_logger
from .metadata import ENGINE, ENGINE_META, check_engine_compat, runtime_settings
from .tensors import INPUT_NAME, OUTPUT_NAME, check_io_tensors, plan_io, resolved_shape


def load_engine(folder: Path):
    """Deserialize after checking metadata against this GPU and TensorRT version.

    Returns (engine, meta, runtime): keep the runtime alive as long as the engine (TensorRT:
    destroying the runtime before its engines is undefined behaviour).
    """
    trt = import_tensorrt()
    meta_path = folder / ENGINE_META
    if not meta_path.is_file():
        raise BuildError(f"{meta_path} is missing: cannot tell which GPU and TensorRT version built the engine")
    meta = json.loads(meta_path.read_text())
    check_engine_compat(meta, trt.__version__, device.gpu_identity(), device.jetson_identity())
    runtime = trt.Runtime(shared_logger(trt))
    for attr, value in runtime_settings(meta).items():
        setattr(runtime, attr, value)
    engine = runtime.deserialize_cuda_engine((folder / ENGINE).read_bytes())
    if engine is None:
        raise BuildError(f"TensorRT could not deserialize {folder / ENGINE} (see the TensorRT log above); rebuild it here")
    return engine, meta, runtime


class TrtVision:
    """Vision engine on TensorRT: host numpy in, host fp32 numpy out, torch CUDA buffers between.

    Copy in, inference and copy out are all enqueued on one torch stream whose handle is given to
    `execute_async_v3`, and that stream is synchronized before the output is read, so the three
    are ordered; the device buffers are allocated while that stream is current, so torch's
    caching allocator does not hand their memory to other work on another stream too early. One
    execution context runs one inference at a time: `encode` is serialized by a lock.
    """

    def __init__(self, folder: Path) -> None:
        import torch

        self.torch = torch
        trt = import_tensorrt()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.logger = shared_logger(trt)
        self.engine, self.meta, self.runtime = load_engine(Path(folder))
        self.profile = VisionProfile.from_dict(self.meta["profile"])
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        check_io_tensors(inputs, [n for n in names if n not in inputs])
        self.io = plan_io(self.engine.get_tensor_dtype(INPUT_NAME), self.engine.get_tensor_dtype(OUTPUT_NAME))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BuildError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = torch.cuda.Stream(device=self.device)
        self._lock = threading.Lock()

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        torch = self.torch
        self.profile.check(pixel_values.shape)
        host_in = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
        with self._lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            x = host_in.to(self.device, non_blocking=True)
            if self.io.cast_input:
                x = x.to(getattr(torch, self.io.input_torch))
            if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
                raise BuildError(f"TensorRT refused input shape {tuple(x.shape)} (outside the engine's profile?)")
            out_shape = resolved_shape(self.context.get_tensor_shape(OUTPUT_NAME), OUTPUT_NAME)
            y = torch.empty(out_shape, dtype=getattr(torch, self.io.output_torch), device=self.device)
            if not (self.context.set_tensor_address(INPUT_NAME, x.data_ptr()) and self.context.set_tensor_address(OUTPUT_NAME, y.data_ptr())):
                raise BuildError("TensorRT refused the I/O buffer addresses")
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BuildError("TensorRT execution failed (see the TensorRT log above)")
            y32 = y.float() if self.io.cast_output else y
            host_out = torch.empty(out_shape, dtype=torch.float32, pin_memory=True)
            host_out.copy_(y32, non_blocking=True)
            self.stream.synchronize()
        return host_out.numpy()
