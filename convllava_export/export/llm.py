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
import torch
from torch import nn

from ..errors import ExportError
from ..precisions import part_backend
from ..precisions import precision as precision_row
from ..model.reference import CACHE_KWARG
from .spec import PartSpec, decoder_spec
from .stream_quant import BLOCK_SIZE
from .vision import quiet_logs, save_checked

GRAPH = "decoder.onnx"
EMBEDDINGS = "embed_tokens.npy"
OPSET = 18
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
    # fp16 tables stay fp16 (half the bytes); bf16 ones go to fp32, which holds them exactly
    np.save(folder / EMBEDDINGS, table.to(torch.float16).numpy() if dtype == torch.float16 else table.float().numpy())
    spec = decoder_spec(GRAPH, {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype], opset, **dims, external_data=external)
    spec.attributes["eos_token_id"] = int(getattr(llm.config, "eos_token_id", 2) or 2)
    if dtype != torch.float32:  # the graph's float inputs/outputs are in the traced dtype
        for t in spec.inputs + spec.outputs:
            if t.dtype == "float32":
                t.dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    spec.save(folder)
    return spec


def choose_graph(requested: str, precision: str) -> tuple[str, str]:
    """(graph, why). auto: the fused gqa layout for int4/int8 where onnxruntime-genai is
    installed (1.5-2x faster decode on CPU, BENCHMARKS.md), our dynamo export otherwise."""
    if requested != "auto":
        return requested, f"--llm-graph {requested}"
    from .llm_gqa import genai_available

    row = part_backend("llm", "onnxruntime").get(precision)
    if row is not None and row.block_scaled and "gqa" in row.graphs:
        if genai_available():
            return "gqa", f"auto: fused gqa layout for {precision} (onnxruntime-genai installed)"
        return "dynamo", "auto: dynamo graph (onnxruntime-genai not installed; pip install 'convllava-export[genai]' for the faster gqa layout)"
    return "dynamo", f"auto: dynamo graph ({precision} is not built in the gqa layout)"


def export_llm_onnxruntime(
    llm: nn.Module | None,
    folder: Path,
    precision: str = "fp32",
    block_size: int = BLOCK_SIZE,
    progress: Progress = print,
    graph: str = "dynamo",
    tokenizer_dir: Path | None = None,
    checkpoint: Any = None,
) -> PartSpec:
    """Export + quantize into `folder`: decoder.onnx(+.data), decoder.json, embed_tokens.npy.

    graph="dynamo": our torch.onnx export (exact; every precision), traced in the dtype `llm`
    holds (the checkpoint's: no fp32 copy of a 7B decoder), then rewritten tensor by tensor to
    fp32 / int8 / int4 by stream_quant.py. graph="gqa": ORT's fused layout from
    onnxruntime-genai's builder, see llm_gqa.py; it reads the checkpoint's shards itself
    (`checkpoint`: a CheckpointInfo) or saves `llm`.
    """
    precision_row("llm", "onnxruntime", precision, graph=graph)  # the table's one refusal
    folder.mkdir(parents=True, exist_ok=True)
    if graph == "gqa":
        from .llm_gqa import export_decoder_gqa

        return export_decoder_gqa(llm, folder, precision, block_size, tokenizer_dir, progress, checkpoint=checkpoint)
    assert llm is not None, "the dynamo graph is traced from a loaded model"
    dtype = next(llm.parameters()).dtype
    if precision == "fp16" and dtype != torch.float16:
        import copy

        llm = copy.deepcopy(llm).half()  # small models only: large ones are loaded in fp16 for this
        dtype = torch.float16
    if (precision == "fp32" and dtype == torch.float32) or precision == "fp16":
        return export_decoder(llm, folder, progress)
    from .stream_quant import rewrite_weights

    scratch = folder / "traced"
    scratch.mkdir()
    spec = export_decoder(llm, scratch, progress)
    info = rewrite_weights(scratch / GRAPH, folder / GRAPH, precision, block_size, progress=progress)
    shutil.move(str(scratch / EMBEDDINGS), folder / EMBEDDINGS)
    shutil.rmtree(scratch)
    spec.precision = precision
    spec.attributes["external_data"] = (folder / (GRAPH + ".data")).exists()
    spec.attributes.update({k: v for k, v in info.items() if k in ("block_size", "quantized_matmuls")})
    spec.attributes["traced_dtype"] = str(dtype).replace("torch.", "")
    for t in spec.inputs + spec.outputs:
        if t.dtype in ("float16", "bfloat16"):
            t.dtype = "float32"
    spec.save(folder)
    (folder / "decoder_report.json").write_text(json.dumps(info, indent=2))
    return spec


def export_llm_from_checkpoint(
    info: Any, folder: Path, precision: str, block_size: int = BLOCK_SIZE, progress: Progress = print, graph: str = "dynamo", budget: int | None = None
) -> PartSpec:
    """`export_llm_onnxruntime` from a checkpoint (a CheckpointInfo), holding at most one copy
    of the LLM: none with the gqa graph (the builder reads the shards), or the LLM alone in the
    dtype `sizing.trace_dtype` picks for the memory available (`budget`)."""
    from ..model.reference import ReferenceModel
    from ..sizing import model_size, trace_dtype

    if graph == "gqa":
        return export_llm_onnxruntime(None, folder, precision, block_size, progress, "gqa", info.path, checkpoint=info)
    dtype = trace_dtype(model_size(info), precision_row("llm", "onnxruntime", precision, graph=graph), budget)
    ref = ReferenceModel.load(info.path, vision_tower=info.tower_path, dtype=dtype, load_vision=False, progress=progress)
    return export_llm_onnxruntime(ref.llm, folder, precision, block_size, progress, "dynamo", info.path)
