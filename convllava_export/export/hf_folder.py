"""`export vllm`: a released checkpoint as one Hugging Face-style folder that vLLM (with our plugin)
and TensorRT-LLM's PyTorch backend (with our custom module) serve as it is.

The weights keep their released names and dtype, tower included, re-sharded to safetensors one
source shard at a time (peak memory: one shard, mapped). The config names the plugin's
architecture and carries the preprocessing; the tokenizer gains `<image>` as a special token
at the first id past the tokenizer's (Vicuna: 32000, past the vocabulary; vLLM masks it out of the
text embedding); the chat template is
vicuna_v1. Written whole or not at all.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    PROJECTOR_PREFIX,
    TOWER_PREFIX,
    CheckpointInfo,
    load_shard,
    read_checkpoint,
    weights_dtype,
)
from ..errors import ExportError
from ..fsutil import atomic_output_dir, check_destination
from ..model.config import llama_config
from ..plugins.common import ARCHITECTURE, DEFAULT_MAX_IMAGES, SECTION, FolderSpec
from ..preprocess import DEFAULT_MAX_TOKENS, MODES, STRIDE, PreprocessConfig
from ..progress import Meter
from ..prompt import IMAGE_TOKEN, SYSTEM_V1
from ..tokenizer import load_tokenizer

Progress = Callable[[str], None]
UNUSED = ("layernorm.",)  # ConvNextModel's pooled norm: never used by ConvLLaVA
MIN_HEAD_DIM = 32  # vLLM-CPU's attention kernels take head sizes 32..512 (7B: 128)

# vicuna_v1 as prompt.Conversation renders it. "<s> A chat": after a special token the tokenizer
# starts the next word without SentencePiece's marker unless a space is written, and the official
# tokenization (BOS added to "A chat…") has the marker. A system message replaces the fixed text.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = " + json.dumps(SYSTEM_V1) + " -%}"
    "{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token + ' ' + system + ' ' -}}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + m['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def folder_spec(info: CheckpointInfo, mode: str | None, max_image_tokens: int | None, max_images: int, resolution: int | None = None) -> FolderSpec:
    """The preprocessing the folder serves with: the checkpoint's resolution and mode (pad unless
    asked), native images bounded to `max_image_tokens` (scaled down to fit, as our runtime does)."""
    mode = mode or ("native" if info.image_aspect_ratio == "native" else "pad")
    if mode not in MODES:
        raise ExportError(f"--mode {mode} is not one of {', '.join(MODES)}")
    res = resolution or info.native_resolution
    if res % STRIDE or res <= 0:
        raise ExportError(f"resolution {res} (--resolution, or {info.tower_path}/preprocessor_config.json) is not a positive multiple of {STRIDE}")
    square = (res // STRIDE) ** 2
    bound = max_image_tokens or (square if mode == "pad" else DEFAULT_MAX_TOKENS)
    if mode == "pad" and bound < square:
        raise ExportError(f"--max-image-tokens {bound} is below the {square} tokens every padded {res}x{res} image makes")
    if max_images < 1:
        raise ExportError(f"--max-images must be at least 1, got {max_images}")
    pre = PreprocessConfig.from_preprocessor_config(info.preprocessor_config, resolution=res, mode=mode, max_tokens=bound if mode == "native" else None)
    return FolderSpec(pre, image_token_id=len(load_tokenizer(info.path)), max_images=max_images, max_image_tokens=bound,
                      projector=info.projector_type)


def hf_config(info: CheckpointInfo, spec: FolderSpec) -> dict[str, Any]:
    """config.json: a `llava`-type config (text and vision parts as transformers reads them) naming
    the plugin's architecture, with the `convllava` section."""
    text = llama_config(info.config).to_dict()
    text.update(model_type="llama", architectures=["LlamaForCausalLM"], head_dim=padded_head_dim(text))
    vision = {k: v for k, v in info.tower_config.items() if k not in ("architectures", "_name_or_path", "transformers_version")}
    vision["model_type"] = "convnext"
    dtype = str(weights_dtype(info)).removeprefix("torch.")  # float32 | float16 | bfloat16
    # `dtype` everywhere (transformers 5 reads it; engines pick it from the root or the text part):
    # without it vLLM took the text config's default fp32 and "downcast" it to fp16 on CPU
    for part in (text, vision):
        part["dtype"] = part["torch_dtype"] = dtype
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llava",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": spec.image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "dtype": dtype,
        "torch_dtype": dtype,
        SECTION: spec.to_dict(),
    }


METASPACE = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
STRIP_MARKER = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
# text as prompts hold it (sentencepiece and transformers differ on leading runs of spaces, by design)
PROBES = ("A chat between a curious user", "What is shown in this image? ASSISTANT:", "digits 12345 and ünïcode\nnew line")


def _fix_sentencepiece_json(path: Path) -> None:
    """transformers < 5.20 (what vLLM 0.32 pins) converts a sentencepiece Llama tokenizer without
    its Metaspace pre-tokenizer, so the first word loses its marker ("A" instead of "▁A"); 5.25
    writes it. Put it (and the matching decoder strip) in whichever wrote the file."""
    data = json.loads(path.read_text())
    if data.get("pre_tokenizer") is None:
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [METASPACE]}
        decoder = data.get("decoder") or {"type": "Sequence", "decoders": []}
        if decoder.get("type") == "Sequence" and STRIP_MARKER not in decoder["decoders"]:
            decoder["decoders"].append(STRIP_MARKER)
        data["decoder"] = decoder
        path.write_text(json.dumps(data, ensure_ascii=False))


def _check_tokenizer(info: CheckpointInfo, dest: Path) -> None:
    """The folder's tokenizer must encode text as the checkpoint's sentencepiece model does."""
    model = info.path / "tokenizer.model"
    if not model.is_file():
        return
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tok = AutoTokenizer.from_pretrained(str(dest))
    for text in PROBES:
        want, got = sp.encode(text), tok(text, add_special_tokens=False).input_ids
        if want != got:
            raise ExportError(f"the folder's tokenizer encodes {text!r} as {got[:8]}…, the checkpoint's sentencepiece model as {want[:8]}…: "
                              "this transformers converts the tokenizer differently; export with transformers >= 5.25")


def _tokenizer(info: CheckpointInfo, dest: Path, image_token_id: int) -> None:
    """The checkpoint's tokenizer plus `<image>` as a special token at `image_token_id`, as a
    tokenizer.json checked against the checkpoint's sentencepiece model."""
    from tokenizers import AddedToken

    tok = load_tokenizer(info.path)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(IMAGE_TOKEN, special=True, normalized=False)]})
    got = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if got != image_token_id:  # e.g. the tokenizer already had an <image> token
        raise ExportError(f"the tokenizer in {info.path} gives <image> the id {got}, not the next free one ({image_token_id}): remove its <image> token")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(dest))
    if (dest / "tokenizer.json").is_file():
        _fix_sentencepiece_json(dest / "tokenizer.json")
    _check_tokenizer(info, dest)
    if (info.path / "generation_config.json").is_file():
        shutil.copyfile(info.path / "generation_config.json", dest / "generation_config.json")


def model_head_dim(text: dict[str, Any]) -> int:
    return int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])


def padded_head_dim(text: dict[str, Any]) -> int:
    """The head size the folder is written with: the model's, or MIN_HEAD_DIM for smaller heads."""
    d = model_head_dim(text)
    if d >= MIN_HEAD_DIM:
        return d
    if MIN_HEAD_DIM % d:
        raise ExportError(f"head size {d} is below vLLM's smallest ({MIN_HEAD_DIM}) and does not divide it: cannot pad exactly")
    return MIN_HEAD_DIM


def pad_heads(key: str, w: torch.Tensor, d: int, big: int) -> torch.Tensor:
    """An attention weight with each head widened from d to `big` dims, computing the same function.

    q/k: rotary pair (j, j+d/2) has frequency theta^(-2j/d); in `big` dims that is pair
    (j*big/d, j*big/d + big/2), so the rows move there and the rest are zero (rotating zeros gives
    zeros, and zeros add nothing to q·k). q is scaled by sqrt(big/d) to undo the kernel's
    1/sqrt(big). v fills the first d dims of each head and o reads only those.
    """
    k = big // d
    if key.endswith(("q_proj.weight", "k_proj.weight")):
        heads = w.shape[0] // d
        src = w.float().view(heads, d, -1)
        out = torch.zeros(heads, big, w.shape[1])
        half = d // 2
        out[:, 0:big // 2:k] = src[:, :half]
        out[:, big // 2::k] = src[:, half:]
        if key.endswith("q_proj.weight"):
            out *= math.sqrt(big / d)
        return out.reshape(heads * big, -1)
    if key.endswith("v_proj.weight"):
        heads = w.shape[0] // d
        out = torch.zeros(heads, big, w.shape[1])
        out[:, :d] = w.float().view(heads, d, -1)
        return out.reshape(heads * big, -1)
    if key.endswith("o_proj.weight"):
        heads = w.shape[1] // d
        out = torch.zeros(w.shape[0], heads, big)
        out[:, :, :d] = w.float().view(w.shape[0], heads, d)
        return out.reshape(w.shape[0], heads * big)
    return w


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (torch.save keeps views): copy the repeats."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.contiguous() if ptr not in seen else v.clone()
        seen.add(ptr)
    return out


def _sources(info: CheckpointInfo) -> list[tuple[Path, str]]:
    """(file, key prefix to add): the LLaVA shards, then the tower's own file when it holds the tower."""
    out = [(p, "") for p in info.weight_files]
    if info.tower_weights_source == "tower-folder" and info.tower_weight_file is not None:
        out.append((info.tower_weight_file, TOWER_PREFIX))
    return out


def write_weights(info: CheckpointInfo, dest: Path, progress: Progress, head_dim: tuple[int, int] | None = None) -> dict[str, str]:
    """Each source file into one safetensors shard (names as released, dtype kept); the index.
    `head_dim` (model's, written): heads below vLLM-CPU's smallest are padded (fp32, exact)."""
    from safetensors.torch import save_file

    sources = _sources(info)
    total = sum(p.stat().st_size for p, _ in sources)
    meter = Meter("weights", total / 1e9, "GB", progress)
    weight_map: dict[str, str] = {}
    for i, (path, prefix) in enumerate(sources, 1):
        name = f"model-{i:05d}-of-{len(sources):05d}.safetensors"
        tensors = {prefix + k: v for k, v in load_shard(path, None).items()}
        unused = tuple(TOWER_PREFIX + u for u in UNUSED)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(unused)}
        if head_dim and head_dim[0] != head_dim[1]:
            tensors = {k: pad_heads(k, v, *head_dim) if ".self_attn." in k else v for k, v in tensors.items()}
        save_file(_unshared(tensors), str(dest / name), metadata={"format": "pt"})
        weight_map.update((k, name) for k in tensors)
        del tensors
        meter.advance(path.stat().st_size / 1e9)
    meter.done()
    if not any(k.startswith(PROJECTOR_PREFIX) for k in weight_map) or not any(k.startswith(TOWER_PREFIX) for k in weight_map):
        raise ExportError(f"{info.path} holds no projector or no vision tower weights: not a ConvLLaVA checkpoint")
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return weight_map


def export_hf_folder(
    checkpoint: Path, output: Path, vision_tower: Path | None = None, mode: str | None = None,
    max_image_tokens: int | None = None, max_images: int = DEFAULT_MAX_IMAGES, force: bool = False, progress: Progress = print,
    resolution: int | None = None,
) -> FolderSpec:
    info = read_checkpoint(checkpoint, vision_tower)
    spec = folder_spec(info, mode, max_image_tokens, max_images, resolution)
    check_destination(output, force)
    config = hf_config(info, spec)
    heads = (model_head_dim(llama_config(info.config).to_dict()), config["text_config"]["head_dim"])
    if heads[0] != heads[1]:
        progress(f"attention heads padded from {heads[0]} to {heads[1]} dims (exact; vLLM-CPU's smallest head size)")
    with atomic_output_dir(output, force) as tmp:
        write_weights(info, tmp, progress, heads)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _tokenizer(info, tmp, spec.image_token_id)
        (tmp / "preprocessor_config.json").write_text(json.dumps(info.preprocessor_config, indent=2))
    progress(f"wrote {output} ({spec.preprocess.mode}, {spec.preprocess.resolution}px, <= {spec.max_image_tokens} tokens per image)")
    return spec
