"""TensorRT-LLM chained by the runtime (issue 15 items 4 and 5), as far as a CPU allows.

Nothing here runs TensorRT-LLM (it needs a GPU): the version gates, precision and format rules,
the build command, ModelOpt's unified checkpoint of the tiny model, the batch prompt-table
layout, output slicing, the Generator contract's token handling, the backend registry and the
shared options validator are all our code, exercised for real.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from convllava_export.cli import cli
from convllava_export.engines import registry
from convllava_export.engines.tensorrt_llm import (
    TrtLlmBuildConfig,
    batch_table_inputs,
    check_precision,
    check_runs_here,
    check_trtllm_version,
    gpu_note,
    engine_dtype,
    generated_tokens,
    new_token_budget,
    plan_batches,
    trtllm_build_command,
)
from convllava_export.errors import BuildError, ConvLlavaError, ExportError
from convllava_export.export.parts import BUILDERS
from convllava_export.precisions import BACKENDS, LLM_RUNTIMES, VISION_RUNTIMES
from convllava_export.prompt import IMAGE_TOKEN_INDEX
from convllava_export.runtime.generation import TablePrompt, Timings, stream_generated
from convllava_export.runtime.scheduler import generate
from convllava_export.runtime.sampling import SamplingParams
from convllava_export.validation.metrics import teacher_forced_logits

from conftest import needs

needs_modelopt = needs("modelopt", "quant")


@pytest.mark.parametrize("version", ["0.12.0", "0.12.0.dev2024073000", "1.0.0", "1.2.0rc6", "1.2.1"])
def test_engine_flow_versions_accepted(version):
    check_trtllm_version(version, "tensorrt")


@pytest.mark.parametrize("version", ["1.3.0rc1", "1.3.0", "1.4.0rc0", "2.0.0"])
def test_versions_without_the_engine_flow_name_the_pytorch_route(version):
    with pytest.raises(BuildError) as exc:
        check_trtllm_version(version, "tensorrt")
    msg = str(exc.value)
    assert "removed after 1.3.0rc20" in msg and "0.12 (v0.12.0-jetson) to 1.2.x" in msg
    assert "--format hf" in msg and "trtllm-serve" in msg


def test_old_and_jetson_versions():
    with pytest.raises(BuildError, match="older than this backend supports"):
        check_trtllm_version("0.11.0", "tensorrt")
    check_trtllm_version("0.12.0", "orin")
    with pytest.raises(BuildError, match="v0.12.0-jetson"):
        check_trtllm_version("1.1.0", "orin")
    with pytest.raises(BuildError, match="TensorRT Edge-LLM"):
        check_trtllm_version("1.2.0", "thor")
    with pytest.raises(BuildError, match="cannot read the TensorRT-LLM version"):
        check_trtllm_version("nightly", "tensorrt")


def test_precisions_per_route_and_gpu():
    check_precision("int8-sq", "engine")
    check_precision("int4-awq", "hf")
    with pytest.raises(BuildError, match=r"not available for tensorrt-llm with format 'engine'.*made by format hf"):
        check_precision("nvfp4", "engine")
    with pytest.raises(BuildError, match=r"not available for tensorrt-llm with format 'hf'.*made by format engine"):
        check_precision("int8-sq", "hf")
    with pytest.raises(ExportError, match="sm_100 or newer.*sm_90"):
        check_runs_here("nvfp4", (9, 0))
    with pytest.raises(ExportError, match="sm_89 or newer.*no GPU"):
        check_runs_here("w4a8-awq", None)
    check_runs_here("nvfp4", (11, 0))  # Jetson Thor
    check_runs_here("int4-awq", (8, 7))  # Orin
    assert gpu_note("fp8", None) and gpu_note("int8-sq", None) is None


def test_build_command_gathers_context_logits():
    cmd = trtllm_build_command("ck", "eng", TrtLlmBuildConfig(max_batch_size=2, max_visual_tokens=144))
    assert "--gather_context_logits" in cmd and cmd[cmd.index("--max_prompt_embedding_table_size") + 1] == "288"
    assert "--gather_context_logits" not in trtllm_build_command("ck", "eng", TrtLlmBuildConfig(gather_context_logits=False))


def test_engine_dtype_read_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_config": {"dtype": "bfloat16"}, "build_config": {}}))
    assert engine_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"build_config": {}}))
    with pytest.raises(BuildError, match="names no dtype"):
        engine_dtype(tmp_path)


def test_generated_tokens_are_exactly_the_new_ones():
    end = 2
    out = np.full((2, 1, 12), end, dtype=np.int32)  # end-id padding after each sequence
    out[0, 0, :7] = [5, 6, 7, 8, 100, 101, 102]  # prompt of 4, 3 generated
    out[1, 0, :6] = [9, 9, 9, 9, 9, 200]  # prompt of 5, 1 generated
    lengths = np.array([[7], [6]])
    assert generated_tokens(out, lengths, [4, 5]) == [[100, 101, 102], [200]]


def test_batch_prompt_table_counts_rows_across_the_batch():
    a, b = np.ones((3, 4), np.float32), np.full((2, 4), 2, np.float32)
    c = np.full((1, 4), 3, np.float32)
    prompts = [TablePrompt([1, IMAGE_TOKEN_INDEX, 7], [a]), TablePrompt([1, IMAGE_TOKEN_INDEX, 8, IMAGE_TOKEN_INDEX], [b, c]), TablePrompt([1, 9])]
    ids, table = batch_table_inputs(prompts, 1000)
    assert ids == [[1, 1000, 1001, 1002, 7], [1, 1003, 1004, 8, 1005], [1, 9]]
    assert table.shape == (6, 4) and np.array_equal(table[[0, 3, 5], 0], [1, 2, 3])
    assert batch_table_inputs([TablePrompt([1, 2])], 1000) == ([[1, 2]], None)


class ScriptedTokens:
    """A token source for the Generator contract with fixed outputs (not an engine: it checks
    how our loop turns per-step tokens into events, stop strings and finish reasons)."""

    vocab_size = 32000
    runs_own_loop = True

    def __init__(self, steps, logits=None):
        self.steps, self.logits, self.closed = steps, logits, False
        self.seen = None

    def stream(self, prompts, params, end_id):
        self.seen = (list(prompts), params, end_id)
        try:
            yield from self.steps
        finally:
            self.closed = True

    def context_logits(self, prompt):
        self.seen = prompt
        return self.logits


def test_stream_generated_eos_length_and_stop(tiny_reference):
    tok = tiny_reference.tokenizer
    eos = tok.eos_token_id
    words = tok.encode("red blue green", add_special_tokens=False)
    # sequence 0 ends at the end id (TrtLlmGenerator passes it on); sequence 1 runs to max_new_tokens;
    # sequence 2 is cut short by the engine's max_seq_len
    gen = ScriptedTokens([[[words[0]], [words[0]], [words[0]]], [[words[1]], [words[1]], [words[1]]], [[eos], [words[2]], []]])
    timings = [Timings(), Timings(), Timings()]
    res = generate(gen, tok, [TablePrompt([1])] * 3, SamplingParams(max_new_tokens=3), timings)
    assert gen.seen[2] == eos
    assert res[0].token_ids == words[:2] + [eos] and res[0].finish_reason == "stop" and res[0].text.strip() == "red blue"
    assert res[1].token_ids == words[:3] and res[1].finish_reason == "length" and res[1].text.strip() == "red blue green"
    assert res[2].token_ids == words[:2] and res[2].finish_reason == "length"
    assert timings[1].decode_tokens == 2 and gen.closed
    # a stop string ends the sequence and the loop stops reading the engine
    gen = ScriptedTokens([[[w]] for w in words] + [[[words[0]]]] * 50)
    events = list(stream_generated(gen, tok, [TablePrompt([1])], SamplingParams(max_new_tokens=100, stop=("blue",))))
    assert events[-1].finish_reason == "stop" and "".join(e.text for e in events).strip() == "red" and gen.closed


def test_engine_batches_and_token_budget():
    assert plan_batches([576, 576, 0, 576, 1152], max_batch=2, max_rows=1152) == [[0, 1], [2, 3], [4]]
    assert plan_batches([10] * 5, max_batch=4, max_rows=100) == [[0, 1, 2, 3], [4]]
    with pytest.raises(ConvLlavaError, match="1153 image rows and the engine's prompt table holds 1152"):
        plan_batches([1153], 4, 1152)
    assert new_token_budget([100, 2000], 1024, 2048, 3072) == 1024
    assert new_token_budget([2040], 1024, 2048, 2560) == 520
    with pytest.raises(ConvLlavaError, match="2049 tokens .* at most 2048"):
        new_token_budget([2049], 16, 2048, 3072)


def test_teacher_forced_rows_from_context_logits():
    rows = np.arange(7 * 3, dtype=np.float64).reshape(7, 3)  # prompt of 4 expanded positions + 3 answer tokens
    gen = ScriptedTokens([], logits=rows)
    prompt = TablePrompt([1, IMAGE_TOKEN_INDEX, 5], [np.zeros((2, 4), np.float32)])
    got = teacher_forced_logits(gen, prompt, [10, 11, 12, 13])
    assert gen.seen.ids == [1, IMAGE_TOKEN_INDEX, 5, 10, 11, 12] and np.array_equal(got, rows[-4:])


def test_one_list_each():
    """Every (part, backend) of the table has a builder and a loader, and nothing else does."""
    assert set(registry.VISION) == set(VISION_RUNTIMES) and set(registry.LLM) == set(LLM_RUNTIMES)
    assert set(BUILDERS) == {(b.part, b.backend) for b in BACKENDS}
    assert {(b.part, b.backend) for b in BACKENDS} <= {("vision", n) for n in registry.VISION} | {("llm", n) for n in registry.LLM}


def test_registry_opens_what_the_manifest_names(tiny_build):
    from convllava_export.manifest import read_manifest
    from convllava_export.runtime.build_loader import load_context

    manifest = read_manifest(tiny_build)
    ctx = load_context(tiny_build, manifest)
    with pytest.raises(BuildError, match="unknown llm backend 'vllm'"):
        registry.open_backend("llm", ctx, "vllm")
    vision, info = registry.open_backend("vision", ctx)
    torch_vision, torch_info = registry.open_backend("vision", ctx, "torch")
    assert info.startswith("onnxruntime fp32") and torch_info.startswith("torch")
    px = np.random.default_rng(0).standard_normal((1, 3, 128, 128)).astype(np.float32)
    a, b = vision.encode(px), torch_vision.encode(px)
    cos = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos > 0.9999


def test_build_refuses_tensorrt_llm_where_it_cannot_run(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    dest = tmp_path / "b"
    res = runner.invoke(cli, ["build", str(tiny_checkpoint), "-o", str(dest), "--target", "cpu", "--llm-backend", "tensorrt-llm", "--llm-precision", "int4-awq"])
    assert res.exit_code == 2 and "runs on an NVIDIA GPU" in res.output and not dest.exists()
    res = runner.invoke(cli, ["build", str(tiny_checkpoint), "-o", str(dest), "--llm-precision", "int4-awq"])
    assert res.exit_code == 2 and "int4-awq is made by the tensorrt-llm backend" in res.output and not dest.exists()
    res = runner.invoke(cli, ["build", str(tiny_checkpoint), "-o", str(dest), "--target", "tensorrt", "--llm-backend", "tensorrt-llm", "--llm-precision", "nvfp4"])
    assert res.exit_code == 2 and "with format 'engine'" in res.output and "nvfp4 is made by format hf" in res.output and not dest.exists()
    if importlib.util.find_spec("tensorrt") is None:
        res = runner.invoke(cli, ["build", str(tiny_checkpoint), "-o", str(dest), "--target", "tensorrt", "--llm-backend", "tensorrt-llm", "--llm-precision", "int4-awq"])
        assert res.exit_code == 2 and "needs TensorRT" in res.output and not dest.exists()


@needs_modelopt
def test_unified_hf_checkpoint_int4_awq(tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file

    dest = tmp_path / "hf"
    args = ["export", "llm", str(tiny_checkpoint), "-o", str(dest), "--backend", "tensorrt-llm", "--format", "hf", "--precision", "int4-awq", "--calib-images", "builtin", "--calib-limit", "8", "--awq-block-size", "32"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    quant = json.loads((dest / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "W4A16_AWQ" and quant["group_size"] == 32 and quant["pre_quant_scale"]
    config = json.loads((dest / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt" and config["architectures"] == ["LlamaForCausalLM"]
    assert (dest / "tokenizer.model").is_file() or (dest / "tokenizer.json").is_file()
    meta = json.loads((dest / "convllava_trtllm.json").read_text())
    assert meta["format"] == "hf" and meta["calibration"]["sequences"] == 8
    weights = {}
    for f in dest.glob("*.safetensors"):
        weights.update(load_file(str(f)))
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype.itemsize == 1 and q.size * 2 == config["hidden_size"] ** 2  # int4 packed two per byte
    assert "model.layers.0.self_attn.o_proj.pre_quant_scale" in weights  # (q/k/v's are folded into the layer norm)
    assert weights["lm_head.weight"].dtype == np.float16 and weights["model.embed_tokens.weight"].dtype == np.float16


@needs_modelopt
@pytest.mark.parametrize("precision, algo, weight_dtype, packed", [
    ("fp8", "FP8", "float8_e4m3fn", 1),
    ("nvfp4", "NVFP4", "uint8", 2),
    ("w4a8-awq", "W4A8_AWQ", "uint8", 2),
])
def test_gpu_formats_are_written_without_a_gpu(tiny_checkpoint, tmp_path, precision, algo, weight_dtype, packed):
    """A checkpoint for another machine: ModelOpt calibrates and packs these on the CPU; the
    CLI says which GPUs run them and writes the checkpoint."""
    import torch
    from safetensors import safe_open

    dest = tmp_path / "hf"
    res = CliRunner().invoke(cli, ["export", "llm", str(tiny_checkpoint), "-o", str(dest), "--backend", "tensorrt-llm", "--format", "hf",
                                   "--precision", precision, "--calib-images", "builtin", "--calib-limit", "8", "--awq-block-size", "32"])
    assert res.exit_code == 0, res.output
    if not torch.cuda.is_available():
        assert "runs on GPUs of sm_" in res.output
    assert json.loads((dest / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == algo
    hidden = json.loads((dest / "config.json").read_text())["hidden_size"]
    with safe_open(str(next(dest.glob("*.safetensors"))), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert str(w.dtype) == f"torch.{weight_dtype}" and w.numel() * packed == hidden * hidden
        assert "model.layers.0.self_attn.q_proj.input_scale" in f.keys()  # activations quantized too


def test_a_tensorrt_llm_build_without_tensorrt_llm_names_the_extra(tiny_build, tmp_path):
    """A build whose manifest names the tensorrt-llm LLM, opened where TensorRT-LLM is absent."""
    import shutil

    from convllava_export.runtime.build_loader import load_pipeline

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("TensorRT-LLM is installed: the refusal path is not reachable")
    copy = tmp_path / "b"
    shutil.copytree(tiny_build, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["llm"] = {**manifest["llm"], "backend": "tensorrt-llm", "precision": "int4-awq"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConvLlavaError, match=r"convllava-export\[trtllm\]"):
        load_pipeline(copy, verify=False)


def test_a_cpu_export_that_would_not_fit_is_refused_before_loading(tiny_checkpoint, tmp_path, monkeypatch):
    """sizing.trtllm_export_memory against the memory available (rehearsed smaller here)."""
    monkeypatch.setenv("CONVLLAVA_EXPORT_MEMORY_GB", "0.05")
    dest = tmp_path / "hf"
    res = CliRunner().invoke(cli, ["export", "llm", str(tiny_checkpoint), "-o", str(dest), "--backend", "tensorrt-llm", "--format", "hf",
                                   "--precision", "int4-awq", "--calib-images", "builtin"])
    assert res.exit_code == 2 and "this export needs about" in res.output and "0.1 GB is available" in res.output and not dest.exists()
