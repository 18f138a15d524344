"""`build` folders, the chained runtime, and the run / chat / inspect commands."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from convllava_export.build import BuildOptions, build
from convllava_export.cli import cli
from convllava_export.errors import BuildError, ConvLlavaError
from convllava_export.runtime.build_loader import load_pipeline
from convllava_export.runtime.pipeline import Pipeline, Request
from convllava_export.synthetic import colour_samples


def test_manifest_is_self_describing(tiny_build):
    m = json.loads((tiny_build / "manifest.json").read_text())
    assert m["schema_version"] == 2 and m["target"] == "cpu" and m["prompt_template"] == "vicuna_v1"
    assert m["vision"]["precision"] == "fp32" and m["llm"]["precision"] == "fp32"
    assert len(m["source"]["fingerprint"]) == 64 and "onnxruntime" in m["libraries"] and "torch" in m["libraries"]
    assert m["vision"]["profile"]["max_hw"] == [2048, 2048] and m["token_budget"]["max_visual_tokens_per_image"] == 16
    for rel in ("vision/vision.onnx", "vision/vision.ort.onnx", "llm/decoder.onnx", "llm/embed_tokens.npy", "tokenizer/tokenizer.model", "preprocessor_config.json"):
        assert rel in m["files"] and len(m["files"][rel]["sha256"]) == 64
    assert m["checks"]["greedy_exact_match"] and m["checks"]["vision_cosine"] > 0.99999


def test_build_matches_reference(tiny_pipeline, tiny_reference):
    ref = Pipeline.from_reference(tiny_reference)
    for s in colour_samples(6, seed=42):
        got = tiny_pipeline.generate(s.image, s.question, max_new_tokens=24)
        assert got.token_ids == ref.generate(s.image, s.question, max_new_tokens=24).token_ids
        assert got.text == s.answer
        t = got.timings
        assert t.preprocess_s > 0 and t.vision_s > 0 and t.prefill_s > 0 and t.decode_tokens_per_s > 0


def test_batch_and_multi_image(tiny_pipeline):
    s = colour_samples(3, seed=5)
    reqs = [Request(s[0].question, [s[0].image]), Request("Look closely. " + s[1].question, [s[1].image]), Request(s[2].question, [s[2].image, s[0].image])]
    batch = tiny_pipeline.generate_batch(reqs, max_new_tokens=24)
    for req, got in zip(reqs, batch):
        assert got.token_ids == tiny_pipeline.generate_batch([req], max_new_tokens=24)[0].token_ids
    assert batch[0].text == s[0].answer


def test_tampered_build_refused(tiny_build, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_build, copy)
    emb = copy / "llm" / "embed_tokens.npy"
    data = bytearray(emb.read_bytes())
    data[-1] ^= 0xFF
    emb.write_bytes(bytes(data))
    with pytest.raises(BuildError, match="embed_tokens.npy has a different checksum"):
        load_pipeline(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BuildError, match="not a build folder"):
        load_pipeline(copy)


def test_tensorrt_vision_needs_tensorrt(tiny_build):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT installed: the refusal path is not reachable")
    with pytest.raises(ConvLlavaError, match="convllava-export\\[gpu\\]"):
        load_pipeline(tiny_build, vision_backend="tensorrt")


def test_existing_build_replaced_only_with_force_and_only_when_complete(tiny_checkpoint, tiny_build, tmp_path, monkeypatch):
    import shutil

    dest = tmp_path / "out"
    shutil.copytree(tiny_build, dest)
    previous = (dest / "manifest.json").read_text()
    with pytest.raises(BuildError, match="--force"):
        build(tiny_checkpoint, dest, BuildOptions(), progress=lambda m: None)
    import convllava_export.export.llm as llm_mod

    def broken(*a, **k):
        raise RuntimeError("disk full while exporting the LLM")

    monkeypatch.setattr(llm_mod, "export_llm_onnxruntime", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build(tiny_checkpoint, dest, BuildOptions(force=True), progress=lambda m: None)
    assert (dest / "manifest.json").read_text() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_killed_build_leaves_nothing(tiny_checkpoint, tmp_path):
    dest = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "convllava_export.cli", "build", str(tiny_checkpoint), "-o", str(dest)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    for line in proc.stdout:  # kill it mid-export, once the temporary folder exists
        lines.append(line)
        if "exporting vision graph" in line:
            time.sleep(1.0)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    assert not dest.exists()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.tmp-")]
    assert stale, "the build had started writing"
    # the next build sweeps the dead build's temporary folder
    build(tiny_checkpoint, dest, BuildOptions(smoke_test=False), progress=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]


def test_build_cli_errors(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["build", str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--vision-precision", "int8"])
    assert res.exit_code == 2 and "--calib-images" in res.output
    res = runner.invoke(cli, ["build", str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--target", "cpu", "--vision-precision", "fp8"])
    assert res.exit_code == 2 and "fp8" in res.output
    res = runner.invoke(cli, ["build", str(tmp_path / "nope"), "-o", str(tmp_path / "b")])
    assert res.exit_code == 2 and "checkpoint folder not found" in res.output
    assert not (tmp_path / "b").exists()


def test_run_chat_inspect_cli(tiny_build, tmp_path):
    s = colour_samples(2, seed=77)
    img0, img1 = tmp_path / "a.png", tmp_path / "b.jpg"
    s[0].image.save(img0)
    s[1].image.save(img1)
    runner = CliRunner()
    res = runner.invoke(cli, ["run", str(tiny_build), "--image", str(img0), "--prompt", s[0].question, "--max-new-tokens", "24"])
    assert res.exit_code == 0, res.output
    assert s[0].answer in res.output and "TTFT" in res.output
    # each part on the torch reference instead (the registry's torch backends): the same answer
    res = runner.invoke(cli, ["run", str(tiny_build), "--image", str(img0), "--prompt", s[0].question, "--max-new-tokens", "24", "--vision-backend", "torch", "--llm-backend", "torch"])
    assert res.exit_code == 0, res.output
    assert s[0].answer in res.output and "vision: torch fp32 (the source checkpoint); LLM: torch" in res.output
    script = f"/image {img1}\n{s[1].question}\nThanks. {s[1].question}\n/image /nonexistent.png\n/quit\n"
    res = runner.invoke(cli, ["chat", str(tiny_build), "--max-new-tokens", "24"], input=script)
    assert res.exit_code == 0, res.output
    assert s[1].answer in res.output and "image not found" in res.output
    res = runner.invoke(cli, ["inspect", str(tiny_build), "--json"])
    assert res.exit_code == 0
    info = json.loads(res.output)
    assert info["target"] == "cpu" and info["vision"] == "onnxruntime fp32" and info["files"] >= 8
    res = runner.invoke(cli, ["run", str(tmp_path), "--prompt", "hi"])
    assert res.exit_code == 2 and "not a build folder" in res.output
