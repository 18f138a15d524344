"""LLaMA decoder → ONNX with `inputs_embeds` and an explicit KV cache, plus ORT precisions.

Inputs: inputs_embeds [B,S,H], attention_mask [B,P+S], position_ids [B,S], past_key_values.N.
{key,value} [B,kvh,P,hd]. Outputs: logits of the last position [B,1,V] and present.N.{key,value}.
The token-embedding table is saved beside the graph (`embed_tokens.npy`) so the runtime embeds
text, and splices images, with numpy alone.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ExportError
from ..model.reference import CACHE_KWARG
from .spec import PartSpec, decoder_spec
from .vision import quiet_logs, save_checked, save_model

GRAPH = "decoder.onnx"
EMBEDDINGS = "embed_tokens.npy"
OPSET = 18
ORT_PRECISIONS = ("fp32", "fp16", "int8", "int4")
Progress = Callable[[str], None]


class DecoderWithCache(nn.Module):
    """Flat tensors in and out around LlamaForCausalLM and a DynamicCache (what ONNX needs)."""

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm
        self.layers = llm.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, past: tuple[torch.Tensor, ...]):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.llm.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_KWARG: cache},
        )
        present = []
        for i in range(self.layers):
            present += [cache.layers[i].keys, cache.layers[i].values]
        return (out.logits, *present)


def decoder_dims(config: Any) -> dict[str, int]:
    heads = config.num_attention_heads
    return {
        "layers": config.num_hidden_layers,
        "kv_heads": getattr(config, "num_key_value_heads", heads) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
    }


def export_decoder(llm: nn.Module, folder: Path, progress: Progress = print, opset: int = OPSET) -> PartSpec:
    """Export the decoder in the dtype `llm` holds (fp32, or fp16 for 7B on a 24 GB machine)."""
    dims = decoder_dims(llm.config)
    dtype = next(llm.parameters()).dtype
    wrapper = DecoderWithCache(llm).eval()
    b, s, p = 2, 5, 3
    args = (
        torch.zeros(b, s, dims["hidden"], dtype=dtype),
        torch.ones(b, p + s, dtype=torch.long),
        torch.arange(p, p + s)[None].repeat(b, 1),
        tuple(torch.zeros(b, dims["kv_heads"], p, dims["head_dim"], dtype=dtype) for _ in range(2 * dims["layers"])),
    )
    batch = torch.export.Dim("batch", min=1, max=256)
    seq = torch.export.Dim("sequence", min=1, max=32768)
    past = torch.export.Dim("past_sequence", min=0, max=32768)
    total = torch.export.Dim("total_sequence", min=1, max=65536)
    past_names = [f"past_key_values.{i}.{k}" for i in range(dims["layers"]) for k in ("key", "value")]
    present_names = [f"present.{i}.{k}" for i in range(dims["layers"]) for k in ("key", "value")]
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in past_names))
    nbytes = sum(t.numel() * t.element_size() for t in llm.parameters())
    progress(f"exporting decoder ({dims['layers']} layers, {nbytes / 1e9:.2f} GB of {str(dtype).replace('torch.', '')} weights)")
    with quiet_logs(), warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_shapes=shapes,
            opset_version=opset,
            optimize=True,
        )
    external = save_checked(program, folder / GRAPH, nbytes, {n: [None, None, "total_sequence", None] for n in present_names}, progress)
    del program
    progress(f"saving the token-embedding table ({EMBEDDINGS})")
    table = llm.get_input_embeddings().weight.detach()
    np.save(folder / EMBEDDINGS, table.float().numpy() if dtype == torch.float32 else table.to(torch.float16).numpy())
    spec = decoder_spec(GRAPH, "fp32" if dtype == torch.float32 else "fp16", opset, **dims, external_data=external)
    spec.attributes["eos_token_id"] = int(getattr(llm.config, "eos_token_id", 2) or 2)
    spec.save(folder)
    return spec


def quantize_decoder(src: Path, dest: Path, precision: str, block_size: int = 32, progress: Progress = print) -> dict[str, Any]:
    """int8: per-channel int8 weights (dynamic int8 activations); int4: MatMulNBits weight-only;
    fp16: for the CUDA execution provider (RMSNorm's reductions kept in fp32)."""
    info: dict[str, Any] = {"precision": precision}
    external = (src.parent / (src.name + ".data")).exists()
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        progress("quantizing decoder weights to int8 (per channel)")
        with quiet_logs():
            quantize_dynamic(str(src), str(dest), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], use_external_data_format=external)
    elif precision == "int4":
        if block_size < 16 or block_size & (block_size - 1):
            raise ExportError(f"int4 block size must be a power of two >= 16, got {block_size}")
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        progress(f"quantizing decoder weights to int4 (MatMulNBits, block {block_size})")
        model = onnx.load(str(src))
        with quiet_logs():
            quant = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, accuracy_level=4)
            quant.process()
        save_model(quant.model.model, dest)
        info["block_size"] = block_size
    elif precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        progress("converting decoder to fp16")
        model = onnx.load(str(src))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = convert_float_to_float16(model, keep_io_types=False, op_block_list=["Pow", "ReduceMean", "Sqrt", "Reciprocal"])
        save_model(out, dest)
    else:
        raise ExportError(f"unknown ONNX Runtime LLM precision '{precision}' (use {', '.join(ORT_PRECISIONS)})")
    return info


GRAPHS = ("dynamo", "gqa")


def export_llm_onnxruntime(
    llm: nn.Module, folder: Path, precision: str = "fp32", block_size: int = 32, progress: Progress = print, graph: str = "dynamo", tokenizer_dir: Path | None = None
) -> PartSpec:
    """Export + quantize into `folder`: decoder.onnx, decoder.json, embed_tokens.npy.

    graph="dynamo": our torch.onnx export (exact; every precision). graph="gqa": ORT's fused
    layout from onnxruntime-genai's builder (fp32/int8/int4; faster on CPU), see llm_gqa.py.
    """
    if precision not in ORT_PRECISIONS:
        raise ExportError(f"precision '{precision}' is not available for the onnxruntime backend (use {', '.join(ORT_PRECISIONS)})")
    if graph not in GRAPHS:
        raise ExportError(f"unknown decoder graph '{graph}' (use {', '.join(GRAPHS)})")
    folder.mkdir(parents=True, exist_ok=True)
    if graph == "gqa":
        from .llm_gqa import export_decoder_gqa

        return export_decoder_gqa(llm.float(), folder, precision, block_size, tokenizer_dir, progress)
    if precision == "fp32":
        return export_decoder(llm.float(), folder, progress)
    scratch = folder / "fp32"
    scratch.mkdir()
    spec = export_decoder(llm, scratch, progress)
    info = quantize_decoder(scratch / GRAPH, folder / GRAPH, precision, block_size, progress)
    shutil.move(str(scratch / EMBEDDINGS), folder / EMBEDDINGS)
    shutil.rmtree(scratch)
    spec.precision = precision
    spec.attributes.update({k: v for k, v in info.items() if k != "precision"})
    if precision == "fp16":
        for t in spec.inputs + spec.outputs:
            if t.dtype == "float32":
                t.dtype = "float16"
    spec.save(folder)
    (folder / "decoder_report.json").write_text(json.dumps(info, indent=2))
    return spec
