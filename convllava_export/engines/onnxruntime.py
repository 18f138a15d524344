"""ONNX Runtime sessions for both engines: CPU and CUDA execution providers.

TensorRT runs through its own engines (engines/tensorrt/), not ORT's TensorRT execution
provider: one path to build, check and ship, with the engine's metadata and version gates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import BuildError, ConvLlavaError
from ..precisions import PREFILL_KERNELS
from ..runtime.kv import CacheShape, DenseDecoder, SeqKV, SlotCache
from .profiles import VisionProfile

log = logging.getLogger("convllava_export.engines")

# Below this many positions a chunk is cheaper on MatMulNBits than unpacking every weight once (7B,
# AMX Xeon: the unpacking costs ~1.3 s a pass, MatMulNBits ~33 ms a position; BENCHMARKS.md).
GEMM_MIN_TOKENS = 96

TARGET_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def session_options(threads: int | None = None, optimized_path: Path | None = None, portable: bool = False, arena: bool = True):
    """Session options; `optimized_path` saves the optimized graph (offline optimization);
    `arena=False` gives activations back after each run instead of keeping the peak."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
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


def create_session(path: Path, target: str = "cpu", threads: int | None = None, arena: bool = True):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(threads, arena=arena), providers=providers_for(target))


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
        # no arena: a 1536² image's activations (GBs at 7B's tower) go back once it is encoded,
        # instead of staying reserved beside the LLM for the server's lifetime
        self.session = create_session(self.path, target, threads, arena=False)

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.profile is not None:
            self.profile.check(pixel_values.shape)
        return self.session.run(["image_embeds"], {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]


class OrtDecoder(DenseDecoder):
    """LLM engine on ONNX Runtime (our dynamo graph): pure functions over an explicit KV cache
    (runtime/kv.py), so one session serves any number of sequences and batches."""

    prefill_kernel = "onnxruntime"

    def __init__(self, folder: Path, target: str = "cpu", threads: int | None = None, session: bool = True) -> None:
        from ..export.spec import PartSpec

        folder = self.folder = Path(folder)
        self.spec = PartSpec.load(folder / "decoder.json")
        self.session = create_session(folder / self.spec.graph, target, threads) if session else None
        self.table = np.load(folder / "embed_tokens.npy", mmap_mode="r")
        attrs = self.spec.attributes
        self.vocab_size = int(attrs["vocab"])
        self.kv_heads, self.head_dim = int(attrs["kv_heads"]), int(attrs["head_dim"])
        pasts = [t for t in self.spec.inputs if t.name.startswith("past_key_values.")]
        self.past_names = [t.name for t in pasts]
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]
        self.output_names = [t.name for t in self.spec.outputs]  # logits, then present.*
        self.embeds_dtype = np.float16 if self.spec.inputs[0].dtype == "float16" else np.float32
        self.dtype = np.dtype(pasts[0].dtype if pasts else "float32").type  # the cache's: float32, float16 or int8 (export/llm_gqa.py)
        self.cache_shape = CacheShape(len(self.past_names), self.kv_heads, self.head_dim, np.dtype(self.dtype))

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
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=self.embeds_dtype),
            "attention_mask": np.ascontiguousarray(mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
        }
        return self._run(inputs, past, embeds.shape[0])


class OrtGqaDecoder(OrtDecoder):
    """The fused GroupQueryAttention graph (export/llm_gqa.py) over a SlotCache.

    GroupQueryAttention reads each row's length from its mask's count of ones (right padding),
    places the new positions there, and writes them into `present` in place when `present` is
    the same memory as `past`. So past and present are bound to one buffer with IOBinding: a
    prefill chunk runs on its row's slice, a decode step on rows 0..n-1 in one run, and no cache
    is copied. Logits come back for the last position of each row.
    """

    def __init__(self, folder: Path, target: str = "cpu", threads: int | None = None, prefill: str = "auto") -> None:
        super().__init__(folder, target, threads)
        self.gemm = self._native_llm(prefill, target, threads)
        self.prefill_tokens = 512 if self.gemm is not None else 256  # a GEMM pass unpacks every weight: fewer, longer chunks
        self.prefill_kernel = self.gemm.kernel if self.gemm is not None else "onnxruntime"
        self.gemm_min_tokens = GEMM_MIN_TOKENS

    def _native_llm(self, prefill: str, target: str, threads: int | None):
        from .native_llm import NativeLlm, cpu_prefill_kernel

        if prefill not in PREFILL_KERNELS:
            raise BuildError(f"unknown prefill kernel '{prefill}' (use {', '.join(PREFILL_KERNELS)})")
        eligible = target == "cpu" and self.spec.precision != "fp32"
        kernel = (cpu_prefill_kernel() if eligible else None) if prefill == "auto" else prefill
        if prefill == "auto" and kernel == "q4":  # auto's q4 is the whole decoder (open_decoder), never a prompt kernel beside ORT
            kernel = None
        if kernel in (None, "onnxruntime"):
            return None
        if not eligible:
            raise BuildError(f"--llm-kernel {kernel} runs int4/int8 gqa graphs on the CPU; this one is {self.spec.precision} on {target}: use --llm-kernel onnxruntime")
        try:
            return NativeLlm(self.folder, threads, compute=kernel)
        except ConvLlavaError:
            if prefill == "auto":  # a graph this kernel cannot read still serves, on ORT's kernel
                return None
            raise

    def new_cache(self, budget_bytes: float, max_rows: int, max_width: int) -> SlotCache:  # type: ignore[override]
        return SlotCache(self.cache_shape, budget_bytes, max_rows, max_width)

    def _run_slots(self, cache: SlotCache, rows: slice, embeds: np.ndarray) -> np.ndarray:
        io = self.session.io_binding()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=self.embeds_dtype))
        io.bind_cpu_input("attention_mask", cache.mask(rows, embeds.shape[1]))
        io.bind_output("logits")
        for past, present, buf in zip(self.past_names, self.present_names, cache.arrays):
            view = buf[rows]  # rows are the outermost axis: a contiguous block of the buffer
            io.bind_input(past, "cpu", 0, self.dtype, list(view.shape), view.ctypes.data)
            io.bind_output(present, "cpu", 0, self.dtype, list(view.shape), view.ctypes.data)
        self.session.run_with_iobinding(io)
        cache.advance(rows, embeds.shape[1])
        # the logits only: copy_outputs_to_cpu() would copy every bound present buffer too
        return io.get_outputs()[0].numpy()[:, -1].astype(np.float32)

    def prefill_rows(self, cache: SlotCache, chunks: Sequence[np.ndarray]) -> list[np.ndarray]:  # type: ignore[override]
        """The next chunk of pending rows 0..len(chunks)-1. Chunks of at least `gemm_min_tokens`
        go through the GEMM kernel in one pass (each weight unpacked once for all of them); the
        others run on ORT one row at a time. Which kernel a chunk takes depends on its own length
        only, so a row's numbers do not depend on the rows beside it."""
        rows = [cache.rows + k for k in range(len(chunks))]
        for row, embeds in zip(rows, chunks):
            if cache.lengths[row] + len(embeds) > cache.capacity[1]:
                raise RuntimeError("prefill beyond the row's reserved positions")
        out: list[np.ndarray | None] = [None] * len(chunks)
        big = [k for k, e in enumerate(chunks) if self.gemm is not None and len(e) >= max(1, self.gemm_min_tokens)]
        if big:
            logits = self.gemm.prefill_rows(cache.arrays, [(rows[k], cache.lengths[rows[k]], chunks[k]) for k in big])
            for k, lg in zip(big, logits):
                cache.advance(slice(rows[k], rows[k] + 1), len(chunks[k]))
                out[k] = lg
        for k, embeds in enumerate(chunks):
            if out[k] is None and len(embeds):  # an empty chunk: a row whose prompt is in, waiting to join
                out[k] = self._run_slots(cache, slice(rows[k], rows[k] + 1), embeds[None])[0]
        return out  # type: ignore[return-value]

    def prefill(self, cache: SlotCache, embeds: np.ndarray) -> np.ndarray:  # type: ignore[override]
        """S more positions [S, H] of the first pending row; its last position's logits [V]."""
        return self.prefill_rows(cache, [embeds])[0]

    def decode(self, cache: SlotCache, embeds: np.ndarray) -> np.ndarray:  # type: ignore[override]
        n = cache.rows
        if max(cache.lengths[:n]) + 1 > cache.capacity[1]:
            raise RuntimeError("decode beyond the rows' reserved positions")
        return self._run_slots(cache, slice(0, n), embeds[:, None])

    def extend(self, embeds: np.ndarray, past: SeqKV | None = None) -> tuple[np.ndarray, SeqKV]:
        """One sequence outside any batch (teacher forcing in validate): past and present apart.
        A long chunk takes the same prompt kernel as `prefill`, so validate measures what serves."""
        total = (past.length if past else 0) + len(embeds)
        if self.gemm is not None and len(embeds) >= self.gemm_min_tokens:
            n = past.length if past else 0
            arrays = [np.zeros((1, self.kv_heads, total, self.head_dim), dtype=self.dtype) for _ in self.past_names]
            for a, p in zip(arrays, past.arrays if past else ()):
                a[:, :, :n] = p[:, :, :n]
            return self.gemm.prefill_rows(arrays, [(0, n, embeds)])[0], SeqKV(tuple(arrays), total)
        inputs = {"inputs_embeds": np.ascontiguousarray(embeds[None], dtype=self.embeds_dtype), "attention_mask": np.ones((1, total), dtype=np.int64)}
        logits, present = self._run(inputs, past.arrays if past else None, 1)
        return logits[0], SeqKV(present, total)


class Q4GqaDecoder(OrtGqaDecoder):
    """Every step of a gqa int4 graph on the q4 kernel (engines/native_llm.py, weights packed
    once and resident): prompt chunks, and decode steps with one GEMM for all running rows, so a
    step of 16 rows reads each weight once. ONNX Runtime's session is never opened, so its
    prepacked copy of the weights (3.8 GB at 7B) is never made; this keeps one of the same size.
    The graph still defines the model: its weights, norms, rotary tables and cache layout."""

    prefill_kernel = "q4"

    def __init__(self, folder: Path, target: str = "cpu", threads: int | None = None) -> None:
        from .native_llm import NativeLlm

        OrtDecoder.__init__(self, folder, target, threads, session=False)
        if target != "cpu" or self.spec.precision != "int4":
            raise BuildError(f"--llm-kernel q4 runs int4 gqa graphs on the CPU; this one is {self.spec.precision} on {target}: use --llm-kernel onnxruntime")
        self.gemm = NativeLlm(self.folder, threads, compute="q4", resident=True)
        if not self.gemm.lib.q4_vnni():
            log.warning("--llm-kernel q4 on a CPU without AVX-512 VNNI runs the kernel's plain-C reference: correct, but far slower than onnxruntime")
        self.prefill_tokens = 512
        self.gemm_min_tokens = 1  # every chunk: there is no other kernel

    def _run(self, inputs, past, batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("the q4 decoder has no ONNX Runtime session; extend() needs at least one position")

    def decode(self, cache: SlotCache, embeds: np.ndarray) -> np.ndarray:  # type: ignore[override]
        n = cache.rows
        if max(cache.lengths[:n]) + 1 > cache.capacity[1]:
            raise RuntimeError("decode beyond the rows' reserved positions")
        logits = self.gemm.decode_rows(cache.arrays, cache.lengths[:n], embeds)
        cache.advance(slice(0, n), 1)
        return logits


def open_decoder(folder: Path, target: str = "cpu", threads: int | None = None, prefill: str = "auto") -> OrtDecoder | OrtGqaDecoder:
    """The decoder class for the graph layout recorded in decoder.json (and, for a gqa graph, the
    LLM kernel: q4 runs every step itself, the others decode on ONNX Runtime)."""
    from ..export.spec import PartSpec

    spec = PartSpec.load(Path(folder) / "decoder.json")
    layout = spec.attributes.get("layout", "dynamo")
    if layout == "gqa":
        from .native_llm import cpu_prefill_kernel

        # q4 attends over fp16 caches as they lie and over int8 ones with its own kernel (attend_i8)
        auto_q4 = prefill == "auto" and target == "cpu" and spec.precision == "int4" and cpu_prefill_kernel() == "q4"
        if prefill == "q4" or auto_q4:
            try:
                return Q4GqaDecoder(Path(folder), target, threads)
            except ConvLlavaError:
                if not auto_q4:
                    raise
            prefill = "onnxruntime"  # auto, and a graph q4 cannot run: ORT's kernels
        return OrtGqaDecoder(Path(folder), target, threads, prefill)
    if prefill not in ("auto", "onnxruntime"):
        raise BuildError(f"--llm-kernel {prefill} runs the gqa graph; {folder} holds the {layout} graph: build with --llm-graph gqa or use --llm-kernel onnxruntime")
    return OrtDecoder(Path(folder), target, threads)
