"""LLM export: ORT decoder parity, quantized variants' agreement, TensorRT-LLM checkpoint."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from convllava_export.cli import cli
from convllava_export.engines.onnxruntime import OrtDecoder
from convllava_export.engines.tensorrt_llm import TrtLlmBuildConfig, check_precision, check_runs_here, trtllm_build_command
from convllava_export.errors import BuildError, ExportError
from convllava_export.export.llm import export_llm_onnxruntime
from convllava_export.export.spec import PartSpec
from convllava_export.model.reference import TorchDecoder
from convllava_export.runtime.scheduler import generate
from convllava_export.runtime.sampling import SamplingParams
from convllava_export.validation.metrics import first_divergence, logits_agreement, teacher_forced_logits

from conftest import needs


def test_greedy_parity_on_conformance(conformance_decoder, reference, conformance, manifest):
    dec = OrtDecoder(conformance_decoder)
    for name, entry in manifest["images"].items():
        g = np.load(conformance / "golden" / entry["npz"])
        seq = g["inputs_embeds"][0]
        res = generate(dec, reference.tokenizer, [seq], SamplingParams(max_new_tokens=64))[0]
        assert res.token_ids == g["gen_ids_until_eos"].tolist()
        assert res.text == entry["gen_text_until_eos"]
        logits = teacher_forced_logits(dec, seq, g["gen_ids_16"].tolist())
        np.testing.assert_allclose(logits, g["gen_step_logits_16"], atol=1e-4, rtol=1e-4)


def test_decoder_io_and_embeddings(conformance_decoder, reference):
    spec = PartSpec.load(conformance_decoder / "decoder.json")
    assert [t.name for t in spec.inputs[:3]] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert spec.inputs[3].name == "past_key_values.0.key" and spec.outputs[1].name == "present.0.key"
    assert spec.attributes["vocab"] == 1000 and spec.attributes["layers"] == 2
    table = np.load(conformance_decoder / "embed_tokens.npy")
    np.testing.assert_array_equal(table, reference.llm.get_input_embeddings().weight.detach().numpy())
    model = onnx.load(str(conformance_decoder / "decoder.onnx"))
    dims = [d.dim_param for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2] == "past_sequence"


def test_batch_with_padding_matches_single(conformance_decoder, reference, conformance, manifest):
    dec = OrtDecoder(conformance_decoder)
    seqs = [np.load(conformance / "golden" / e["npz"])["inputs_embeds"][0] for e in manifest["images"].values()]
    seqs[1] = seqs[1][5:]  # different lengths → left padding
    batch = generate(dec, reference.tokenizer, seqs, SamplingParams(max_new_tokens=20))
    for seq, got in zip(seqs, batch):
        assert got.token_ids == generate(dec, reference.tokenizer, [seq], SamplingParams(max_new_tokens=20))[0].token_ids


def agreement_report(reference, cand, seqs, label: str) -> float:
    """Teacher-forced top-1 agreement with the torch reference (printed with the first free-running divergence)."""
    ref_dec = TorchDecoder(reference)
    agreements, divergences = [], []
    for seq in seqs:
        want = generate(ref_dec, reference.tokenizer, [seq], SamplingParams(max_new_tokens=24))[0]
        got = generate(cand, reference.tokenizer, [seq], SamplingParams(max_new_tokens=24))[0]
        stats = logits_agreement(teacher_forced_logits(ref_dec, seq, want.token_ids), teacher_forced_logits(cand, seq, want.token_ids))
        agreements.append(stats["top1_agreement"])
        divergences.append(first_divergence(want.token_ids, got.token_ids))
    print(f"{label}: teacher-forced top-1 agreement {np.mean(agreements):.3f}, first divergence {divergences}")
    return float(np.mean(agreements))


@pytest.mark.parametrize("precision, op", [("int8", "MatMulNBits"), ("int4", "MatMulNBits"), ("fp16", None)])
def test_quantized_variants_report_agreement(tiny_reference, tmp_path, precision, op):
    from convllava_export.calibration.images import synthetic_pixels
    from convllava_export.calibration.prompts import multimodal_sequences
    from convllava_export.preprocess import PreprocessConfig

    folder = tmp_path / precision
    export_llm_onnxruntime(tiny_reference.llm, folder, precision, block_size=32, progress=lambda m: None)
    if op:
        model = onnx.load(str(folder / "decoder.onnx"))
        assert any(n.op_type == op for n in model.graph.node), f"no {op} in the {precision} graph"
    seqs = multimodal_sequences(tiny_reference, synthetic_pixels(PreprocessConfig(resolution=256), n=6, seed=9), ["What is shown in this image?"])
    assert agreement_report(tiny_reference, OrtDecoder(folder), seqs, precision) >= 0.95


def test_ort_cli_errors(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["export", "llm", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--precision", "int4-awq"])
    assert res.exit_code == 2 and "'int4-awq' is not available for onnxruntime (use fp32, fp16, int8, int4); int4-awq is made by the tensorrt-llm backend" in res.output
    res = runner.invoke(cli, ["export", "llm", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--backend", "tensorrt-llm", "--precision", "fp8"])
    assert res.exit_code == 2 and "calibrated on multimodal prompts: pass --calib-images" in res.output
    (tmp_path / "exists").mkdir()
    res = runner.invoke(cli, ["export", "llm", str(tiny_checkpoint), "-o", str(tmp_path / "exists")])
    assert res.exit_code == 2 and "already exists" in res.output
    assert not (tmp_path / "x").exists()


def test_trtllm_build_plan():
    cfg = TrtLlmBuildConfig(max_batch_size=8, max_input_len=2048, max_seq_len=2560, max_visual_tokens=576, max_images_per_prompt=2)
    cmd = trtllm_build_command("ck", "eng", cfg)
    assert cmd[cmd.index("--max_prompt_embedding_table_size") + 1] == str(8 * 576 * 2)
    assert cmd[cmd.index("--max_input_len") + 1] == "2048" and cmd[cmd.index("--max_seq_len") + 1] == "2560"
    with pytest.raises(ExportError, match="no room for text"):
        trtllm_build_command("ck", "eng", TrtLlmBuildConfig(max_input_len=576))
    with pytest.raises(ExportError, match="sm_89 or newer.*sm_87"):
        check_runs_here("fp8", (8, 7))
    check_runs_here("fp8", (9, 0))
    with pytest.raises(BuildError, match="llm precision 'int4' is not available for tensorrt-llm .*made by the onnxruntime backend"):
        check_precision("int4")


@needs("modelopt", "quant")
@pytest.mark.parametrize("precision, algo, block", [("int8-sq", "W8A8_SQ_PER_CHANNEL", 128), ("int4-awq", "W4A16_AWQ", 32)])
def test_modelopt_trtllm_checkpoint(tiny_checkpoint, tmp_path, precision, algo, block):
    from safetensors.numpy import load_file

    dest = tmp_path / "trtllm"
    res = CliRunner().invoke(cli, ["export", "llm", str(tiny_checkpoint), "-o", str(dest), "--backend", "tensorrt-llm", "--precision", precision, "--calib-images", "builtin", "--calib-limit", "8", "--awq-block-size", str(block)])
    assert res.exit_code == 0, res.output
    config = json.loads((dest / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == algo and config["architecture"] == "LlamaForCausalLM"
    assert config["vocab_size"] >= 1000 and config["num_hidden_layers"] == 2
    meta = json.loads((dest / "convllava_trtllm.json").read_text())
    assert meta["prompt_table_base"] == config["vocab_size"]  # fake ids start past the padded vocab
    assert meta["calibration"]["sequences"] == 8 and meta["calibration"]["tokens"] > 8 * 16  # visual rows included
    weights = load_file(str(dest / "rank0.safetensors"))
    qkv = [k for k in weights if k.startswith("transformer.layers.0.attention.qkv.weight")]
    assert qkv, sorted(weights)[:10]
    assert weights["transformer.layers.0.attention.qkv.weight"].dtype.itemsize == 1  # int8, or int4 packed in bytes
    assert any("scal" in k for k in weights)
    assert "--max_prompt_embedding_table_size 64" in res.output


# -- the fused GroupQueryAttention layout (onnxruntime-genai's model builder) --------------------

needs_genai = needs("onnxruntime_genai", "genai")


@needs_genai
def test_gqa_graph_greedy_parity_on_conformance(conformance_gqa, reference, conformance, manifest):
    from convllava_export.engines.onnxruntime import OrtGqaDecoder, open_decoder

    dec = open_decoder(conformance_gqa)
    assert isinstance(dec, OrtGqaDecoder)
    model = onnx.load(str(conformance_gqa / "decoder.onnx"), load_external_data=False)
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == 2
    assert {i.name for i in model.graph.input} >= {"attention_mask", "inputs_embeds", "past_key_values.1.value"}
    for name, entry in manifest["images"].items():
        g = np.load(conformance / "golden" / entry["npz"])
        seq = g["inputs_embeds"][0]
        res = generate(dec, reference.tokenizer, [seq], SamplingParams(max_new_tokens=64))[0]
        assert res.token_ids == g["gen_ids_until_eos"].tolist(), name
        logits = teacher_forced_logits(dec, seq, g["gen_ids_16"].tolist())
        np.testing.assert_allclose(logits, g["gen_step_logits_16"], atol=1e-4, rtol=1e-4)


@needs_genai
def test_gqa_graph_padded_batch_matches_single(conformance_gqa, reference, conformance, manifest):
    from convllava_export.engines.onnxruntime import open_decoder

    dec = open_decoder(conformance_gqa)
    seqs = [np.load(conformance / "golden" / e["npz"])["inputs_embeds"][0] for e in manifest["images"].values()]
    seqs[1] = seqs[1][5:]
    batch = generate(dec, reference.tokenizer, seqs, SamplingParams(max_new_tokens=20))
    ref = TorchDecoder(reference)
    for seq, got in zip(seqs, batch):
        assert got.token_ids == generate(ref, reference.tokenizer, [seq], SamplingParams(max_new_tokens=20))[0].token_ids


@needs_genai
def test_gqa_int4_reports_agreement(tiny_reference, tmp_path):
    from convllava_export.calibration.images import synthetic_pixels
    from convllava_export.calibration.prompts import multimodal_sequences
    from convllava_export.engines.onnxruntime import open_decoder
    from convllava_export.preprocess import PreprocessConfig

    folder = tmp_path / "gqa-int4"
    spec = export_llm_onnxruntime(tiny_reference.llm, folder, "int4", block_size=32, progress=lambda m: None, graph="gqa")
    assert spec.attributes["layout"] == "gqa" and spec.precision == "int4"
    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node) and any(n.name == "/lm_head/last_position" for n in model.graph.node)
    seqs = multimodal_sequences(tiny_reference, synthetic_pixels(PreprocessConfig(resolution=256), n=6, seed=9), ["What is shown in this image?"])
    assert agreement_report(tiny_reference, open_decoder(folder), seqs, "gqa int4") >= 0.95


def test_gqa_graph_refuses_what_it_cannot_build(tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(cli, ["export", "llm", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--graph", "gqa", "--precision", "fp16"])
    assert res.exit_code == 2 and "with graph 'gqa' (use fp32, int8, int4); fp16 is made by graph dynamo" in res.output and not (tmp_path / "x").exists()
