"""Write small ConvLLaVA checkpoints in the released on-disk layout.

`write_tiny_checkpoint` trains a tiny model (about 30 s of CPU, deterministic for a seed) on
the synthetic colour/orientation task, so the demo and validation have a model whose answers
can be checked. `write_random_checkpoint` writes any size with random weights, one shard at a
time, for benchmarks (a full ConvNeXt† tower, a TinyLlama- or Vicuna-7B-shaped LLM).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

TOWER_DIR = "ConvLLaVA-ConvNeXt-tiny"
LLAVA_DIR = "ConvLLaVA-tiny-sft"


@dataclass
class ModelShape:
    """Sizes of every part; the defaults are the tiny demo model."""

    tower_depths: list[int] = field(default_factory=lambda: [1, 1, 2, 1, 1])
    tower_hidden: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 96])
    resolution: int = 256
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 1000

    @classmethod
    def preset(cls, name: str) -> ModelShape:
        presets = {
            "tiny": cls(),
            # trainable on CPU in minutes: the validation sample report's model
            "mid": cls([1, 1, 3, 1, 1], [32, 64, 128, 256, 512], 512, 256, 688, 4, 8, 8, 1000),
            # mid-size: a real ConvNeXt-style tower at 768, a small LLaMA
            "small": cls([2, 2, 6, 2, 2], [48, 96, 192, 384, 768], 768, 512, 1376, 6, 8, 8, 32000),
            "convnext-dagger": cls([3, 3, 27, 3, 6], [192, 384, 768, 1536, 3072], 1536, 4096, 11008, 32, 32, 32, 32000),
            "tinyllama": cls([3, 3, 27, 3, 6], [192, 384, 768, 1536, 3072], 1536, 2048, 5632, 22, 32, 4, 32000),
            "vicuna-7b": cls([3, 3, 27, 3, 6], [192, 384, 768, 1536, 3072], 1536, 4096, 11008, 32, 32, 32, 32000),
        }
        if name not in presets:
            raise ValueError(f"unknown model shape '{name}' (known: {', '.join(presets)})")
        return presets[name]


def tower_config(shape: ModelShape) -> dict:
    return {
        "architectures": ["ConvNextModel"],
        "model_type": "convnext",
        "num_channels": 3,
        "num_stages": len(shape.tower_depths),
        "depths": shape.tower_depths,
        "hidden_sizes": shape.tower_hidden,
        "patch_size": 4,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "layer_scale_init_value": 1e-6,
        "drop_path_rate": 0.0,
        "image_size": shape.resolution,
        "torch_dtype": "bfloat16",
    }


def preprocessor_config(shape: ModelShape) -> dict:
    return {
        "crop_size": {"height": shape.resolution, "width": shape.resolution},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": shape.resolution},
    }


def llava_config(shape: ModelShape, tower_name: str) -> dict:
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": shape.vocab,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": shape.tower_hidden[-1],
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -1,
        "mm_vision_tower": f"ConvLLaVA/{tower_name}",
        "mm_patch_merge_type": "flat",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 2048,
    "padding_side": "right",
    "tokenizer_class": "LlamaTokenizer",
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
}


def _write_tokenizer(dest: Path) -> None:
    """The bundled sentencepiece model (vocab 1000, trained on generated English)."""
    src = resources.files("convllava_export") / "data" / "tiny_tokenizer.model"
    (dest / "tokenizer.model").write_bytes(src.read_bytes())
    (dest / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    tok = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special = {k: {**tok, "content": v} for k, v in [("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "<unk>")]}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _init_tower(tower: nn.Module, gen: torch.Generator) -> None:
    """Unit-gain convolutions and layer scale near 1, so every block changes the features."""
    for name, p in tower.named_parameters():
        with torch.no_grad():
            if p.ndim == 4:  # conv
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif name.endswith("layer_scale_parameter"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
            elif name.endswith("weight"):  # every LayerNorm, downsampling ones included
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def _save_sharded(state: dict[str, torch.Tensor], dest: Path, shards: int, dtype: torch.dtype) -> None:
    keys = sorted(state)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].to(dtype).contiguous() for k in keys[i * per : (i + 1) * per]}
        torch.save(part, dest / name)
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def _write_layout(
    dest: Path, shape: ModelShape, tower_state: dict, llava_state: dict, shards: int, dtype: torch.dtype
) -> Path:
    """dest/ConvLLaVA-tiny-sft (LLaVA folder) + dest/ConvLLaVA-ConvNeXt-tiny (tower folder)."""
    tower_dir, llava_dir = dest / TOWER_DIR, dest / LLAVA_DIR
    tower_dir.mkdir(parents=True, exist_ok=True)
    llava_dir.mkdir(parents=True, exist_ok=True)
    (tower_dir / "config.json").write_text(json.dumps(tower_config(shape), indent=2))
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(shape), indent=2))
    torch.save({k: v.to(dtype).contiguous() for k, v in tower_state.items()}, tower_dir / "pytorch_model.bin")
    (llava_dir / "config.json").write_text(json.dumps(llava_config(shape, TOWER_DIR), indent=2))
    gen_cfg = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096}
    (llava_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    _save_sharded(llava_state, llava_dir, shards, dtype)
    _write_tokenizer(llava_dir)
    return llava_dir


def write_tiny_checkpoint(
    dest: str | Path,
    seed: int = 0,
    train_steps: int = 600,
    num_images: int = 384,
    progress: Callable[[str], None] | None = None,
    shape: ModelShape | None = None,
) -> Path:
    """Train and write the tiny demo model (or another small `shape`); returns the LLaVA folder.

    The tower is random and frozen (at bf16 values, what is stored); the projector and the LLM
    learn to answer colour/shape questions about synthetic images (synthetic.py)."""
    from transformers import ConvNextConfig, LlamaConfig, LlamaForCausalLM

    from .model.config import llama_config
    from .model.vision import ConvNextFeatures, build_projector

    say = progress or (lambda m: None)
    dest = Path(dest)
    shape = shape or ModelShape()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tower = ConvNextFeatures(ConvNextConfig(**tower_config(shape))).eval()
    _init_tower(tower, gen)
    # bf16 is what we store; train against exactly what the checkpoint will hold
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    projector = build_projector("mlp2x_gelu", shape.tower_hidden[-1], shape.hidden)
    lcfg: LlamaConfig = llama_config(llava_config(shape, TOWER_DIR))
    llm = LlamaForCausalLM(lcfg)
    data = _training_data(dest, shape, tower, projector, num_images, seed, say)
    _train(projector, llm, data, train_steps, gen, say)
    llava_state = {f"model.mm_projector.{k}": v.detach() for k, v in projector.state_dict().items()}
    llava_state.update({k: v.detach() for k, v in llm.state_dict().items()})
    return _write_layout(dest, shape, tower.state_dict(), llava_state, shards=2, dtype=torch.bfloat16)


@dataclass
class _TrainingData:
    feats: torch.Tensor  # the frozen tower's features of every image [N, tokens, width]
    prompt_ids: list[int]  # the one question's prompt, with the image placeholder (-200)
    answers: list[list[int]]  # each image's answer ids, ending with EOS


def _training_data(dest: Path, shape: ModelShape, tower: nn.Module, projector: nn.Module, num_images: int, seed: int, say: Callable[[str], None]) -> _TrainingData:
    """Synthetic images through the frozen tower, once; the prompt and answers tokenized with
    the tokenizer the checkpoint ships (written to a scratch folder under `dest` to load it)."""
    from .model.vision import VisionEncoder
    from .preprocess import PreprocessConfig, load_image, preprocess
    from .prompt import build_prompt, tokenize_with_images
    from .synthetic import colour_samples
    from .tokenizer import load_tokenizer

    tmp_tok = dest / ".tokenizer"
    tmp_tok.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(tmp_tok)
    tokenizer = load_tokenizer(tmp_tok)
    shutil.rmtree(tmp_tok)
    pcfg = PreprocessConfig(resolution=shape.resolution)
    samples = colour_samples(num_images, seed=seed)
    say(f"encoding {num_images} synthetic images with the frozen tower")
    with torch.no_grad():
        pixels = torch.from_numpy(np.stack([preprocess(load_image(s.image), pcfg) for s in samples]))
        feats = VisionEncoder(tower, projector).features(pixels)
    prompt_ids = tokenize_with_images(tokenizer, build_prompt(samples[0].question))
    answers = [tokenizer(s.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for s in samples]
    return _TrainingData(feats, prompt_ids, answers)


def _train(projector: nn.Module, llm: nn.Module, data: _TrainingData, train_steps: int, gen: torch.Generator, say: Callable[[str], None]) -> None:
    """AdamW with a one-cycle schedule on the projector and the LLM, batches of 16 images drawn
    in a shuffled order (reshuffled when it runs out); the loss is on the answer tokens only."""
    num_images = len(data.answers)
    params = list(projector.parameters()) + list(llm.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(1, train_steps), pct_start=0.1)
    batch = 16
    order = torch.randperm(num_images, generator=gen)
    llm.train()
    for step in range(train_steps):
        idx = order[(step * batch) % num_images : (step * batch) % num_images + batch]
        if len(idx) < batch:
            order = torch.randperm(num_images, generator=gen)
            idx = order[:batch]
        x, mask, y = _batch(projector(data.feats[idx]), llm.get_input_embeddings(), data.prompt_ids, [data.answers[k] for k in idx.tolist()])
        loss = llm(inputs_embeds=x, attention_mask=mask, labels=y).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == train_steps - 1:
            say(f"training step {step + 1}/{train_steps}: loss {loss.item():.4f}")
    llm.eval()


def _batch(img_embeds: torch.Tensor, embed: nn.Module, prompt_ids: list[int], answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs_embeds, attention_mask, labels), right-padded: each prompt with its image's rows
    spliced in at the placeholder, then its answer; labels -100 everywhere but the answer."""
    seqs, labels = [], []
    for j, answer in enumerate(answers):
        ans = torch.tensor(answer)
        pre = torch.tensor(prompt_ids)
        cut = prompt_ids.index(-200)
        seq = torch.cat([embed(pre[:cut]), img_embeds[j], embed(pre[cut + 1 :]), embed(ans)])
        lab = torch.cat([torch.full((len(seq) - len(ans),), -100), ans])
        seqs.append(seq)
        labels.append(lab)
    length = max(len(s) for s in seqs)
    x = torch.stack([nn.functional.pad(s, (0, 0, 0, length - len(s))) for s in seqs])
    y = torch.stack([nn.functional.pad(lab, (0, length - len(lab)), value=-100) for lab in labels])
    mask = (torch.arange(length)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    return x, mask, y


def write_random_checkpoint(
    dest: str | Path, shape: ModelShape, seed: int = 0, dtype: torch.dtype = torch.float16, shards: int | None = None
) -> Path:
    """Random weights of any shape in the released layout, built and saved one layer at a time."""
    from transformers import ConvNextConfig

    from .model.vision import ConvNextFeatures

    dest = Path(dest)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        tower = ConvNextFeatures(ConvNextConfig(**tower_config(shape)))
    tower_state = {k: torch.randn(v.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype) for k, v in tower.state_dict().items()}
    tower_dir, llava_dir = dest / TOWER_DIR, dest / LLAVA_DIR
    tower_dir.mkdir(parents=True, exist_ok=True)
    llava_dir.mkdir(parents=True, exist_ok=True)
    (tower_dir / "config.json").write_text(json.dumps(tower_config(shape), indent=2))
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(shape), indent=2))
    torch.save(tower_state, tower_dir / "pytorch_model.bin")
    del tower_state
    (llava_dir / "config.json").write_text(json.dumps(llava_config(shape, TOWER_DIR), indent=2))
    _write_tokenizer(llava_dir)
    _save_random_shards(_llava_key_groups(shape), llava_dir, shards, dtype, gen)
    return llava_dir


def _llava_key_groups(shape: ModelShape) -> list[dict[str, tuple[int, ...]]]:
    """The LLaVA shards' keys and shapes in groups that stay together: the embedding table, each
    decoder layer, then the final norm, the LM head and the projector."""
    h, inter, kv = shape.hidden, shape.intermediate, shape.hidden // shape.heads * shape.kv_heads

    def layer_keys(i: int) -> dict[str, tuple[int, ...]]:
        return {
            f"model.layers.{i}.self_attn.q_proj.weight": (h, h),
            f"model.layers.{i}.self_attn.k_proj.weight": (kv, h),
            f"model.layers.{i}.self_attn.v_proj.weight": (kv, h),
            f"model.layers.{i}.self_attn.o_proj.weight": (h, h),
            f"model.layers.{i}.mlp.gate_proj.weight": (inter, h),
            f"model.layers.{i}.mlp.up_proj.weight": (inter, h),
            f"model.layers.{i}.mlp.down_proj.weight": (h, inter),
            f"model.layers.{i}.input_layernorm.weight": (h,),
            f"model.layers.{i}.post_attention_layernorm.weight": (h,),
        }

    return [
        {"model.embed_tokens.weight": (shape.vocab, h)},
        *[layer_keys(i) for i in range(shape.layers)],
        {
            "model.norm.weight": (h,),
            "lm_head.weight": (shape.vocab, h),
            "model.mm_projector.0.weight": (h, shape.tower_hidden[-1]),
            "model.mm_projector.0.bias": (h,),
            "model.mm_projector.2.weight": (h, h),
            "model.mm_projector.2.bias": (h,),
        },
    ]


def _save_random_shards(groups: list[dict[str, tuple[int, ...]]], dest: Path, shards: int | None, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Norm weights 1, the rest N(0, 0.02²), drawn and saved one shard at a time (at most 8 by
    default), with the weight index; only one shard is ever in memory."""

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(s, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)

    shards = shards or min(len(groups), 8)
    per = -(-len(groups) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part: dict[str, torch.Tensor] = {}
        for g in groups[s * per : (s + 1) * per]:
            for k, shp in g.items():
                part[k] = torch.ones(shp, dtype=dtype) if k.endswith("norm.weight") else rnd(*shp)
        torch.save(part, dest / name)
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
