"""The LLM forward of a block-quantized GroupQueryAttention graph in torch, on our kernels: the prompt
path beside ONNX Runtime's decode (bf16, int8), or every step (q4).

Why: ONNX Runtime's int4/int8 MatMulNBits runs the prompt at ~410 GFLOP/s on an AMX Xeon, while
oneDNN's bf16 GEMM through torch runs ~1.9 TFLOP/s there (BENCHMARKS.md, "Prompt-path kernels").
So a prefill chunk runs here: each projection's int4 blocks are unpacked into a scratch tile of
rows (a few MB, reused) right before its GEMM, read from the graph's own data file with pread
(page cache, nothing kept mapped), so no second copy of the weights is held. Decode steps (M =
running rows) stay on ONNX Runtime, where int4 reads half the bytes of int8 and a fifth of bf16's.

- bf16 (`--prefill bf16`, auto with AMX-BF16): the tile is (q - 2^(bits-1)) · scale rounded once
  to bf16; activations bf16.
- int8 (`--prefill int8`, opt-in): the tile is requantized to int8 with one scale per output row
  (a C kernel); each activation row becomes two int8 rows (value and rounding residual, ~15
  bits), outlier columns (LLM.int8()) go through fp32 beside the int32 GEMM. Its accuracy
  matches MatMulNBits' int8 path (logits' cosine to the exact int4 math 0.987 vs 0.989 at 7B),
  its GEMM runs ~1 TOP/s on VNNI, but the two rows make it 0.91-1.17x MatMulNBits end to end on
  a VNNI Xeon without AMX (BENCHMARKS.md, "int8 prompt kernel"); it is there to measure that,
  and for AMX-INT8 CPUs, where it has not run.

- q4 (`--llm-kernel q4`, auto with AVX-512 VNNI and no AMX): no unpacking at all. Each tile's
  int4 bytes are moved into groups of 16 output columns and multiplied against int8 activations
  (one scale per row and block of K, as MatMulNBits' accuracy level 4) with vpdpbusd
  (kernels/dequant.c gemm_q4, ~700-900 GOP/s on a 2-core VNNI Xeon where MatMulNBits runs ~300).
  With `resident=True` (engines/onnxruntime.Q4GqaDecoder) every weight is packed once at load and
  decode steps run here too (`decode_rows`: one GEMM per weight for all running rows; attention
  by torch's SDPA over an fp16 cache as it lies, or by kernels/dequant.c attend_i8 straight from
  an int8 cache, each position read once).

The math is the graph's (export/llm_gqa.py): RMSNorm → fused qkv → rotary (half-split) → causal
attention over the row's cache → o_proj → residual → RMSNorm → SiLU-gated MLP → residual, final
norm, lm_head on the last position (in fp32; on q4 in the resident decoder, as ORT's int4 graph does). Keys (after rotary) and values are written into the
row's slot of the SlotCache in its dtype, exactly where GroupQueryAttention would put them, so
decode steps continue on ORT as if ORT had prefilled. The dequantization is MatMulNBits'
symmetric one: w = (q - 2^(bits-1)) · scale per block of K.

Several pending rows prefill in one pass (`prefill_rows`): each tile of unpacked weights serves
every row's chunk, so the unpacking (~1.3 s a pass at 7B) is paid once for all of them. With
bf16/int8 each chunk is still its own GEMM, the call it would get alone, so a request's greedy
tokens do not depend on the rows beside it; q4's numbers are per row by construction, so its
chunks share one GEMM.
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ..errors import ConvLlavaError
from .kernels import dequant_library

M_BUCKET = 64  # GEMM rows are padded to a multiple of this (see NativeLlm._bucket)
# --prefill kernels this class runs: what their GEMMs multiply (q4: the packed int4 blocks as they are)
COMPUTE = {"bf16": torch.bfloat16, "int8": torch.int8, "q4": torch.quint4x2}
Q4_ROW_CHUNK = 64  # q4: rows whose int8 activations stay in L2 while a tile's weights pass (kernels/dequant.c gemm_q4)
OUTLIER_RATIO = 6.0  # int8 path: activation columns this far above the median column max run in fp32
SCRATCH_ELEMENTS = 1 << 24  # weights dequantized at a time: 16 M (32 MB of bf16); smaller tiles made slower GEMMs (BENCHMARKS.md)


def _release(fd: int, pool: ThreadPoolExecutor | None) -> None:
    if fd >= 0:
        os.close(fd)
    if pool is not None:
        pool.shutdown(wait=False)


def _cpu_flags() -> set[str]:
    try:
        line = next((x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def _q4_native() -> bool:
    """The q4 kernel compiled here with its VNNI path (not the plain reference)."""
    lib = dequant_library()
    return lib is not None and bool(lib.q4_vnni())


def cpu_prefill_kernel() -> str | None:
    """What `--llm-kernel auto` runs here: bf16 prompts where the CPU has AMX-BF16 (oneDNN's bf16
    GEMM on the tiles, 1.6-2.9x MatMulNBits at 7B); q4 for every step where it has AVX-512 VNNI
    and no AMX (7B prompt 1.6-1.7x MatMulNBits, BENCHMARKS.md "q4"); else None (ONNX Runtime's
    own kernels). Never int8: 0.91-1.17x MatMulNBits (two GEMMs to match its accuracy)."""
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "bf16"
    if {"avx512_vnni", "avx512bw"} <= flags and _q4_native():
        return "q4"
    return None


@dataclass(frozen=True)
class _Span:
    """Where a tensor's bytes are: at `offset` in the data file, or `inline` (small tensors the
    export keeps inside the .onnx)."""

    offset: int
    inline: np.ndarray | None = None


@dataclass(frozen=True)
class QuantWeight:
    """One MatMulNBits weight: where its packed bits [N, blocks, blob] and fp32 scales [N, blocks]
    lie in the data file (read a tile of rows at a time, never held)."""

    n: int
    k: int
    bits: int
    block: int
    packed: _Span
    scales: _Span

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block)


@dataclass(frozen=True)
class _Layer:
    norm_in: torch.Tensor
    qkv: tuple[QuantWeight, ...]  # one fused qkv, or q, k, v
    o: QuantWeight
    norm_post: torch.Tensor
    gate: QuantWeight
    up: QuantWeight
    down: QuantWeight
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None  # int8 cache: per-channel key, value scales [kv_heads, 1, head_dim]


class NativeLlm:
    """The transformer of a gqa int4/int8 decoder folder on our GEMMs: prefill chunks (bf16, int8,
    q4) and, with resident q4 weights, batched decode steps (see module docstring)."""

    def __init__(self, folder: Path, threads: int | None = None, compute: str = "bf16", resident: bool = False) -> None:
        self.folder = Path(folder)
        graph = self.folder / "decoder.onnx"
        model = onnx.load(str(graph), load_external_data=False)
        self.inits = {t.name: t for t in model.graph.initializer}
        data = {self._location(t) for t in self.inits.values() if self._location(t)}
        if len(data) > 1:
            raise ConvLlavaError(f"{graph}: the GEMM prompt kernel reads one external data file, found {sorted(data)}")
        self._fd = os.open(self.folder / data.pop(), os.O_RDONLY) if data else -1
        self.threads = threads or torch.get_num_threads()
        self.lib = dequant_library()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dequant") if self.lib is not None and self.threads > 1 else None
        self._buffers: dict[str, torch.Tensor] = {}
        weakref.finalize(self, _release, self._fd, self._pool)  # the file and threads go with the decoder
        # bf16 or int8 GEMMs; float32 computes the int4 model's exact math (a reference for
        # accuracy figures: BENCHMARKS.md, tests)
        if compute not in COMPUTE:
            raise ConvLlavaError(f"unknown GEMM prefill kernel {compute!r} (use {', '.join(COMPUTE)})")
        self.kernel, self.compute = compute, COMPUTE[compute]
        by_name = {n.name: n for n in model.graph.node}

        def node(name: str) -> onnx.NodeProto:
            if name not in by_name:
                raise ConvLlavaError(f"{graph}: no node {name}, where the builder puts it; the GEMM prompt kernel cannot read this graph (use --prefill onnxruntime)")
            return by_name[name]

        gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        if not gqa:
            raise ConvLlavaError(f"{graph} has no GroupQueryAttention: the GEMM prompt kernel runs only the gqa layout")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
        if attrs.get("rotary_interleaved", 0) or not attrs.get("do_rotary", 0) or attrs.get("local_window_size", -1) != -1 or attrs.get("softcap", 0.0):
            raise ConvLlavaError(f"{graph}: GroupQueryAttention options {attrs} are not the ones the GEMM prompt kernel implements")
        if attrs.get("kv_cache_bit_width") not in (None, 8) or {attrs.get("k_quant_type", b"PER_CHANNEL"), attrs.get("v_quant_type", b"PER_CHANNEL")} != {b"PER_CHANNEL"}:
            raise ConvLlavaError(f"{graph}: a quantized KV cache other than int8 per channel ({attrs}); the GEMM prompt kernel writes only that one")
        self.heads, self.kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
        self.scale = float(attrs.get("scale", 0.0)) or None
        self.cos = torch.from_numpy(self._array(gqa[0].input[7].removesuffix("_fp16"))).float()
        self.sin = torch.from_numpy(self._array(gqa[0].input[8].removesuffix("_fp16"))).float()
        self.head_dim = 2 * self.cos.shape[1]
        self.layers: list[_Layer] = []
        eps = None
        for i in range(len(gqa)):
            pre = f"/model/layers.{i}"
            norm = by_name.get(f"{pre}/input_layernorm/LayerNorm") or node(f"{pre}/input_layernorm/SkipLayerNorm")
            post = node(f"{pre}/post_attention_layernorm/SkipLayerNorm")
            eps = eps or float(next(onnx.helper.get_attribute_value(a) for a in norm.attribute if a.name == "epsilon"))
            qkv = [by_name[f"{pre}/attn/qkv_proj/MatMul"]] if f"{pre}/attn/qkv_proj/MatMul" in by_name else [node(f"{pre}/attn/{p}_proj/MatMul") for p in "qkv"]
            self.layers.append(
                _Layer(
                    norm_in=self._norm_weight(norm),
                    qkv=tuple(self._quant(n) for n in qkv),
                    o=self._quant(node(f"{pre}/attn/o_proj/MatMul")),
                    norm_post=self._norm_weight(post),
                    gate=self._quant(node(f"{pre}/mlp/gate_proj/MatMul")),
                    up=self._quant(node(f"{pre}/mlp/up_proj/MatMul")),
                    down=self._quant(node(f"{pre}/mlp/down_proj/MatMul")),
                    kv_scales=self._kv_scales(gqa[i]),
                )
            )
        final = next((n for n in model.graph.node if "final_norm_layernorm" in n.name), None)
        head = next((n for n in model.graph.node if n.name.startswith("/lm_head/MatMul")), None)
        if final is None or head is None:
            raise ConvLlavaError(f"{graph}: no final norm or lm_head where the builder puts them; the GEMM prompt kernel cannot read this graph")
        self.norm_final = self._norm_weight(final)
        self.lm_head = self._quant(head)
        self.eps = float(eps)
        if compute == "q4":
            self._check_q4()
        # resident (q4 only): every weight packed once, here, and kept (the size of the int4
        # weights), so decode steps read each weight once and nothing else: the whole-decoder mode
        self.resident: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        # weights that read the same input (q, k, v; gate, up) packed side by side: one GEMM call
        # (and one activation quantization) for the group, the same numbers column by column
        self.fused: dict[tuple[int, ...], QuantWeight] = {}
        if resident:
            if compute != "q4":
                raise ConvLlavaError(f"resident weights are the q4 kernel's; {compute} unpacks tiles per pass")
            self.resident = {}
            groups = [g for layer in self.layers for g in (layer.qkv, (layer.gate, layer.up)) if self._fusable(g)]
            grouped = {id(w) for g in groups for w in g}
            for g in [*groups, *[(w,) for w in self._weights() if id(w) not in grouped]]:
                whole = g[0] if len(g) == 1 else QuantWeight(sum(w.n for w in g), g[0].k, g[0].bits, g[0].block, g[0].packed, g[0].scales)
                dw, gs = whole.blocks * whole.block // 8, [-(-w.n // 16) for w in g]
                wq, ws = torch.empty(-(-whole.n // 16) * dw * 16, dtype=torch.int32), torch.empty(-(-whole.n // 16) * whole.blocks * 16)
                at = 0
                for w, n16 in zip(g, gs):
                    pq, ps = self._pack_q4(w, 0, w.n)
                    wq[at * dw * 16 : (at + n16) * dw * 16], ws[at * w.blocks * 16 : (at + n16) * w.blocks * 16] = pq, ps
                    at += n16
                self.resident[id(whole)] = (wq, ws)
                if len(g) > 1:
                    self.fused[tuple(id(w) for w in g)] = whole
            self._buffers.clear()
        self.tokens = 0  # prompt positions this kernel has prefilled (what tests and stats read)

    # -- reading the graph ------------------------------------------------------------------
    @staticmethod
    def _location(t: onnx.TensorProto) -> str | None:
        return next((e.value for e in t.external_data if e.key == "location"), None) if t.data_location == onnx.TensorProto.EXTERNAL else None

    def _span(self, name: str) -> _Span:
        t = self.inits[name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return _Span(0, np.array(numpy_helper.to_array(t)).reshape(-1).view(np.uint8))
        return _Span(int(next((e.value for e in t.external_data if e.key == "offset"), 0)))

    def _read_span(self, span: _Span, start: int, out: np.ndarray) -> None:
        if span.inline is None:
            self._read(span.offset + start, out)
        else:
            out.reshape(-1).view(np.uint8)[:] = span.inline[start : start + out.nbytes]

    def _read(self, offset: int, out: np.ndarray) -> None:
        """File bytes at `offset` into `out` (pread: the page cache is read, nothing stays mapped)."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise ConvLlavaError(f"{self.folder}: the decoder's data file ends early (truncated?); rebuild the LLM")
            done += n

    def _array(self, name: str) -> np.ndarray:
        t = self.inits[name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return np.array(numpy_helper.to_array(t))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        out = np.empty(tuple(t.dims), dtype=dtype)
        self._read(self._span(name).offset, out)
        return out

    def _kv_scales(self, node: onnx.NodeProto) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The int8 cache's key and value scales (export/llm_gqa.int8_kv_cache), or None for a float cache."""
        if len(node.input) < 14 or not node.input[12]:
            return None
        return tuple(torch.from_numpy(self._array(node.input[k])).float().view(self.kv_heads, 1, -1) for k in (12, 13))  # type: ignore[return-value]

    def _norm_weight(self, node: onnx.NodeProto) -> torch.Tensor:
        name = next(i for i in node.input[1:] if i in self.inits)
        return torch.from_numpy(self._array(name)).float()

    def _quant(self, node: onnx.NodeProto) -> QuantWeight:
        if node.op_type != "MatMulNBits":
            raise ConvLlavaError(f"{node.name} is {node.op_type}: the GEMM prompt kernel runs block-quantized (int4/int8) graphs only")
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        if len(node.input) > 3 and node.input[3]:
            raise ConvLlavaError(f"{node.name} has zero points: the GEMM prompt kernel takes the symmetric blocks our export writes")
        bits, block = int(a["bits"]), int(a["block_size"])
        if bits not in (4, 8) or block % 2:
            raise ConvLlavaError(f"{node.name}: {bits}-bit blocks of {block} are not ones the GEMM prompt kernel unpacks")
        if self.inits[node.input[2]].data_type != onnx.TensorProto.FLOAT:
            raise ConvLlavaError(f"{node.name}: scales are not fp32; the GEMM prompt kernel reads the fp32 scales our export writes")
        return QuantWeight(int(a["N"]), int(a["K"]), bits, block, self._span(node.input[1]), self._span(node.input[2]))

    def _weights(self) -> list[QuantWeight]:
        return [w for layer in self.layers for w in (*layer.qkv, layer.o, layer.gate, layer.up, layer.down)] + [self.lm_head]

    @staticmethod
    def _fusable(group: tuple[QuantWeight, ...]) -> bool:
        """Several weights of one input whose packed groups of 16 columns can lie side by side."""
        return len(group) > 1 and all(w.n % 16 == 0 and (w.k, w.bits, w.block) == (group[0].k, group[0].bits, group[0].block) for w in group)

    def _fused(self, group: tuple[QuantWeight, ...]) -> QuantWeight | None:
        """The packed side-by-side weight of `group`, when q4 computes (it exists only packed:
        other computes read each weight's own bytes)."""
        return self.fused.get(tuple(id(w) for w in group)) if self.compute == torch.quint4x2 else None

    def linear_group(self, hs: list[torch.Tensor], group: tuple[QuantWeight, ...]) -> list[list[torch.Tensor]]:
        """`linear` of each weight of `group` (one input), per weight a list per h: one GEMM for the
        group where it was packed side by side, else one per weight."""
        whole = self._fused(group)
        if whole is None:
            return [self.linear(hs, w) for w in group]
        outs = [o.split([w.n for w in group], dim=-1) for o in self.linear(hs, whole)]
        return [[o[j] for o in outs] for j in range(len(group))]

    def _check_q4(self) -> None:
        if self.lib is None:
            raise ConvLlavaError("the q4 kernel is native code and no C compiler built it here (install gcc, or unset CONVLLAVA_NATIVE_KERNELS=0); use --llm-kernel onnxruntime")
        for w in self._weights():
            if w.bits != 4 or w.block % 8:
                raise ConvLlavaError(f"{self.folder}: {w.bits}-bit blocks of {w.block}; the q4 kernel takes 4-bit blocks of a multiple of 8 (use --llm-kernel int8 or onnxruntime)")

    # -- kernels ----------------------------------------------------------------------------
    def _scratch(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reused buffer of at least n elements (allocated once per kind, the largest tile)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype)
        return buf[:n]

    def _read_rows(self, w: QuantWeight, r0: int, packed: np.ndarray, scales: np.ndarray) -> None:
        """The packed bits and scales of W's rows from r0 (as many as `packed` holds) into the buffers."""
        self._read_span(w.packed, r0 * w.blocks * (w.block * w.bits // 8), packed)
        self._read_span(w.scales, r0 * w.blocks * 4, scales)

    @staticmethod
    def _unpack_q(packed: np.ndarray, rows: int, w: QuantWeight) -> torch.Tensor:
        """The torch fallbacks' q - 2^(bits-1), exact in fp32, [rows, blocks, block] in the unpacked order."""
        p = torch.from_numpy(packed).view(rows, w.blocks, -1)
        if w.bits == 8:
            return p.to(torch.float32) - 128
        return torch.cat([(p & 15), (p >> 4)], dim=-1).to(torch.float32) - 8

    def _split_rows(self, n: int, fn) -> None:
        """fn(a, b) over 0..n in one range per thread (the C kernels release the GIL); one range
        without them."""
        parts = max(1, min(self.threads, n)) if self.lib is not None and self._pool is not None else 1
        cuts = [n * i // parts for i in range(parts + 1)]
        if parts == 1:
            fn(0, n)
            return
        rest = [self._pool.submit(fn, cuts[i], cuts[i + 1]) for i in range(1, parts)]
        try:
            fn(cuts[0], cuts[1])  # the first range here: one hand-off fewer per call (~225 calls a 7B decode step)
        finally:  # every range done before the shared buffers are touched again, even on an error
            for f in rest:
                f.result()

    def _dequant_rows(self, w: QuantWeight, r0: int, r1: int, packed: np.ndarray, scales: np.ndarray, out: torch.Tensor) -> None:
        """Rows r0..r1 of W read and dequantized into `out` [(r1-r0)·blocks, block]."""
        self._read_rows(w, r0, packed, scales)
        if self.lib is not None:
            fn = self.lib.dequant_bf16 if out.dtype == torch.bfloat16 else self.lib.dequant_f32
            fn(packed.ctypes.data, scales.ctypes.data, out.data_ptr(), r1 - r0, w.blocks, w.block, w.bits)
            return
        # torch fallback, the same values: q - 2^(bits-1) exactly, times the fp32 scale, rounded once
        out.copy_(self._unpack_q(packed, r1 - r0, w).view(-1, w.block) * torch.from_numpy(scales).view(-1, 1))

    def _dequant(self, w: QuantWeight, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows r0..r1 of W as [rows, blocks·block] in `dtype`, split across the threads."""
        n, blob = r1 - r0, w.block * w.bits // 8
        out = self._scratch(f"deq-{dtype}", n * w.blocks * w.block, dtype).view(n * w.blocks, w.block)
        packed = self._scratch("packed", n * w.blocks * blob, torch.uint8).numpy()
        scales = self._scratch("scales", n * w.blocks, torch.float32).numpy()

        def run(a: int, b: int) -> None:
            self._dequant_rows(w, r0 + a, r0 + b, packed[a * w.blocks * blob : b * w.blocks * blob], scales[a * w.blocks : b * w.blocks], out[a * w.blocks : b * w.blocks])

        self._split_rows(n, run)
        return out.view(n, w.blocks * w.block)

    @staticmethod
    def _permute(h: torch.Tensor, w: QuantWeight) -> torch.Tensor:
        """Activations [M, K] in the order a dequantized block is laid out (4-bit: low nibbles,
        then high ones), zero-padded to whole blocks."""
        kp = w.blocks * w.block
        if kp != h.shape[1]:
            h = F.pad(h, (0, kp - h.shape[1]))
        if w.bits == 4:
            h = h.reshape(h.shape[0], w.blocks, w.block // 2, 2).transpose(-1, -2)
        return h.reshape(h.shape[0], kp)

    @property
    def act(self) -> torch.dtype:
        """Activations between GEMMs: bf16 beside bf16 GEMMs, else fp32."""
        return torch.bfloat16 if self.compute == torch.bfloat16 else torch.float32

    def linear(self, hs: list[torch.Tensor], w: QuantWeight, fp32: bool = False) -> list[torch.Tensor]:
        """Each h [M_i, K] @ W^T → [M_i, N], W unpacked a tile of rows at a time and each tile
        shared by every h: one GEMM per row's chunk, the same call it gets alone (so its numbers
        do not depend on the rows beside it), one unpacking for all of them."""
        if self.compute == torch.quint4x2 and not fp32:
            return self._linear_q4(hs, w)
        if self.compute == torch.int8 and not fp32:
            return self._linear_i8(hs, w)
        dtype = torch.float32 if fp32 else self.compute
        hps = [self._permute(self._bucket(h).to(dtype), w) for h in hs]
        step = max(1, SCRATCH_ELEMENTS // (w.blocks * w.block))
        if step >= w.n:
            d = self._dequant(w, 0, w.n, dtype)
            return [(hp @ d.t())[: h.shape[0]] for hp, h in zip(hps, hs)]
        outs = [torch.empty(hp.shape[0], w.n, dtype=dtype) for hp in hps]
        for r0 in range(0, w.n, step):
            r1 = min(w.n, r0 + step)
            d = self._dequant(w, r0, r1, dtype)
            for hp, out in zip(hps, outs):
                out[:, r0:r1] = hp @ d.t()
        return [out[: h.shape[0]] for out, h in zip(outs, hs)]

    def _quant_i8(self, w: QuantWeight, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows r0..r1 of W as int8 [rows, K'] (the dequantized order) and fp32 row scales [rows]."""
        n, blob = r1 - r0, w.block * w.bits // 8
        out = self._scratch("i8", n * w.blocks * w.block, torch.int8).view(n, w.blocks * w.block)
        rscale = self._scratch("i8-scales", n, torch.float32)
        packed = self._scratch("packed", n * w.blocks * blob, torch.uint8).numpy()
        scales = self._scratch("scales", n * w.blocks, torch.float32).numpy()

        def run(a: int, b: int) -> None:
            p, sc = packed[a * w.blocks * blob : b * w.blocks * blob], scales[a * w.blocks : b * w.blocks]
            self._read_rows(w, r0 + a, p, sc)
            if self.lib is not None:
                self.lib.quant_i8(p.ctypes.data, sc.ctypes.data, out[a].data_ptr(), rscale[a:].data_ptr(), b - a, w.blocks, w.block, w.bits)
                return
            # torch fallback, the same values: (q - 2^(bits-1)) * scale / row scale, rounded half to even
            q = self._unpack_q(p, b - a, w)
            s = torch.from_numpy(sc).view(b - a, w.blocks).abs()
            qmax, smax = float(1 << (w.bits - 1)), s.amax(-1, keepdim=True)
            f = torch.where(smax > 0, torch.from_numpy(sc).view(b - a, w.blocks) * 127 / (qmax * smax), 0)
            x = q * f[..., None]
            out[a:b] = torch.round(x).to(torch.int8).view(b - a, -1)
            rscale[a:b] = qmax * smax[:, 0] / torch.full_like(smax[:, 0], 127)  # ÷ tensor: exact, as in C

        self._split_rows(n, run)
        return out, rscale

    def _exact_columns(self, w: QuantWeight, rows: int, idx: torch.Tensor) -> torch.Tensor:
        """Columns `idx` (in the unpacked order) of the tile `_quant_i8` just read, as the exact
        fp32 weights [rows, len(idx)]: (q - 2^(bits-1)) · scale from its packed bytes."""
        blob = w.block * w.bits // 8
        packed = self._buffers["packed"][: rows * w.blocks * blob].view(rows, w.blocks, blob)
        scales = self._buffers["scales"][: rows * w.blocks].view(rows, w.blocks)
        b, j = idx // w.block, idx % w.block
        if w.bits == 8:
            q = packed[:, b, j].to(torch.float32) - 128
        else:
            half = w.block // 2
            byte = packed[:, b, j % half]
            q = torch.where(j < half, byte & 15, byte >> 4).to(torch.float32) - 8
        return q * scales[:, b]

    def _quant_activations(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [M, K] → int8 [2M, K] and scales [2M]: row m's values at one scale (rows 0..M-1) and
        their rounding residual at a 254x finer one (rows M..2M-1), ~15 bits in all. One int8
        scale per row alone loses ~1 % on Gaussian rows and ~2.7 % on the MLP's heavy-tailed
        SiLU(gate)·up (max/RMS ~12): at 7B that took the logits' cosine against the exact int4
        math from 0.987 to 0.955 (MatMulNBits' int8 path, one scale per block of 32: 0.989).
        Outlier columns (a column max above OUTLIER_RATIO × the median non-zero column max) are
        zeroed and returned apart (index, fp32 values [M, n]) for an fp32 GEMM: LLM.int8()'s
        decomposition, for the few channels of a real model that are ~100x the rest."""
        cmax = h.abs().amax(0)
        live = cmax[cmax > 0]  # not the zero columns that pad K to whole blocks
        idx = torch.nonzero(cmax > OUTLIER_RATIO * live.median()).flatten() if len(live) else cmax[:0].long()
        if len(idx):
            outl = h[:, idx].clone()
            h = h.index_fill(1, idx, 0.0)
        else:
            outl = h[:, :0]
        m, k = h.shape
        if self.lib is not None:
            h = h.contiguous()
            a8, sa = torch.empty(2 * m, k, dtype=torch.int8), torch.empty(2 * m)
            self._split_rows(m, lambda a, b: self.lib.quant_act_i8(h.data_ptr(), k, a8.data_ptr(), sa.data_ptr(), a, b, m))
            return a8, sa, idx, outl
        # torch fallback, the same values (tensor ÷ tensor: torch turns ÷ scalar into × 1/scalar)
        amax = h.abs().amax(-1, keepdim=True)
        def c(v: float) -> torch.Tensor:
            return torch.full_like(amax, v)

        scale = amax / c(127)
        fine = scale / c(254)
        hi = torch.round(h * torch.where(amax > 0, c(127) / amax, 0))
        lo = torch.round((h - hi * scale) * torch.where(amax > 0, c(254 * 127) / amax, 0)).clamp_(-127, 127)
        return torch.cat([hi, lo]).to(torch.int8), torch.cat([scale, fine])[:, 0].contiguous(), idx, outl

    def _linear_i8(self, hs: list[torch.Tensor], w: QuantWeight) -> list[torch.Tensor]:
        """`linear` on int8 dot products (torch._int_mm: oneDNN's VNNI/AMX kernels): activations
        (high and low rows) and weights (one scale per output row) in int8, one int32 GEMM per
        tile, rescaled in fp32; outlier columns of the activations go through fp32 beside it."""
        qs = [self._quant_activations(self._permute(self._bucket(h).float(), w)) for h in hs]
        outs = [torch.empty(a8.shape[0] // 2, w.n) for a8, *_ in qs]
        step = max(1, SCRATCH_ELEMENTS // (w.blocks * w.block))
        for r0 in range(0, w.n, step):
            r1 = min(w.n, r0 + step)
            w8, ws = self._quant_i8(w, r0, r1)
            for (a8, sa, idx, outl), out in zip(qs, outs):
                acc = torch._int_mm(a8, w8.t())
                m = out.shape[0]
                if self.lib is None:
                    out[:, r0:r1] = (acc[:m].float() * sa[:m, None] + acc[m:].float() * sa[m:, None]) * ws
                else:
                    self.lib.scale_i32(out[:, r0:].data_ptr(), w.n, acc.data_ptr(), r1 - r0, sa.data_ptr(), ws.data_ptr(), 0, m, r1 - r0, m)
                if len(idx):
                    out[:, r0:r1] += outl @ self._exact_columns(w, r1 - r0, idx).t()
        return [out[: h.shape[0]] for out, h in zip(outs, hs)]

    def _pack_q4(self, w: QuantWeight, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows r0..r1 of W read and laid out for gemm_q4: 16 rows (output columns) a group, the
        packed bytes moved, not unpacked (kernels/dequant.c pack_q4)."""
        n, blob, groups = r1 - r0, w.block // 2, -(-(r1 - r0) // 16)
        dw = w.blocks * w.block // 8
        wq = self._scratch("q4-w", groups * dw * 16, torch.int32)
        ws = self._scratch("q4-ws", groups * w.blocks * 16, torch.float32)
        packed = self._scratch("packed", n * w.blocks * blob, torch.uint8).numpy()
        scales = self._scratch("scales", n * w.blocks, torch.float32).numpy()

        def run(a: int, b: int) -> None:
            ra, rb = 16 * a, min(n, 16 * b)
            p, sc = packed[ra * w.blocks * blob : rb * w.blocks * blob], scales[ra * w.blocks : rb * w.blocks]
            self._read_rows(w, r0 + ra, p, sc)
            self.lib.pack_q4(p.ctypes.data, sc.ctypes.data, wq[a * dw * 16 :].data_ptr(), ws[a * w.blocks * 16 :].data_ptr(), rb - ra, w.blocks, w.block)

        self._split_rows(groups, run)
        return wq, ws

    def _linear_q4(self, hs: list[torch.Tensor], w: QuantWeight) -> list[torch.Tensor]:
        """`linear` on the q4 kernel: int4 blocks against int8 activations (one scale per row and
        block, as MatMulNBits' accuracy level 4), VNNI dot products (kernels/dequant.c gemm_q4).
        Every row's numbers are its own (per-row quantization, a fixed fp32 order per output), so
        all chunks share one GEMM: each weight tile is read once for all of them."""
        sizes = [h.shape[0] for h in hs]
        h = torch.cat(hs) if len(hs) > 1 else hs[0]
        m, kp = h.shape[0], w.blocks * w.block
        h = F.pad(h.float(), (0, kp - h.shape[1])) if kp != h.shape[1] else h.float().contiguous()
        aq = torch.empty(-(-m // 8) * 8 * kp, dtype=torch.int8)  # tiles of 8 rows (the last one padded)
        sa, za = torch.empty(m * w.blocks), torch.empty(m * w.blocks, dtype=torch.int32)
        self._split_rows(m, lambda a, b: self.lib.quant_act_q4(h.data_ptr(), kp, aq.data_ptr(), sa.data_ptr(), za.data_ptr(), a, b, w.block))
        out = torch.empty(m, w.n)
        step = w.n if self.resident is not None else max(16, SCRATCH_ELEMENTS // kp // 16 * 16)
        for r0 in range(0, w.n, step):
            r1 = min(w.n, r0 + step)
            wq, ws = self.resident[id(w)] if self.resident is not None else self._pack_q4(w, r0, r1)
            ptr = out[:, r0:].data_ptr()
            self._split_rows(
                -(-(r1 - r0) // 16),
                lambda a, b: self.lib.gemm_q4(aq.data_ptr(), sa.data_ptr(), za.data_ptr(), m, wq.data_ptr(), ws.data_ptr(), a, b, w.blocks, w.block, ptr, w.n, r1 - r0, Q4_ROW_CHUNK),  # noqa: B023 - run before the loop moves on
            )
        return list(out.split(sizes))

    @staticmethod
    def _bucket(h: torch.Tensor) -> torch.Tensor:
        """Rows zero-padded to a multiple of M_BUCKET: oneDNN keeps a primitive (and its memory,
        ~25-45 MB at 7B) per GEMM shape, so every new prompt length grew a server; buckets bound
        the shapes to max_batched_tokens / M_BUCKET. A row's bucket depends on its own chunk only."""
        pad = -h.shape[0] % M_BUCKET
        return F.pad(h, (0, 0, 0, pad)) if pad and h.shape[0] > 1 else h

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight).to(self.act)

    def _rotary(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Half-split rotary (rotary_interleaved=0) of t [heads, S, head_dim] at `positions`."""
        cos, sin = self.cos[positions], self.sin[positions]  # [S, hd/2]
        a, b = t.float().chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def _compute(self, fn, *args):
        """fn(*args) with this kernel's torch threads, no autograd, and large arrays from glibc's heap."""
        from ..runtime.memory import heap_allocations

        old_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode(), heap_allocations():
                return fn(*args)
        finally:
            torch.set_num_threads(old_threads)

    def prefill_rows(self, cache_arrays: list[np.ndarray], rows: list[tuple[int, int, np.ndarray]]) -> list[np.ndarray]:
        """For each (slot, past, embeds [S, H]): positions past..past+S of that slot, their keys
        and values written into `cache_arrays` (per layer key, value: [slots, kv_heads, width,
        head_dim]); each row's last position's logits [V] (fp32) returned."""
        logits = self._compute(self._prefill, cache_arrays, rows)
        self.tokens += sum(len(e) for _, _, e in rows)
        return logits

    def decode_rows(self, cache_arrays: list[np.ndarray], lengths: list[int], embeds: np.ndarray) -> np.ndarray:
        """One decode step of slots 0..n-1 (row r holds lengths[r] positions; embeds [n, H]): each
        row's next position written into `cache_arrays`, logits [n, V]. The whole step is batched:
        one GEMM per weight for all rows, one attention call per layer over the slots' caches as
        they lie (padded to the longest row, the rest masked)."""
        return self._compute(self._decode, cache_arrays, lengths, embeds)

    def _qkv(self, hs: list[torch.Tensor], layer: _Layer) -> list[torch.Tensor]:
        """Each h's [M, (heads + 2 kv_heads) · head_dim] projection: the fused weight's output as it
        comes, or q, k, v side by side."""
        whole = self._fused(layer.qkv)
        if whole is not None:
            return self.linear(hs, whole)
        parts = [self.linear(hs, w) for w in layer.qkv]
        return [torch.cat([p[r] for p in parts], dim=-1) if len(parts) > 1 else parts[0][r] for r in range(len(hs))]

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm, in fp32 (lm_head's input)."""
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_final

    def _decode(self, cache_arrays: list[np.ndarray], lengths: list[int], embeds: np.ndarray) -> np.ndarray:
        hd, nh, kvh, n = self.head_dim, self.heads, self.kv_heads, len(lengths)
        x = torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32))
        pos, rows, width = torch.tensor(lengths, dtype=torch.int64), torch.arange(n), max(lengths) + 1
        mask = (torch.arange(width)[None, :] <= pos[:, None])[:, None, None, :]  # [n, 1, 1, width]
        masks: dict[torch.dtype, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.norm_in)
            qkv = self._qkv([h], layer)[0]
            qk = self._rotary(qkv[:, : (nh + kvh) * hd].view(n, nh + kvh, hd).transpose(0, 1), pos).transpose(0, 1)  # q and k in one pass
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[:, (nh + kvh) * hd :].view(n, kvh, hd)
            kc, vc = torch.from_numpy(cache_arrays[2 * i]), torch.from_numpy(cache_arrays[2 * i + 1])
            if layer.kv_scales is None:
                kc[rows, :, pos] = k.to(kc.dtype)
                vc[rows, :, pos] = v.to(vc.dtype)
                att = kc.dtype if kc.dtype == torch.float16 else self.act
                attn = self._sdpa_rows(q, kc[:n, :, :width].to(att), vc[:n, :, :width].to(att), mask, masks)
            else:
                ks, vs = (t.view(kvh, hd) for t in layer.kv_scales)
                kc[rows, :, pos] = torch.round(k.float() / ks).clamp_(-128, 127).to(torch.int8)
                vc[rows, :, pos] = torch.round(v.float() / vs).clamp_(-128, 127).to(torch.int8)
                attn = self._attend_i8(q, kc, vc, ks, vs, pos)  # straight from the int8 cache (resident q4 always has the native library)
            x = x + self.linear([attn.reshape(n, nh * hd).to(self.act)], layer.o)[0].float()
            h = self._norm(x, layer.norm_post)
            (g,), (u,) = self.linear_group([h], (layer.gate, layer.up))
            x = x + self.linear([F.silu(g) * u], layer.down)[0].float()
        return self.linear([self._final(x)], self.lm_head, fp32=self.resident is None)[0].numpy()

    def _sdpa_rows(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, masks: dict[torch.dtype, torch.Tensor]) -> torch.Tensor:
        """Decode rows' attention (q [n, heads, head_dim]) over their caches as they lie, padded to
        the longest row, the rest masked."""
        if keys.dtype not in masks:  # additive: SDPA's fp16 path ran ~1.3x faster than with the bool mask
            masks[keys.dtype] = torch.zeros(mask.shape, dtype=keys.dtype).masked_fill_(~mask, float("-inf"))
        nh, kvh = q.shape[1], keys.shape[1]
        return F.scaled_dot_product_attention(q[:, :, None].to(keys.dtype), keys, values, attn_mask=masks[keys.dtype], scale=self.scale, enable_gqa=nh != kvh)

    def _attend_i8(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step's attention [n, heads, head_dim] over an int8 cache as it lies: each
        position read once, no dequantized copy (the fp32 one cost 4x the cache's bytes per step)."""
        n, nh, hd = q.shape
        q, out = q.float().contiguous(), torch.empty(n, nh, hd)
        cap, scale = kc.shape[2], self.scale or hd**-0.5

        def run(a: int, b: int) -> None:
            scratch = torch.empty(cap + 2 * hd)
            self.lib.attend_i8(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), ks.data_ptr(), vs.data_ptr(), pos.data_ptr(), nh, self.kv_heads, cap, hd, scale, out.data_ptr(), scratch.data_ptr(), a, b)

        self._split_rows(n * nh, run)
        return out

    def _prefill(self, cache_arrays: list[np.ndarray], rows: list[tuple[int, int, np.ndarray]]) -> list[np.ndarray]:
        hd, nh, kvh = self.head_dim, self.heads, self.kv_heads
        xs = [torch.from_numpy(np.ascontiguousarray(e, dtype=np.float32)) for _, _, e in rows]
        spans = [(slot, past, len(e), torch.arange(past, past + len(e))) for slot, past, e in rows]
        masks = [None if past == 0 or s == 1 else (torch.arange(past + s)[None, :] <= pos[:, None]) for _, past, s, pos in spans]  # one position sees its whole past
        for i, layer in enumerate(self.layers):
            hs = [self._norm(x, layer.norm_in) for x in xs]
            qkvs = self._qkv(hs, layer)
            attns = []
            for (slot, past, s, pos), qkv, mask in zip(spans, qkvs, masks):
                qk = self._rotary(qkv[:, : (nh + kvh) * hd].view(s, nh + kvh, hd).transpose(0, 1), pos)
                q, k = qk[:nh], qk[nh:]
                v = qkv[:, (nh + kvh) * hd :].view(s, kvh, hd).transpose(0, 1)
                kc = torch.from_numpy(cache_arrays[2 * i])[slot]
                vc = torch.from_numpy(cache_arrays[2 * i + 1])[slot]
                if layer.kv_scales is None:
                    kc[:, past : past + s] = k.to(kc.dtype)
                    vc[:, past : past + s] = v.to(vc.dtype)
                    # the q4 decoder attends over an fp16 cache as it is (SDPA's fp16 kernel accumulates
                    # in fp32); converting every row's whole past each decode step cost as much again
                    att = kc.dtype if self.resident is not None and kc.dtype == torch.float16 else self.act
                    keys, values = kc[:, : past + s].to(att), vc[:, : past + s].to(att)
                else:  # int8 cache: quantized as GroupQueryAttention does (nearest, saturating), attended dequantized
                    ks, vs = layer.kv_scales
                    kc[:, past : past + s] = torch.round(k.float() / ks).clamp_(-128, 127).to(torch.int8)
                    vc[:, past : past + s] = torch.round(v.float() / vs).clamp_(-128, 127).to(torch.int8)
                    keys, values = (kc[:, : past + s].float() * ks).to(self.act), (vc[:, : past + s].float() * vs).to(self.act)
                attn = F.scaled_dot_product_attention(
                    q.to(keys.dtype)[None], keys[None], values[None], attn_mask=mask, is_causal=mask is None and past == 0, scale=self.scale, enable_gqa=nh != kvh
                )[0]
                attns.append(attn.transpose(0, 1).reshape(s, nh * hd).to(self.act))
            xs = [x + o.float() for x, o in zip(xs, self.linear(attns, layer.o))]
            hs = [self._norm(x, layer.norm_post) for x in xs]
            acts = [F.silu(g) * u for g, u in zip(*self.linear_group(hs, (layer.gate, layer.up)))]
            xs = [x + d.float() for x, d in zip(xs, self.linear(acts, layer.down))]
        hs = [self._final(x[-1:]) for x in xs]
        # lm_head: exact fp32 for a prompt's last positions; q4 when every decode step runs here
        return [lg[0].numpy() for lg in self.linear(hs, self.lm_head, fp32=self.resident is None)]
