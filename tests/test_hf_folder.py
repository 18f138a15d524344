"""`export vllm`: the folder vLLM and TensorRT-LLM's PyTorch backend serve (issue 22).

What runs without vLLM: the folder's weights (names, dtype, the exact head padding), its
tokenizer and chat template against the official prompt ids, the streaming, and the refusals.
vLLM itself runs on it in `.ci/vllm` (tests/vllm_env).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from convllava_export.errors import ExportError
from convllava_export.export import hf_folder
from convllava_export.export.hf_folder import export_hf_folder, pad_heads
from convllava_export.plugins.common import FolderError, FolderSpec, image_tokens, module_name, official_prompt_ids
from convllava_export.prompt import Conversation, build_prompt

IMAGE_ID = 1000


@pytest.fixture(scope="module")
def folder(conformance, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "folder"
    export_hf_folder(conformance / "convllava-tiny-a", out, progress=lambda s: None)
    return out


def _weights(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name in sorted(set(index.values())):
        out.update(load_file(str(folder / name)))
    assert set(out) == set(index)
    return out


def test_folder_holds_every_released_weight_under_its_name_and_dtype(folder, conformance):
    """LLM and projector keys as in the LLaVA shards, the tower's prefixed as released, bf16 kept
    (attention weights excepted: padded in fp32); every name maps into the module tree."""
    from convllava_export.checkpoint import TOWER_PREFIX, load_shard

    released = {}
    for p in sorted((conformance / "convllava-tiny-a").glob("pytorch_model-*.bin")):
        released.update(load_shard(p, None))
    tower = load_shard(conformance / "convnext-tiny-a" / "pytorch_model.bin", None)
    released.update({TOWER_PREFIX + k: v for k, v in tower.items() if not k.startswith("layernorm.")})
    got = _weights(folder)
    assert set(got) == set(released)
    for k, v in got.items():
        if ".self_attn." not in k:
            assert v.dtype == released[k].dtype == torch.bfloat16 and torch.equal(v, released[k]), k
        module_name(k)  # raises on a name outside the tree
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ConvLlavaForConditionalGeneration"] and config["text_config"]["head_dim"] == 32
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(folder)  # engines take the dtype from here: the checkpoint's
    assert loaded.dtype == loaded.text_config.dtype == loaded.vision_config.dtype == torch.bfloat16


def test_padded_heads_compute_the_same_logits(folder, conformance, reference, manifest):
    """The folder's Llama (heads padded 16 -> 32, q scaled) gives the reference's logits: the rotary
    pairs land where the wider rotation has their frequency, and the zero rows add nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((folder / "config.json").read_text())["text_config"]
    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})).float().eval()
    weights = {k: v.float() for k, v in _weights(folder).items() if not k.startswith(("model.mm_projector", "model.vision_tower"))}
    missing, unexpected = llm.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = torch.tensor([[t for t in manifest["prompt"]["input_ids"] if t >= 0]])
    with torch.no_grad():
        got = llm(input_ids=ids).logits
        want = reference.llm(input_ids=ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4)


def test_pad_heads_refuses_nothing_it_cannot_do_exactly():
    w = torch.randn(6 * 12, 8)
    with pytest.raises(ExportError, match="does not divide"):
        hf_folder.padded_head_dim({"hidden_size": 72, "num_attention_heads": 6})
    assert hf_folder.padded_head_dim({"hidden_size": 4096, "num_attention_heads": 32}) == 128
    assert pad_heads("x.mlp.up_proj.weight", w, 12, 32) is w


def test_tokenizer_and_template_give_the_official_prompt_ids(folder, manifest):
    """vLLM renders the chat template and tokenizes the text with the folder's tokenizer; the
    processor then re-tokenizes. Both steps together give the official ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID
    question = manifest["prompt"]["question"]
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + question}], tokenize=False, add_generation_prompt=True)
    assert text == "<s> " + build_prompt(question)
    official = [IMAGE_ID if t == -200 else t for t in manifest["prompt"]["input_ids"]]
    engine_ids = tok(text, add_special_tokens=False).input_ids
    assert engine_ids != official  # the engine's own tokenization differs after <image> ...
    assert official_prompt_ids(tok, engine_ids, IMAGE_ID) == official  # ... and is repaired
    conv = Conversation()
    conv.add_user(question, 1)
    conv.add_assistant("It is red.")
    conv.add_user("And the shape?")
    conv.add_assistant(None)
    turns = [{"role": "user", "content": "<image>\n" + question}, {"role": "assistant", "content": "It is red."}, {"role": "user", "content": "And the shape?"}]
    assert tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True) == "<s> " + conv.render()


def test_token_counts_and_bounds(folder):
    spec = FolderSpec.from_config(json.loads((folder / "config.json").read_text()))
    assert (spec.max_image_tokens, spec.image_token_id, spec.preprocess.mode) == (16, IMAGE_ID, "pad")
    assert image_tokens(512, 192, spec.preprocess, 16) == 16
    native = spec.with_overrides({"mode": "native"})
    with pytest.raises(FolderError, match="at most 16"):
        image_tokens(512, 192, native, 16)
    with pytest.raises(FolderError, match="not one of"):
        spec.with_overrides({"mode": "crop"})


def test_export_streams_one_shard_at_a_time(conformance, tmp_path, monkeypatch):
    """Each source shard's tensors are released before the next is read: at 7B a shard is ~2 GB and
    the whole model 14 GB. Fails if the writer starts keeping shards (or all tensors) alive."""
    import weakref

    alive: list[weakref.ref] = []
    most = []
    real = hf_folder.load_shard

    def tracked(path, dtype):
        tensors = real(path, dtype)
        most.append(sum(r() is not None for r in alive))
        first = next(iter(tensors.values()))
        alive.append(weakref.ref(first))
        return tensors

    monkeypatch.setattr(hf_folder, "load_shard", tracked)
    export_hf_folder(conformance / "convllava-tiny-a", tmp_path / "out", progress=lambda s: None)
    assert len(most) == 3 and max(most) == 0


def test_bad_request_exits_2_and_keeps_the_previous_folder(conformance, tmp_path):
    out = tmp_path / "out"
    export_hf_folder(conformance / "convllava-tiny-a", out, progress=lambda s: None)
    before = (out / "config.json").read_bytes()
    cmd = [sys.executable, "-m", "convllava_export.cli", "export", "vllm", str(conformance / "convllava-tiny-a"), "-o", str(out), "--force"]
    r = subprocess.run(cmd + ["--mode", "pad", "--max-image-tokens", "4"], capture_output=True, text=True)
    assert r.returncode == 2 and "below the 16 tokens" in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert (out / "config.json").read_bytes() == before
    # --force replaces its own earlier export (known by its config), never a stranger's folder
    assert subprocess.run(cmd + ["--mode", "native"], capture_output=True).returncode == 0
    assert json.loads((out / "config.json").read_text())["convllava"]["preprocess"]["mode"] == "native"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = subprocess.run(cmd[:-3] + ["-o", str(other), "--force"], capture_output=True, text=True)
    assert r.returncode == 2 and "not a build or export" in r.stderr + r.stdout and (other / "notes.txt").read_text() == "mine"


def test_text_only_chat_tokenizes_as_the_official_code(folder, conformance):
    """A request without images never reaches the plugin's processor: vLLM's own rendering and
    tokenization must already give the official ids (single and multi-turn)."""
    from transformers import AutoTokenizer

    from convllava_export.prompt import tokenize_with_images
    from convllava_export.tokenizer import load_tokenizer

    tok, official = AutoTokenizer.from_pretrained(folder), load_tokenizer(conformance / "convllava-tiny-a")
    turns = [{"role": "user", "content": "Name three colours."}]
    for messages in (turns, turns + [{"role": "assistant", "content": "Red, green, blue."}, {"role": "user", "content": "And one more?"}]):
        conv = Conversation()
        for m in messages:
            (conv.add_user if m["role"] == "user" else conv.add_assistant)(m["content"])
        conv.add_assistant(None)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok(text, add_special_tokens=False).input_ids == tokenize_with_images(official, conv.render())
