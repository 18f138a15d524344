"""Load a released checkpoint into the PyTorch reference model, streaming one shard at a time."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaForCausalLM

from ..checkpoint import (
    DTYPES,
    PROJECTOR_PREFIX,
    TOWER_PREFIX,
    CheckpointError,
    CheckpointInfo,
    check_keys,
    load_shard,
    read_checkpoint,
)
from ..runtime.kv import CacheShape, DenseDecoder
from ..tokenizer import load_tokenizer
from ..sizing import model_size, reference_dtype
from .config import llama_config, tower_config
from .vision import ConvNextFeatures, VisionEncoder, build_projector

log = logging.getLogger(__name__)

# transformers renamed `past_key_values` to `cache` in 5.x; use whichever this version takes
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
TOWER_UNUSED = ("layernorm.",)  # ConvNextModel's pooled norm: saved by some releases, never used
SHARD_UNUSED = tuple(TOWER_PREFIX + p for p in TOWER_UNUSED)  # the same, as named in the LLaVA shards


def _meta_shapes(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    if tensors:
        module.load_state_dict(tensors, strict=False, assign=True)


def _still_meta(module: nn.Module) -> list[str]:
    return [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]


def _choose_dtypes(info: CheckpointInfo, dtype: str, load_vision: bool, load_llm: bool, say: Callable[[str], None]) -> tuple[torch.dtype, torch.dtype]:
    """(the LLM's dtype, the tower's and projector's). "auto": the LLM in fp32 when it fits in the
    memory available, else in the checkpoint's; the tower (2.8 GB at 7B) stays fp32 then."""
    if dtype == "auto":
        dtype, why = reference_dtype(model_size(info), "auto", with_vision=load_vision) if load_llm else ("fp32", "vision only")
        say(f"reference dtype {dtype}: {why}")
        return DTYPES[dtype], torch.float32
    return DTYPES[dtype], DTYPES[dtype]


@dataclass
class _MetaModel:
    """The model's modules built on the meta device (no memory), with the names and shapes the
    weights must fill: `expected` in the LLaVA shards, `tower_expected` in the tower's own file."""

    tower: ConvNextFeatures
    projector: nn.Module
    llm: LlamaForCausalLM
    llm_cfg: Any
    expected: dict[str, tuple[int, ...]]
    tower_expected: dict[str, tuple[int, ...]]

    @classmethod
    def build(cls, info: CheckpointInfo, attn_implementation: str) -> _MetaModel:
        llm_cfg = llama_config(info.config)
        llm_cfg._attn_implementation = attn_implementation
        tcfg = tower_config(info.tower_config)
        with torch.device("meta"):
            tower = ConvNextFeatures(tcfg)
            projector = build_projector(info.projector_type, info.config["mm_hidden_size"], info.config["hidden_size"])
            llm = LlamaForCausalLM(llm_cfg)
        if tcfg.hidden_sizes[-1] != info.config["mm_hidden_size"]:
            raise CheckpointError(
                f"tower output width {tcfg.hidden_sizes[-1]} ({info.tower_path}/config.json) does not match "
                f"mm_hidden_size {info.config['mm_hidden_size']} ({info.path}/config.json)"
            )
        # What the LLaVA shards must hold: the LLM, the projector, and maybe the tower.
        expected = _meta_shapes(projector, PROJECTOR_PREFIX)
        expected.update(_meta_shapes(llm))
        if llm_cfg.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        tower_expected = _meta_shapes(tower)
        if info.tower_weights_source == "llava-shards":
            expected.update({TOWER_PREFIX + k: s for k, s in tower_expected.items()})
        return cls(tower, projector, llm, llm_cfg, expected, tower_expected)


def _split_shard(
    shard: dict[str, torch.Tensor], llm_dtype: torch.dtype, vision_dtype: torch.dtype, load_vision: bool, load_llm: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One shard's tensors → (projector, tower, LLM) state dicts, prefixes stripped, each cast to its
    part's dtype (floating point only); parts not loaded, and the tower's unused norm, are left out."""
    cast = lambda v, dt: v.to(dt) if v.is_floating_point() else v  # noqa: E731
    projector: dict[str, torch.Tensor] = {}
    tower: dict[str, torch.Tensor] = {}
    llm: dict[str, torch.Tensor] = {}
    for k, v in shard.items():
        if k.startswith(PROJECTOR_PREFIX):
            projector[k[len(PROJECTOR_PREFIX):]] = cast(v, vision_dtype)
        elif k.startswith(TOWER_PREFIX):
            if not k.startswith(SHARD_UNUSED) and load_vision:
                tower[k[len(TOWER_PREFIX):]] = cast(v, vision_dtype)
        elif load_llm:
            llm[k] = cast(v, llm_dtype)
    return projector, tower, llm


def _stream_shards(
    info: CheckpointInfo, meta: _MetaModel, llm_dtype: torch.dtype, vision_dtype: torch.dtype, load_vision: bool, load_llm: bool, say: Callable[[str], None]
) -> None:
    """Fill the meta modules from the LLaVA shards, one memory-mapped shard at a time: names are
    checked before any shard is read (from the index), shapes as each shard arrives, completeness at the end."""
    from ..progress import Meter

    expected = meta.expected
    if info.weight_map:  # check names before reading gigabytes
        names = {k: expected.get(k, ()) for k in info.weight_map}
        check_keys({k: () for k in expected}, {k: () for k in names}, str(info.path), SHARD_UNUSED)
    found: dict[str, tuple[int, ...]] = {}
    meter = Meter(f"loading {info.path.name} ({len(info.weight_files)} shards)", sum(f.stat().st_size for f in info.weight_files), "bytes", say, every=0.0)
    for f in info.weight_files:
        shard = load_shard(f, None)  # memory-mapped; each kept tensor is cast on its own below
        found.update({k: tuple(v.shape) for k, v in shard.items()})
        for k, v in shard.items():
            if k in expected and tuple(v.shape) != expected[k]:
                check_keys({k: expected[k]}, {k: tuple(v.shape)}, str(f))
        projector, tower, llm = _split_shard(shard, llm_dtype, vision_dtype, load_vision, load_llm)
        meter.advance(f.stat().st_size)
        _assign(meta.projector, projector)
        _assign(meta.tower, tower)
        if load_llm:
            _assign(meta.llm, llm)
        del shard, projector, tower, llm
    meter.done()
    check_keys(expected, found, str(info.path), SHARD_UNUSED)


def _load_tower_file(info: CheckpointInfo, meta: _MetaModel, vision_dtype: torch.dtype, say: Callable[[str], None]) -> None:
    """The tower's weights from its own folder (releases whose LLaVA shards leave it out)."""
    assert info.tower_weight_file is not None
    say(f"loading vision tower from {info.tower_weight_file}")
    tw = load_shard(info.tower_weight_file, vision_dtype)
    tw = {k: v for k, v in tw.items() if not k.startswith(TOWER_UNUSED)}
    check_keys(meta.tower_expected, {k: tuple(v.shape) for k, v in tw.items()}, str(info.tower_weight_file))
    _assign(meta.tower, tw)


def _finish(meta: _MetaModel, load_vision: bool, load_llm: bool) -> tuple[VisionEncoder | None, LlamaForCausalLM | None]:
    """(vision encoder, LLM) in eval mode, each None when not loaded; refuses a module with weights still on the meta device."""
    vision = VisionEncoder(meta.tower, meta.projector).eval() if load_vision else None
    llm = meta.llm if load_llm else None
    if llm is not None:
        llm.model.rotary_emb = type(llm.model.rotary_emb)(meta.llm_cfg)  # non-persistent buffers
        if meta.llm_cfg.tie_word_embeddings:
            llm.tie_weights()
        llm.eval()
        if _still_meta(llm):
            raise CheckpointError(f"weights never loaded for: {', '.join(_still_meta(llm)[:10])}")
    if vision is not None and _still_meta(vision):
        raise CheckpointError(f"weights never loaded for: {', '.join(_still_meta(vision)[:10])}")
    return vision, llm


def _place(device: str, vision: VisionEncoder | None, llm: LlamaForCausalLM | None, llm_dtype: torch.dtype, vision_dtype: torch.dtype) -> torch.device:
    """Move the loaded parts to `device`; on CUDA an fp32 part keeps fp32 math (TF32 off)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.float32 in (llm_dtype, vision_dtype):
        # an fp32 *reference* must be fp32: TF32 convolutions moved the conformance features by
        # 1.5e-3 on an H200 (tolerance 1e-4). This is process-wide, as torch's flags are.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if dev.type != "cpu":
        for part in (vision, llm):
            if part is not None:
                part.to(dev)
    return dev


@dataclass
class ReferenceModel:
    """ConvLLaVA in PyTorch, loaded exactly as the official code does (minus its fp16 cast)."""

    info: CheckpointInfo
    vision: VisionEncoder | None
    llm: LlamaForCausalLM | None
    tokenizer: Any
    dtype: torch.dtype  # the LLM's
    device: torch.device = torch.device("cpu")
    vision_dtype: torch.dtype | None = None  # the tower's and projector's (None: `dtype`)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        vision_tower: str | os.PathLike | None = None,
        dtype: str = "fp32",
        load_vision: bool = True,
        load_llm: bool = True,
        attn_implementation: str = "sdpa",
        progress: Callable[[str], None] | None = None,
        device: str = "cpu",
    ) -> ReferenceModel:
        """Read the checkpoint's configs, build its modules on the meta device, stream the LLaVA
        shards into them (then the tower's own file, when the shards leave it out), check that every
        weight arrived, and move the parts to `device`. `dtype`: the LLM's (see `_choose_dtypes`)."""
        info = read_checkpoint(path, vision_tower)
        say = progress or (lambda msg: None)
        torch_dtype, vision_dtype = _choose_dtypes(info, dtype, load_vision, load_llm, say)
        tokenizer = load_tokenizer(info.path)
        meta = _MetaModel.build(info, attn_implementation)
        _stream_shards(info, meta, torch_dtype, vision_dtype, load_vision, load_llm, say)
        if info.tower_weights_source == "tower-folder" and load_vision:
            _load_tower_file(info, meta, vision_dtype, say)
        vision, llm = _finish(meta, load_vision, load_llm)
        dev = _place(device, vision, llm, torch_dtype, vision_dtype)
        return cls(info=info, vision=vision, llm=llm, tokenizer=tokenizer, dtype=torch_dtype, device=dev, vision_dtype=vision_dtype)

    # -- the pieces every backend is compared against ------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor | np.ndarray) -> np.ndarray:
        """pixel_values [B,3,H,W] → image_embeds [B,N,hidden] (float32 numpy)."""
        assert self.vision is not None, "loaded without the vision part"
        x = torch.as_tensor(pixel_values).to(self.device, self.vision_dtype or self.dtype)
        return self.vision(x).float().cpu().numpy()

    @torch.inference_mode()
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        assert self.llm is not None, "loaded without the LLM"
        table = self.llm.get_input_embeddings()
        return table(torch.as_tensor(ids, dtype=torch.long, device=self.device)).float().cpu().numpy()


class TorchVision:
    """The reference vision encoder behind runtime/pipeline.py's VisionBackend protocol."""

    def __init__(self, model: ReferenceModel) -> None:
        self.model = model

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.model.encode_images(pixel_values)


class TorchDecoder(DenseDecoder):
    """The LLaMA decoder over an explicit KV cache (runtime/kv.py): each step builds a
    DynamicCache around the given arrays (no copy on CPU) and returns the new ones."""

    def __init__(self, model: ReferenceModel) -> None:
        assert model.llm is not None
        self.model = model
        self.llm = model.llm
        self.vocab_size = model.llm.config.vocab_size
        c = model.llm.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.cache_shape = CacheShape(2 * c.num_hidden_layers, c.num_key_value_heads, head_dim, np.dtype(np.float32))  # arrays handed back in fp32

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.model.embed_tokens(ids)

    @torch.inference_mode()
    def step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        from transformers import DynamicCache

        dev = getattr(self.model, "device", torch.device("cpu"))
        dtype = self.model.dtype
        if past is None:
            cache = DynamicCache(config=self.llm.config)
        else:
            t = [torch.from_numpy(a).to(dev, dtype) for a in past]
            cache = DynamicCache(ddp_cache_data=list(zip(t[0::2], t[1::2])), config=self.llm.config)
        out = self.llm(
            inputs_embeds=torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32)).to(dev, dtype),
            attention_mask=torch.from_numpy(mask).to(dev),
            position_ids=torch.from_numpy(positions).to(dev),
            **{CACHE_KWARG: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        present = tuple(x.detach().float().cpu().numpy() if x.dtype != torch.float32 or x.device.type != "cpu" else x.numpy() for layer in out.past_key_values.layers for x in (layer.keys, layer.values))
        return out.logits[:, -1].float().cpu().numpy(), present
