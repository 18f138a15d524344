"""What keeps a 7B build inside 24 GB, tested at small size so CI can hold it (issue 12).

The 7B runs themselves are `benchmarks/real_size.py`; here each piece of the memory discipline
is checked in a way that fails when it regresses: the weight rewrite holds one tensor at a
time (tracemalloc), the build never holds two copies of the LLM (live references), the
estimate refuses a short machine before anything is written.
"""

from __future__ import annotations

import gc
import json
import re
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from convllava_export.cli import cli
from convllava_export.errors import BuildError, ExportError
from convllava_export.export.stream_quant import rewrite_weights
from convllava_export.progress import Meter
from convllava_export.precisions import precision
from convllava_export.sizing import ModelSize, estimate_build, reference_dtype, trace_dtype

K, N, LAYERS = 512, 1024, 8


def _chain(tmp: Path, dtype=np.float16) -> tuple[Path, list[np.ndarray]]:
    """x → (MatMul W_i → Relu) × LAYERS, weights in `dtype` with external data."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights, nodes, inits = [], [], []
    name = "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((K, N if i % 2 == 0 else K)) * 0.05).astype(dtype) if i % 2 == 0 else (rng.standard_normal((N, K)) * 0.05).astype(dtype)
        weights.append(w)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [name, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        name = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", elem, ["b", K])], [helper.make_tensor_value_info(name, elem, ["b", K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp / "chain.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="chain.onnx.data", size_threshold=0)
    return path, weights


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _reference(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    for w in weights:
        x = np.maximum(x @ w.astype(np.float32), 0)
    return x


def test_rewrite_holds_one_tensor_at_a_time(tmp_path):
    """A rewrite that loaded the whole model (as MatMulNBitsQuantizer does) would peak above
    the fp32 size of all weights; the streaming one stays near two fp32 tensors."""
    src, weights = _chain(tmp_path)
    fp32_total = sum(w.size * 4 for w in weights)
    one = max(w.size * 4 for w in weights)
    for precision in ("fp32", "int4"):
        gc.collect()
        tracemalloc.start()
        rewrite_weights(src, tmp_path / f"{precision}.onnx", precision, 32, progress=lambda m: None)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 3 * one < fp32_total / 2, f"{precision}: peak {peak / 1e6:.1f} MB vs one tensor {one / 1e6:.1f} MB, all {fp32_total / 1e6:.1f} MB"


def test_rewrite_results(tmp_path):
    src, weights = _chain(tmp_path)
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    want = _reference(x, weights)
    rewrite_weights(src, tmp_path / "fp32.onnx", "fp32", progress=lambda m: None)
    model = onnx.load(str(tmp_path / "fp32.onnx"), load_external_data=False)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    np.testing.assert_allclose(_run(tmp_path / "fp32.onnx", x), want, rtol=1e-4, atol=1e-4)
    for precision, bits, min_cos in (("int4", 4, 0.95), ("int8", 8, 0.999)):
        dest = tmp_path / f"{precision}.onnx"
        info = rewrite_weights(src, dest, precision, 32, progress=lambda m: None)
        model = onnx.load(str(dest), load_external_data=False)
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert info["quantized_matmuls"] == LAYERS == len(nbits)
        assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {bits}
        got = _run(dest, x)
        cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert min_cos < cos < 0.99999, f"{precision}: cosine {cos:.5f} to the fp32 result"  # close, and really quantized
        assert (tmp_path / f"{precision}.onnx.data").stat().st_size < sum(w.size for w in weights) * 2 * bits / 16 * 1.3
    assert not list(tmp_path.glob("*.partial"))


def test_rewrite_matches_onnxruntime_quantizer(tmp_path):
    """Same block-wise symmetric scheme as MatMulNBitsQuantizer: identical outputs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src, _ = _chain(tmp_path, np.float32)
    rewrite_weights(src, tmp_path / "ours.onnx", "int4", 32, progress=lambda m: None)
    quant = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True, accuracy_level=4)
    quant.process()
    onnx.save(quant.model.model, str(tmp_path / "ort.onnx"))
    x = np.random.default_rng(2).standard_normal((2, K)).astype(np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "ours.onnx", x), _run(tmp_path / "ort.onnx", x))


def test_rewrite_refuses_truncated_data_and_leaves_nothing(tmp_path):
    src, _ = _chain(tmp_path)
    data = tmp_path / "chain.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ExportError, match="truncated"):
        rewrite_weights(src, tmp_path / "out.onnx", "int4", progress=lambda m: None)
    assert not (tmp_path / "out.onnx").exists() and not list(tmp_path.glob("out.onnx*"))


def test_fp16_traced_decoder_rewritten_to_fp32_matches_fp32_trace(tmp_path):
    """The 7B path: trace in the checkpoint's fp16/bf16, rewrite to fp32 activations."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from convllava_export.export.llm import export_llm_onnxruntime

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    llm = LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    ref = export_llm_onnxruntime(llm.float(), tmp_path / "fp32", "fp32", progress=lambda m: None)
    spec = export_llm_onnxruntime(llm.to(torch.bfloat16), tmp_path / "bf16", "fp32", progress=lambda m: None)
    assert spec.attributes["traced_dtype"] == "bfloat16" and ref.precision == spec.precision == "fp32"
    feeds = {"inputs_embeds": np.random.default_rng(0).standard_normal((1, 5, 128)).astype(np.float32), "attention_mask": np.ones((1, 5), np.int64), "position_ids": np.arange(5)[None]}
    feeds.update({f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 32), np.float32) for i in range(2) for k in ("key", "value")})
    a = _run_feeds(tmp_path / "fp32" / "decoder.onnx", feeds)
    b = _run_feeds(tmp_path / "bf16" / "decoder.onnx", feeds)
    np.testing.assert_allclose(a, b, atol=2e-3)
    assert np.load(tmp_path / "bf16" / "embed_tokens.npy").dtype == np.float32  # bf16 → fp32 table holds it exactly


def _run_feeds(path: Path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]


def test_build_holds_one_llm_at_a_time(tiny_checkpoint, tmp_path, monkeypatch):
    """Each phase frees what it loaded: when a model is loaded, no earlier LLM is alive
    (the old build kept the fp32 reference through export and smoke test)."""
    from convllava_export.build import BuildOptions, build
    from convllava_export.model import reference as ref_mod

    alive: list[weakref.ref] = []
    loads: list[tuple[str, bool, bool]] = []
    original = ref_mod.ReferenceModel.load.__func__

    def tracked(cls, *args, **kw):
        gc.collect()
        still = [r() for r in alive if r() is not None]
        assert not still, f"{len(still)} LLM copies still alive when loading another model ({loads})"
        model = original(cls, *args, **kw)
        loads.append((kw.get("dtype", "fp32"), model.vision is not None, model.llm is not None))
        if model.llm is not None:
            alive.append(weakref.ref(model.llm))
        return model

    monkeypatch.setattr(ref_mod.ReferenceModel, "load", classmethod(tracked))
    manifest = build(tiny_checkpoint, tmp_path / "b", BuildOptions(target="cpu", llm_precision="int4", llm_graph="dynamo"), progress=lambda m: None)
    assert [(v, l_) for _, v, l_ in loads] == [(True, False), (False, True), (False, True)]  # vision; LLM to trace; LLM reference
    names = [s["name"] for s in manifest.stages]
    assert names[0].startswith("vision export") and names[1].startswith("LLM export") and len(names) == 4
    assert all(s["seconds"] >= 0 and (s["peak_rss_gb"] is None or s["peak_rss_gb"] > 0) for s in manifest.stages)
    assert manifest.estimate["memory_gb"] > 0 and manifest.checks["reference_dtype"] == "fp32"
    assert manifest.checks["token_agreement"] >= 0.9 and manifest.checks["gates"]["passed"]


def _fake_7b(tmp_path: Path) -> Path:
    """The released 7B configs with a weight index whose only real tensor is a 2x2 embedding
    (its dtype is what sizing reads): enough to estimate, nothing to load."""
    from convllava_export.tiny import TOWER_DIR, ModelShape, _write_tokenizer, llava_config, preprocessor_config, tower_config

    shape = ModelShape.preset("vicuna-7b")
    tower, llava = tmp_path / TOWER_DIR, tmp_path / "llava"
    tower.mkdir()
    llava.mkdir()
    (tower / "config.json").write_text(json.dumps(tower_config(shape)))
    (tower / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(shape)))
    torch.save({}, tower / "pytorch_model.bin")
    (llava / "config.json").write_text(json.dumps(llava_config(shape, TOWER_DIR)))
    _write_tokenizer(llava)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2, dtype=torch.bfloat16)}, llava / "pytorch_model-00001-of-00001.bin")
    index = {"weight_map": {"model.embed_tokens.weight": "pytorch_model-00001-of-00001.bin"}}
    (llava / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return llava


def test_7b_estimate(tmp_path):
    from convllava_export.checkpoint import read_checkpoint
    from convllava_export.sizing import model_size

    size = model_size(read_checkpoint(_fake_7b(tmp_path)))
    assert 6.6e9 < size.llm_params < 6.8e9 and 0.6e9 < size.vision_params < 0.75e9 and size.weights_dtype == torch.bfloat16
    budget = int(24e9)
    v8, q4, f32 = precision("vision", "onnxruntime", "int8"), precision("llm", "onnxruntime", "int4"), precision("llm", "onnxruntime", "fp32")
    est = estimate_build(size, v8, q4, "gqa", 32, "auto", True, budget)
    assert est.reference_dtype == "bf16" and est.memory <= 1.1 * size.llm_bytes + size.vision_fp32_bytes
    assert est.memory < budget
    fp32 = estimate_build(size, v8, f32, "dynamo", 32, "auto", True, budget)
    assert fp32.memory > budget and max(fp32.phases, key=fp32.phases.get) == "smoke test"
    assert trace_dtype(size, q4, budget) == "bf16" and trace_dtype(size, q4, int(64e9)) == "fp32"


def test_build_refuses_a_short_machine_before_writing(tmp_path, monkeypatch):
    llava = _fake_7b(tmp_path)
    dest = tmp_path / "out"
    import convllava_export.sizing as sizing

    monkeypatch.setattr(sizing, "free_disk", lambda path: 10**15)  # the memory refusal, whatever this disk holds
    monkeypatch.setenv("CONVLLAVA_EXPORT_MEMORY_GB", "24")
    res = CliRunner().invoke(cli, ["build", str(llava), "-o", str(dest), "--llm-precision", "fp32", "--llm-graph", "dynamo"])
    assert res.exit_code == 2, res.output
    avail = re.search(r"([\d.]+) GB is available", res.output)
    assert "needs about" in res.output and avail and float(avail.group(1)) <= 24.0 and "--llm-precision int4" in res.output
    monkeypatch.setenv("CONVLLAVA_EXPORT_MEMORY_GB", "8")
    res = CliRunner().invoke(cli, ["build", str(llava), "-o", str(dest), "--llm-precision", "int4"])
    assert res.exit_code == 2 and "LLM export" in res.output and "in its stored dtype" in res.output
    assert not dest.exists() and not list(tmp_path.glob(".out*"))


def test_reference_dtype_follows_memory():
    size = ModelSize(llm_params=1_000_000_000, vision_params=100_000_000, vocab=32000, hidden=2048, weights_dtype=torch.bfloat16)
    assert reference_dtype(size, "auto", budget=int(10e9))[0] == "fp32"
    dtype, why = reference_dtype(size, "auto", budget=int(4e9))
    assert dtype == "bf16" and "fp32 would need" in why
    assert reference_dtype(size, "fp16", budget=int(1e9))[0] == "fp16"
    with pytest.raises(BuildError, match="unknown reference dtype"):
        reference_dtype(size, "fp64")


def test_meter_reports_eta():
    lines: list[str] = []
    meter = Meter("quantizing", 100, "params", lines.append, every=0.0)
    meter.advance(25)
    assert lines and "25/100 params (25%)" in lines[-1] and "ETA" in lines[-1] and "?" not in lines[-1]
    meter.done()
    assert "done in" in lines[-1]


def test_auto_graph_choice(monkeypatch):
    from convllava_export.export import llm_gqa
    from convllava_export.export.llm import choose_graph

    monkeypatch.setattr(llm_gqa, "genai_available", lambda: True)
    assert choose_graph("auto", "int4")[0] == "gqa" and choose_graph("auto", "fp32")[0] == "dynamo"
    assert choose_graph("dynamo", "int4") == ("dynamo", "--llm-graph dynamo")
    monkeypatch.setattr(llm_gqa, "genai_available", lambda: False)
    graph, why = choose_graph("auto", "int8")
    assert graph == "dynamo" and "onnxruntime-genai not installed" in why


def test_real_size_trtllm_hf_step_is_opt_in_and_summarized():
    from convllava_export.benchmarks.real_size import DEFAULT_STEPS, STEP_NAMES, STEPS, summarize

    assert set(STEPS) == {"machine", *STEP_NAMES} and "trtllm_hf" not in DEFAULT_STEPS
    s = summarize({"checkpoint_gb": 14.87, "trtllm_hf": {"seconds": 900.0, "peak_rss_gb": 15.0, "tree_peak_rss_gb": 15.2}})
    assert s["trtllm_hf_peak_rss_gb"] == 15.2 and s["trtllm_hf_peak_vs_checkpoint"] == round(15.2 / 14.87, 3)
