"""ONNX Runtime sessions for both engines: CPU and CUDA execution providers.

TensorRT runs through its own engines (engines/tensorrt.py), not ORT's TensorRT execution
provider: one path to build, check and ship, with the engine's metadata and version gates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BuildError
from ..runtime.kv import DenseDecoder, RowDecoder, SeqKV
from .profiles import VisionProfile

TARGET_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def session_options(threads: int | None = None, optimized_path: Path | None = None, portable: bool = False):
    """Session options; `optimized_path` saves the optimized graph (offline optimization)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if portable else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        if Path(optimized_path).suffix == ".onnx":
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", Path(optimized_path).name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(1 << 20))
    return so


def providers_for(target: str) -> list[str]:
    """Execution providers for a device ('cpu' or 'cuda'), refused when this onnxruntime lacks them."""
    import onnxruntime as ort

    if target not in TARGET_PROVIDERS:
        raise BuildError(f"unknown ONNX Runtime device '{target}' (use {', '.join(TARGET_PROVIDERS)})")
    available = set(ort.get_available_providers())
    wanted = TARGET_PROVIDERS[target]
    if wanted[0] not in available:
        raise BuildError(
            f"device '{target}' needs {wanted[0]}, but this onnxruntime offers {', '.join(sorted(available))}; "
            "install the gpu extra (pip install 'convllava-export[gpu]') on a machine with an NVIDIA GPU"
        )
    return list(wanted)


def create_session(path: Path, target: str = "cpu", threads: int | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers_for(target))


def save_optimized(src: Path, dest: Path, threads: int | None = None) -> dict[str, int]:
    """Offline-optimize for CPU so loads are fast: our rewrites (ort_fusions.py: BiasGelu, 7-bit
    int8 weights), then ORT's own (constant folding, LayerNorm, QDQ → integer ops).
    Returns how many of each of our rewrites were applied."""
    import shutil
    import tempfile

    import onnx
    import onnxruntime as ort

    from .ort_fusions import fuse_gelu, narrow_int8_weights

    model = onnx.load(str(src))
    rewrites = {"bias_gelu_fused": fuse_gelu(model), "int8_weights_narrowed_to_7_bits": narrow_int8_weights(model)}
    if not any(rewrites.values()):
        del model
        ort.InferenceSession(str(src), sess_options=session_options(threads, optimized_path=dest), providers=["CPUExecutionProvider"])
        return rewrites
    tmp = Path(tempfile.mkdtemp(prefix=".fused-", dir=Path(dest).parent))
    try:
        # external data always: a protobuf cannot hold over 2 GB (the released tower is 2.8 GB)
        onnx.save(model, str(tmp / "fused.onnx"), save_as_external_data=True, location="fused.onnx.data")
        del model
        ort.InferenceSession(str(tmp / "fused.onnx"), sess_options=session_options(threads, optimized_path=dest), providers=["CPUExecutionProvider"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rewrites


class OrtVision:
    """Vision engine on ONNX Runtime: pixel_values [B,3,H,W] → image_embeds [B,N,hidden]."""

    def __init__(self, path: Path, target: str = "cpu", threads: int | None = None, profile: VisionProfile | None = None) -> None:
        self.path = Path(path)
        self.profile = profile
        self.session = create_session(self.path, target, threads)

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.profile is not None:
            self.profile.check(pixel_values.shape)
        return self.session.run(["image_embeds"], {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]


class OrtDecoder(DenseDecoder):
    """LLM engine on ONNX Runtime (our dynamo graph): pure functions over an explicit KV cache
    (runtime/kv.py), so one session serves any number of sequences and batches."""

    def __init__(self, folder: Path, target: str = "cpu", threads: int | None = None) -> None:
        from ..export.spec import PartSpec

        folder = Path(folder)
        self.spec = PartSpec.load(folder / "decoder.json")
        self.session = create_session(folder / self.spec.graph, target, threads)
        self.table = np.load(folder / "embed_tokens.npy", mmap_mode="r")
        attrs = self.spec.attributes
        self.vocab_size = int(attrs["vocab"])
        self.kv_heads, self.head_dim = int(attrs["kv_heads"]), int(attrs["head_dim"])
        self.past_names = [t.name for t in self.spec.inputs if t.name.startswith("past_key_values.")]
        self.output_names = [t.name for t in self.spec.outputs]  # logits, then present.*
        self.dtype = np.float16 if self.spec.inputs[0].dtype == "float16" else np.float32

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.table[np.asarray(ids)], dtype=np.float32)

    def _run(self, inputs: dict[str, np.ndarray], past: tuple[np.ndarray, ...] | None, batch: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        if past is None:
            empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
            past = (empty,) * len(self.past_names)
        feeds = {**inputs, **dict(zip(self.past_names, past))}
        logits, *present = self.session.run(self.output_names, feeds)
        return logits[:, -1].astype(np.float32), tuple(present)

    def step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        inputs = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=self.dtype),
            "attention_mask": np.ascontiguousarray(mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
        }
        return self._run(inputs, past, embeds.shape[0])


class OrtGqaDecoder(RowDecoder, OrtDecoder):
    """The fused GroupQueryAttention graph (export/llm_gqa.py) over the same explicit cache.

    GroupQueryAttention takes positions from the mask and expects each sequence's tokens to start
    at position 0, so it takes no left padding: a batch decodes row by row (RowDecoder), each row
    with its own cache.
    """

    def extend(self, embeds: np.ndarray, past: SeqKV | None = None) -> tuple[np.ndarray, SeqKV]:
        total = (past.length if past else 0) + len(embeds)
        inputs = {"inputs_embeds": np.ascontiguousarray(embeds[None], dtype=np.float32), "attention_mask": np.ones((1, total), dtype=np.int64)}
        logits, present = self._run(inputs, past.arrays if past else None, 1)
        return logits[0], SeqKV(present, total)


def open_decoder(folder: Path, target: str = "cpu", threads: int | None = None) -> OrtDecoder | OrtGqaDecoder:
    """The decoder class for the graph layout recorded in decoder.json."""
    from ..export.spec import PartSpec

    layout = PartSpec.load(Path(folder) / "decoder.json").attributes.get("layout", "dynamo")
    return (OrtGqaDecoder if layout == "gqa" else OrtDecoder)(Path(folder), target, threads)
