"""The checkpoint reader: released layouts load; each kind of bad input gets a specific error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from convllava_export.checkpoint import CheckpointError, read_checkpoint
from convllava_export.cli import cli
from convllava_export.model.reference import ReferenceModel


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def load_error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as exc:
        ReferenceModel.load(path, **kw)
    return str(exc.value)


def test_tower_resolution_relative_to_checkpoint_and_hub_name(ckpt_copy, conformance):
    info = read_checkpoint(ckpt_copy)  # "convnext-tiny-a" as a sibling folder
    assert info.tower_path == (ckpt_copy.parent / "convnext-tiny-a").resolve()
    assert info.tower_weights_source == "tower-folder"
    edit_json(ckpt_copy / "config.json", mm_vision_tower="ConvLLaVA/convnext-tiny-a")
    assert read_checkpoint(ckpt_copy).tower_path == (ckpt_copy.parent / "convnext-tiny-a").resolve()
    edit_json(ckpt_copy / "config.json", mm_vision_tower=str(conformance / "convnext-tiny-a"))
    assert read_checkpoint(ckpt_copy).tower_path == (conformance / "convnext-tiny-a").resolve()


def test_tower_override_and_not_found_lists_places(ckpt_copy, tmp_path):
    shutil.move(str(ckpt_copy.parent / "convnext-tiny-a"), str(tmp_path / "elsewhere"))
    msg = load_error(ckpt_copy)
    assert "not found" in msg and "--vision-tower" in msg and str(ckpt_copy / "convnext-tiny-a") in msg
    info = read_checkpoint(ckpt_copy, vision_tower=tmp_path / "elsewhere")
    assert info.tower_path == (tmp_path / "elsewhere").resolve()


def test_safetensors_shards_with_finetuned_tower_in_llava_shards(ckpt_copy, reference, conformance):
    """A release with .safetensors shards holding model.vision_tower.vision_tower.*: those win."""
    from safetensors.torch import save_file

    state = {}
    for f in sorted(ckpt_copy.glob("pytorch_model-*.bin")):
        state.update(torch.load(f, weights_only=True))
        f.unlink()
    (ckpt_copy / "pytorch_model.bin.index.json").unlink()
    tower = torch.load(conformance / "convnext-tiny-a" / "pytorch_model.bin", weights_only=True)
    # the "fine-tuned" tower differs from the tower folder: the stem bias is shifted
    tower = {k: v.clone() for k, v in tower.items()}
    tower["embeddings.patch_embeddings.bias"] += 0.5
    state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in tower.items()})
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(ckpt_copy / name))
        weight_map.update({k: name for k in part})
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = ReferenceModel.load(ckpt_copy)
    assert model.info.tower_weights_source == "llava-shards"
    got = model.vision.tower.embeddings.patch_embeddings.bias
    want = reference.vision.tower.embeddings.patch_embeddings.bias + 0.5
    torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=1e-2)
    # LLM weights identical to the .bin release
    torch.testing.assert_close(model.llm.lm_head.weight, reference.llm.lm_head.weight)


def test_single_file_and_dtypes(ckpt_copy, reference):
    state = {}
    for f in sorted(ckpt_copy.glob("pytorch_model-*.bin")):
        state.update(torch.load(f, weights_only=True))
        f.unlink()
    (ckpt_copy / "pytorch_model.bin.index.json").unlink()
    torch.save(state, ckpt_copy / "pytorch_model.bin")
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = ReferenceModel.load(ckpt_copy, dtype=dtype)
        assert model.llm.lm_head.weight.dtype == torch_dtype
        assert model.vision.projector[0].weight.dtype == torch_dtype
    # bf16 storage upcasts exactly to fp32
    model = ReferenceModel.load(ckpt_copy)
    torch.testing.assert_close(model.llm.lm_head.weight, reference.llm.lm_head.weight, rtol=0, atol=0)


def test_missing_folder(tmp_path):
    assert "checkpoint folder not found" in load_error(tmp_path / "nope")


def test_missing_shard(ckpt_copy):
    (ckpt_copy / "pytorch_model-00002-of-00002.bin").unlink()
    msg = load_error(ckpt_copy)
    assert "missing" in msg and "pytorch_model-00002-of-00002.bin" in msg


def test_truncated_shard(ckpt_copy):
    shard = ckpt_copy / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    msg = load_error(ckpt_copy)
    assert "corrupt or truncated" in msg and shard.name in msg


def test_garbage_shard(ckpt_copy):
    (ckpt_copy / "pytorch_model-00002-of-00002.bin").write_bytes(os.urandom(4096))
    assert "corrupt or truncated" in load_error(ckpt_copy)


def test_pickled_object_is_refused(ckpt_copy):
    """weights_only loading: a shard holding an arbitrary object is rejected, never executed."""
    shard = ckpt_copy / "pytorch_model-00002-of-00002.bin"
    torch.save({"x": np.dtype("float32")}, shard)  # a non-tensor object, legal pickle
    assert "corrupt or truncated" in load_error(ckpt_copy)


def test_missing_and_unexpected_keys(ckpt_copy):
    index = json.loads((ckpt_copy / "pytorch_model.bin.index.json").read_text())
    wm = index["weight_map"]
    wm["model.layers.7.mlp.up_proj.weight"] = wm.pop("model.layers.1.mlp.up_proj.weight")
    (ckpt_copy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    msg = load_error(ckpt_copy)
    assert "missing key(s): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected key(s): model.layers.7.mlp.up_proj.weight" in msg


def test_shape_mismatch(ckpt_copy):
    edit_json(ckpt_copy / "config.json", intermediate_size=96)
    msg = load_error(ckpt_copy)
    assert "shape mismatch" in msg and "mlp" in msg and "(96, 64)" in msg and "(128, 64)" in msg


def test_tower_shape_mismatch(ckpt_copy):
    tower = ckpt_copy.parent / "convnext-tiny-a" / "config.json"
    edit_json(tower, hidden_sizes=[8, 16, 32, 64, 96], depths=[1, 1, 2, 1, 2])
    msg = load_error(ckpt_copy)
    assert "missing key(s): encoder.stages.4.layers.1" in msg


def test_unsupported_projector(ckpt_copy):
    edit_json(ckpt_copy / "config.json", mm_projector_type="qformer")
    assert "unsupported mm_projector_type 'qformer'" in load_error(ckpt_copy)


def test_unsupported_tower_type(ckpt_copy):
    edit_json(ckpt_copy.parent / "convnext-tiny-a" / "config.json", model_type="clip_vision_model")
    assert "unsupported vision tower type 'clip_vision_model'" in load_error(ckpt_copy)


def test_not_llava(ckpt_copy):
    edit_json(ckpt_copy / "config.json", model_type="llama")
    assert "not a LLaVA checkpoint" in load_error(ckpt_copy)


def test_no_tokenizer(ckpt_copy):
    (ckpt_copy / "tokenizer.model").unlink()
    assert "no tokenizer" in load_error(ckpt_copy)


def test_cli_errors_exit_2_without_traceback(ckpt_copy):
    (ckpt_copy / "pytorch_model-00002-of-00002.bin").write_bytes(b"\0" * 100)
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", str(ckpt_copy / "missing")])
    assert res.exit_code == 2 and "checkpoint folder not found" in res.output
    res = runner.invoke(cli, ["generate", str(ckpt_copy), "--prompt", "hi"])
    assert res.exit_code == 2, res.output
    assert "corrupt or truncated" in res.output and "Traceback" not in res.output


def test_inspect(conformance):
    res = CliRunner().invoke(cli, ["inspect", str(conformance / "convllava-tiny-a"), "--vision-tower", str(conformance / "convnext-tiny-a"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["parameters"] == {"vision_tower": 176008, "projector": 10368, "llm": 210240}
    assert report["native_resolution"] == 256
    assert report["visual_tokens"]["1536x1536"] == 576 and report["visual_tokens"]["768x768"] == 144
    assert report["tower_weights_from"] == "tower-folder"
    assert report["stored_dtypes"] == {"bfloat16": 15}
