"""LLaMA decoder → ONNX Runtime's fused layout (GroupQueryAttention + MatMulNBits), for CPU speed.

Our dynamo export (llm.py) is exact but runs attention as a dozen separate ops and concatenates
the KV cache in the graph every step. onnxruntime-genai's model builder writes the layout ORT's
CPU kernels are tuned for: rotary embedding, attention and the cache update fused into one
GroupQueryAttention per layer, SkipSimplifiedLayerNorm, int4/int8 MatMulNBits. With
`exclude_embeds` the graph takes `inputs_embeds`, so image features are spliced in exactly as
with our own graph; generation stays in our loop (OrtGqaDecoder), since the genai generator
cannot take embeddings for LLaMA. After the build, the graph is cut to compute logits for the
last position only (prefill would otherwise run lm_head over every prompt token).

Inputs: inputs_embeds [B,S,H], attention_mask [B,P+S], past_key_values.N.{key,value}
[B,kvh,P,hd] (positions come from the mask). Outputs: logits [B,1,V], present.N.{key,value}.
The cache is fp16 for int4/int8 graphs (half_kv_cache) and fp32 for the fp32 graph.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ..checkpoint import EMBED_KEY, CheckpointInfo, read_tensor
from ..errors import ExportError
from ..precisions import precision as precision_row
from .spec import PartSpec, TensorSpec
from .stream_quant import BLOCK_SIZE

GRAPH = "decoder.onnx"
EMBEDDINGS = "embed_tokens.npy"
Progress = Callable[[str], None]


def genai_available() -> bool:
    from ..extras import available

    return available("onnxruntime_genai")


def last_position_logits(graph: Path) -> None:
    """Insert Slice(seq: -1:) before the lm_head MatMul(NBits), in place (weights untouched)."""
    model = onnx.load(str(graph), load_external_data=False)
    nodes = list(model.graph.node)
    head = next((n for n in nodes if n.name in ("/lm_head/MatMul", "/lm_head/MatMulNBits") or n.name.startswith("/lm_head/MatMul")), None)
    if head is None:
        raise ExportError(f"no lm_head MatMul in {graph}: the builder's graph layout changed; rebuild without --graph gqa")
    consts = [
        onnx.helper.make_tensor("lastpos_starts", onnx.TensorProto.INT64, [1], [-1]),
        onnx.helper.make_tensor("lastpos_ends", onnx.TensorProto.INT64, [1], [np.iinfo(np.int64).max]),
        onnx.helper.make_tensor("lastpos_axes", onnx.TensorProto.INT64, [1], [1]),
    ]
    model.graph.initializer.extend(consts)
    sliced = head.input[0] + "_last"
    slice_node = onnx.helper.make_node("Slice", [head.input[0], "lastpos_starts", "lastpos_ends", "lastpos_axes"], [sliced], name="/lm_head/last_position")
    head.input[0] = sliced
    idx = nodes.index(head)
    del model.graph.node[:]
    model.graph.node.extend([*nodes[:idx], slice_node, *nodes[idx:]])
    for out in model.graph.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[1].ClearField("dim_param")
            out.type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(model, str(graph))


def half_kv_cache(graph: Path) -> int:
    """Run every GroupQueryAttention in fp16, in place: Cast its query/key/value (and the shared
    rotary tables) to fp16 and its output back to fp32, so past and present are fp16 — half the
    cache's memory, which at 7B is what bounds how many requests decode together. ORT's CPU
    kernel computes attention in fp32 from the fp16 cache. Returns the nodes rewritten."""
    model = onnx.load(str(graph), load_external_data=False)
    nodes, casts, done = [], set(), 0
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        ins = list(node.input)
        for k in (0, 1, 2, 7, 8):  # query, key, value, cos_cache, sin_cache
            if k < len(ins) and ins[k]:
                half = ins[k] + "_fp16"
                if half not in casts:
                    nodes.append(onnx.helper.make_node("Cast", [ins[k]], [half], to=f16, name=half + "/cast"))
                    casts.add(half)
                ins[k] = half
        out = node.output[0]
        node.output[0] = out + "_fp16"
        del node.input[:]
        node.input.extend(ins)
        nodes.extend([node, onnx.helper.make_node("Cast", [out + "_fp16"], [out], to=f32, name=node.name + "/cast_out")])
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for v in [*model.graph.input, *model.graph.output]:
        if v.name.startswith(("past_key_values.", "present.")):
            v.type.tensor_type.elem_type = f16
    onnx.save(model, str(graph))
    return done


def int8_kv_cache(graph: Path, scales: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """Store every GroupQueryAttention's cache as int8, in place: per-channel scales (one per kv head
    and dimension, [kv_heads * head_dim] per layer, key and value) become initializers, the node
    quantizes each new key/value (round to nearest, saturating) and dequantizes the cache in its
    attention (ONNX Runtime's CPU kernel, verified on 1.32: kv_cache_bit_width 8, PER_CHANNEL). Half the
    fp16 cache's bytes, so twice the rows decode together in the same KV budget. Returns the nodes."""
    model = onnx.load(str(graph), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if len(gqa) != len(scales):
        raise ExportError(f"{graph}: {len(gqa)} GroupQueryAttention nodes, {len(scales)} layers of KV scales")
    for i, (node, (k_scale, v_scale)) in enumerate(zip(gqa, scales)):
        ins = list(node.input) + [""] * max(0, 14 - len(node.input))
        ins[12], ins[13] = f"kv_scale.{i}.key", f"kv_scale.{i}.value"  # the op's k_scale and v_scale inputs
        del node.input[:]
        node.input.extend(ins)
        node.attribute.extend([onnx.helper.make_attribute("kv_cache_bit_width", 8), onnx.helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("v_quant_type", "PER_CHANNEL")])
        model.graph.initializer.extend([onnx.numpy_helper.from_array(np.ascontiguousarray(k_scale, np.float32).ravel(), ins[12]),
                                        onnx.numpy_helper.from_array(np.ascontiguousarray(v_scale, np.float32).ravel(), ins[13])])
    for v in [*model.graph.input, *model.graph.output]:
        if v.name.startswith(("past_key_values.", "present.")):
            v.type.tensor_type.elem_type = onnx.TensorProto.INT8
    onnx.save(model, str(graph))
    return len(gqa)


@lru_cache(maxsize=1)
def int8_kv_cache_unsupported() -> str | None:
    """Why the installed ONNX Runtime cannot run an int8 GroupQueryAttention cache, or None when it
    can: one such node (2 heads, 1 kv head, head_dim 8) decodes a step over a 3-position int8
    cache. The attribute came with the quantized-cache kernel (verified on 1.32); an older CPU
    kernel refuses the node or the int8 inputs, which a build should say before exporting 7B."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    heads, kvh, hd, past = 2, 1, 8, 3
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total", "", "", "", "", "", "ks", "vs"], ["out", "present_k", "present_v"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kvh, kv_cache_bit_width=8, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
    f, i8 = TensorProto.FLOAT, TensorProto.INT8
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info("q", f, [1, 1, heads * hd]), helper.make_tensor_value_info("k", f, [1, 1, kvh * hd]), helper.make_tensor_value_info("v", f, [1, 1, kvh * hd]),
         helper.make_tensor_value_info("pk", i8, [1, kvh, past + 1, hd]), helper.make_tensor_value_info("pv", i8, [1, kvh, past + 1, hd]),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]), helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("out", f, None), helper.make_tensor_value_info("present_k", i8, None), helper.make_tensor_value_info("present_v", i8, None)],
        [onnx.numpy_helper.from_array(np.full(kvh * hd, 0.05, np.float32), "ks"), onnx.numpy_helper.from_array(np.full(kvh * hd, 0.05, np.float32), "vs")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, 1, heads * hd), np.float32), "k": rng.standard_normal((1, 1, kvh * hd), np.float32), "v": rng.standard_normal((1, 1, kvh * hd), np.float32),
             "pk": rng.integers(-100, 100, (1, kvh, past + 1, hd), dtype=np.int8), "pv": rng.integers(-100, 100, (1, kvh, past + 1, hd), dtype=np.int8),
             "seqlens_k": np.array([past], np.int32), "total": np.array(past + 1, np.int32)}
    try:
        out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - any refusal of the node is the answer
        return f"onnxruntime {ort.__version__} refuses an int8 GroupQueryAttention cache ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if out[1].dtype != np.int8 or not np.isfinite(out[0]).all():
        return f"onnxruntime {ort.__version__} runs the int8 GroupQueryAttention cache but returns {out[1].dtype} keys / non-finite attention"
    return None


def write_llm_folder(info: CheckpointInfo, dest: Path) -> None:
    """A transformers LLaMA folder over the checkpoint's own shards: a config.json with the
    dtype the weights are stored in, the weight index, and links to the shards (the projector
    and tower keys in them are ignored by LlamaForCausalLM). No weight is copied."""
    from ..checkpoint import WEIGHT_INDEX_NAMES, weights_dtype
    from ..model.config import llama_config

    dest.mkdir(parents=True)
    cfg = llama_config(info.config).to_dict()
    cfg.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": str(weights_dtype(info)).replace("torch.", "")})  # transformers' names
    cfg["dtype"] = cfg["torch_dtype"]
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in WEIGHT_INDEX_NAMES:
        if (info.path / name).is_file():
            shutil.copyfile(info.path / name, dest / name)
    for f in info.weight_files:
        (dest / f.name).symlink_to(f.resolve())


def export_decoder_gqa(
    llm: nn.Module | None,
    folder: Path,
    precision: str = "int4",
    block_size: int = BLOCK_SIZE,
    tokenizer_dir: Path | None = None,
    progress: Progress = print,
    checkpoint: CheckpointInfo | None = None,
) -> PartSpec:
    """Build `folder/decoder.onnx` (+ .data) in the fused layout, with embed_tokens.npy and decoder.json.

    The builder's own int4/int8 path holds the whole fp32 model as one proto (3.5x the fp16
    weights, measured: 48 GB for a 7B), so it is asked for fp32, which it writes tensor by
    tensor, and stream_quant.py quantizes that graph one tensor at a time. With `checkpoint`,
    the builder reads the checkpoint's own shards (linked, never copied), so this process holds
    no weights at all while it runs.
    """
    from .stream_quant import rewrite_weights

    precision_row("llm", "onnxruntime", precision, graph="gqa")
    if not genai_available():
        raise ExportError("the gqa graph is built by onnxruntime-genai's model builder: pip install onnxruntime-genai (or use the default graph)")
    if (llm is None) == (checkpoint is None):
        raise ExportError("export_decoder_gqa takes either a loaded model or a checkpoint")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gqa-", dir=folder.parent) as tmp:
        hf, out = Path(tmp) / "hf", Path(tmp) / "out"
        _builder_input(hf, llm, checkpoint, tokenizer_dir, progress)
        _run_builder(hf, out, Path(tmp), progress)
        shutil.rmtree(hf)
        genai_cfg = json.loads((out / "genai_config.json").read_text())
        if precision == "fp32":
            for f in out.iterdir():
                if f.name.startswith(GRAPH):
                    shutil.move(str(f), folder / f.name)
        else:
            rewrite_weights(out / GRAPH, folder / GRAPH, precision, block_size, progress=progress)
        (folder / "genai_config.json").write_text(json.dumps(genai_cfg, indent=2))
    last_position_logits(folder / GRAPH)
    kv_dtype = "float32" if precision == "fp32" else "float16"  # fp32 stays exact against the reference
    if kv_dtype == "float16" and half_kv_cache(folder / GRAPH) == 0:
        raise ExportError(f"no GroupQueryAttention in {folder / GRAPH}: the builder's graph layout changed; rebuild without --graph gqa")
    vocab = _save_embedding_table(folder, llm, checkpoint)
    spec = _gqa_spec(folder, precision, block_size, genai_cfg["model"]["decoder"], vocab, kv_dtype)
    spec.save(folder)
    return spec


def _builder_input(hf: Path, llm: nn.Module | None, checkpoint: CheckpointInfo | None, tokenizer_dir: Path | None, progress: Progress) -> None:
    """The transformers folder the builder reads: links to the checkpoint's shards, or the loaded
    model saved; with the checkpoint's tokenizer files (the bundled tiny tokenizer without any)."""
    if checkpoint is not None:
        progress("linking the checkpoint's language-model shards for the builder")
        write_llm_folder(checkpoint, hf)
        tokenizer_dir = tokenizer_dir or checkpoint.path
    else:
        assert llm is not None
        progress("writing the language model as a transformers folder for the builder")
        llm.save_pretrained(hf, safe_serialization=True)
    if tokenizer_dir:  # the builder writes tokenizer files for genai; ours come from the checkpoint
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens_map")) and f.is_file():
                shutil.copy(f, hf / f.name)
    else:
        shutil.copy(Path(__file__).parents[1] / "data" / "tiny_tokenizer.model", hf / "tokenizer.model")


def _run_builder(hf: Path, out: Path, tmp: Path, progress: Progress) -> None:
    """onnxruntime-genai's model builder, fp32 for CPU without the embedding table, in a child
    process; its output goes to a log whose tail is the error when it fails."""
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(tmp / "cache"),
        "--extra_options", "exclude_embeds=true", f"filename={GRAPH}",
    ]
    progress("building the fused fp32 graph (onnxruntime-genai model builder, tensor by tensor)")
    log = tmp / "builder.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not (out / GRAPH).exists():
        tail = log.read_text(errors="replace")[-1500:]
        raise ExportError(f"onnxruntime-genai's model builder failed (exit {rc}):\n{tail}")


def _save_embedding_table(folder: Path, llm: nn.Module | None, checkpoint: CheckpointInfo | None) -> int:
    """embed_tokens.npy (the graph takes inputs_embeds); returns the vocabulary size."""
    if checkpoint is not None:  # an fp16 table stays fp16 (exact, half the bytes); bf16 goes to fp32
        t = read_tensor(checkpoint, EMBED_KEY)
        table = t.numpy() if t.dtype == torch.float16 else t.float().numpy()
    else:
        assert llm is not None
        table = llm.get_input_embeddings().weight.detach().float().numpy()
    np.save(folder / EMBEDDINGS, table)
    return int(table.shape[0])


def _gqa_spec(folder: Path, precision: str, block_size: int, dec: dict[str, Any], vocab: int, kv_dtype: str) -> PartSpec:
    """decoder.json for the fused graph: its inputs and outputs, from the builder's genai_config decoder section."""
    layers, kv_heads, head_dim, hidden = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"], dec["hidden_size"]
    return PartSpec(
        part="decoder",
        graph=GRAPH,
        precision=precision,
        opset=max(o.version for o in onnx.load(str(folder / GRAPH), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")),
        inputs=[
            TensorSpec("inputs_embeds", "float32", ["batch", "sequence", hidden]),
            TensorSpec("attention_mask", "int64", ["batch", "total_sequence"]),
            *[TensorSpec(f"past_key_values.{i}.{k}", kv_dtype, ["batch", kv_heads, "past_sequence", head_dim]) for i in range(layers) for k in ("key", "value")],
        ],
        outputs=[
            TensorSpec("logits", "float32", ["batch", 1, vocab]),
            *[TensorSpec(f"present.{i}.{k}", kv_dtype, ["batch", kv_heads, "total_sequence", head_dim]) for i in range(layers) for k in ("key", "value")],
        ],
        attributes={"layout": "gqa", "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "hidden": hidden, "vocab": vocab, "builder": "onnxruntime-genai", "kv_dtype": kv_dtype, **({"block_size": block_size} if precision != "fp32" else {})},
    )
