"""What the TensorRT-LLM custom module (`plugins/trtllm/`) does, with no TensorRT-LLM imported.

The classes TensorRT-LLM calls (`plugins/trtllm/model.py`) are thin: every decision they make is
a function here, tested on CPU (tests/test_trtllm_plugin.py):
- the version gate (`check_version`): TensorRT-LLM 1.2.x and 1.3.x, the PyTorch-backend APIs the
  module is written against;
- the weight split (`split_weights`): released names -> tower / projector / the LLM's Hugging
  Face Llama names (what TensorRT-LLM's own Llama loader reads);
- a request (`process_request`): our preprocessing, (H/64)·(W/64) placeholders per image, the
  official prompt ids; `embeddings_request` for precomputed image embeddings;
- pixels packed into two plain tensors (`pack_pixels`), since native images differ in size;
- the serve command (`serve_command`): `trtllm-serve FOLDER --custom_module_dirs DIR`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..preprocess import STRIDE, PreprocessConfig, preprocess
from .common import (
    FolderError,
    FolderSpec,
    check_embeds,
    image_tokens,
    module_name,
    official_prompt_ids,
)

MODULE_DIR = Path(__file__).resolve().parent / "trtllm"  # the package trtllm-serve imports (--custom_module_dirs)
MODEL_TYPE = "llava"  # config.json's model_type: TensorRT-LLM keys the placeholder metadata by it
SUPPORTED = ((1, 2), (1, 3))  # TensorRT-LLM minors whose PyTorch-backend APIs the module is written against
ANY_VERSION_ENV = "CONVLLAVA_TRTLLM_ANY_VERSION"  # =1: try an unlisted TensorRT-LLM anyway (unchecked)


class TrtLlmVersionError(RuntimeError):
    """The installed TensorRT-LLM is not one the custom module is written for."""


def parse_version(version: str) -> tuple[int, int, int]:
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not m:
        raise TrtLlmVersionError(f"cannot read the TensorRT-LLM version '{version}'")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_version(version: str, env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """TensorRT-LLM 1.2.x or 1.3.x, else refused in one line (or let through, unchecked, with
    CONVLLAVA_TRTLLM_ANY_VERSION=1)."""
    v = parse_version(version)
    env = os.environ if env is None else env
    if v[:2] in SUPPORTED or env.get(ANY_VERSION_ENV) == "1":
        return v
    listed = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED)
    why = ("older releases lack the multimodal input-processor API it uses (register_input_processor with placeholder metadata)"
           if v[:2] < SUPPORTED[0] else "newer releases have not been checked against it")
    raise TrtLlmVersionError(
        f"the ConvLLaVA custom module is written for TensorRT-LLM {listed}; this is {version}: {why}. "
        f"Install one of those, or set {ANY_VERSION_ENV}=1 to try it unchecked (docs/tensorrt-llm.md)"
    )


def custom_module_dir() -> Path:
    """The directory to pass as `--custom_module_dirs` (a package: TensorRT-LLM imports it by its name)."""
    return MODULE_DIR


def serve_command(folder: str | os.PathLike, *extra: str) -> list[str]:
    """`trtllm-serve` on a folder written by `export vllm`, with the custom module registering ConvLLaVA."""
    return ["trtllm-serve", str(folder), "--custom_module_dirs", str(custom_module_dir()), *extra]


# the same directory on whichever machine runs it (convllava-export installed there too)
MODULE_DIR_SHELL = "\"$(python -c 'from convllava_export.plugins.trtllm_core import custom_module_dir; print(custom_module_dir())')\""


def serve_shell(folder: str | os.PathLike) -> str:
    """`serve_command` as a shell line for another machine: the module dir is looked up there."""
    return f"trtllm-serve {folder} --custom_module_dirs {MODULE_DIR_SHELL}"


# ---------------------------------------------------------------------------------------------
# weights


@dataclass
class WeightSplit:
    """Released weights by the module that takes them: tower and projector under their module
    names (`embeddings.…`, `0.weight`), the LLM under Hugging Face Llama names (`model.layers.…`,
    `lm_head.weight`)."""

    vision: dict[str, Any] = field(default_factory=dict)
    projector: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)


PARTS = (("vision_tower.", "vision"), ("multi_modal_projector.", "projector"), ("language_model.", "llm"))


def split_weights(weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> WeightSplit:
    """Released name -> (part, name inside that part), through common.module_name; a name that is
    not ConvLLaVA's is refused (FolderError)."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    out = WeightSplit()
    for released, tensor in items:
        name = module_name(released)
        for prefix, part in PARTS:
            if name.startswith(prefix):
                getattr(out, part)[name[len(prefix):]] = tensor
                break
    return out


# ---------------------------------------------------------------------------------------------
# requests


def to_pil(image: Any) -> Image.Image:
    """An image as TensorRT-LLM's loaders hand it over: PIL; a torch tensor CHW float in [0, 1]
    (ToTensor, `image_format="pt"`) or uint8; a numpy HWC uint8 array. Float tensors come back
    to the same bytes (ToTensor divides by 255, this rounds x·255)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
            raise FolderError(f"an image tensor must be [C,H,W] with 1, 3 or 4 channels, got {list(t.shape)}")
        if t.is_floating_point():
            t = (t.float().clamp(0, 1) * 255).round()
        arr = t.to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise FolderError(f"a numpy image must be uint8 HWC, got {image.dtype}")
        return Image.fromarray(image).convert("RGB")
    raise FolderError(f"unsupported image type {type(image).__name__} (PIL image, torch tensor or numpy array)")


def pixel_values(image: Any, cfg: PreprocessConfig, bound: int) -> tuple[np.ndarray, int]:
    """Our preprocessing of one image: pixels [3,H,W] float32 and its placeholder count, which is
    the tower's output size (H/64)·(W/64) of exactly these pixels."""
    img = to_pil(image)
    n = image_tokens(img.width, img.height, cfg, bound)
    px = preprocess(img, cfg)
    if (px.shape[1] // STRIDE) * (px.shape[2] // STRIDE) != n:  # the count and the pixels come from one rule
        raise FolderError(f"preprocessing gave {px.shape[1]}x{px.shape[2]} pixels for an image counted as {n} tokens")
    return px, n


def pack_pixels(pixels: Sequence[np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    """Images of different sizes as two tensors (what a request's multimodal data carries between
    processes): all pixels flattened in order, and each image's (H, W)."""
    ts = [torch.as_tensor(p, dtype=torch.float32) for p in pixels]
    return {"pixel_values": torch.cat([t.reshape(-1) for t in ts]) if ts else torch.zeros(0),
            "image_sizes": torch.tensor([list(t.shape[1:]) for t in ts], dtype=torch.int64).reshape(-1, 2)}


def unpack_pixels(flat: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
    """`pack_pixels` undone: [3,H,W] per image."""
    hw = [(int(h), int(w)) for h, w in sizes.tolist()]
    total = sum(3 * h * w for h, w in hw)
    if total != flat.numel():
        raise FolderError(f"packed pixels hold {flat.numel()} values, the sizes account for {total}")
    out, start = [], 0
    for h, w in hw:
        out.append(flat[start:start + 3 * h * w].reshape(3, h, w))
        start += 3 * h * w
    return out


def hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside TensorRT-LLM's wrapper (TransformersTokenizer.tokenizer)."""
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "all_special_ids") else tokenizer


def expand_images(ids: Sequence[int], counts: Sequence[int], image_token_id: int) -> list[int]:
    """Each `image_token_id` in `ids` becomes that image's `counts[i]` placeholders."""
    n = sum(1 for t in ids if t == image_token_id)
    if n != len(counts):
        raise FolderError(f"the prompt has {n} <image> placeholder(s) but {len(counts)} image(s) were given; use one <image> per image")
    out: list[int] = []
    k = 0
    for t in ids:
        if t == image_token_id:
            out.extend([image_token_id] * counts[k])
            k += 1
        else:
            out.append(int(t))
    return out


def prompt_ids(tokenizer: Any, prompt: str | Sequence[int], image_token_id: int) -> list[int]:
    """The official ids of a prompt (one BOS, `<image>` as `image_token_id`), whether it is the raw
    text of an LLM API call, the chat template's rendering (which writes "<s> " itself) or token ids
    a client tokenized (`prompt_token_ids`)."""
    tok = hf_tokenizer(tokenizer)
    ids = tok(prompt, add_special_tokens=False).input_ids if isinstance(prompt, str) else [int(t) for t in prompt]
    return official_prompt_ids(tok, ids, image_token_id)


@dataclass
class Request:
    """What the input processor hands TensorRT-LLM: prompt ids (placeholders expanded), pixels, counts."""

    ids: list[int]
    pixels: list[np.ndarray]
    counts: list[int]


def process_request(tokenizer: Any, spec: FolderSpec, text: str | Sequence[int], images: Any, overrides: Mapping[str, object] | None = None) -> Request:
    """A text prompt and its images (`multi_modal_data["image"]`, one or a list) with the folder's
    preprocessing (`mm_processor_kwargs={"mode": "pad"|"native"}` may choose per request)."""
    imgs = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    if len(imgs) > spec.max_images:
        raise FolderError(f"{len(imgs)} images in one request; this model takes at most {spec.max_images}")
    cfg = spec.with_overrides(overrides or {})
    done = [pixel_values(img, cfg, spec.max_image_tokens) for img in imgs]
    counts = [n for _, n in done]
    return Request(expand_images(prompt_ids(tokenizer, text, spec.image_token_id), counts, spec.image_token_id), [p for p, _ in done], counts)


def embeddings_request(tokenizer: Any, spec: FolderSpec, hidden: int, text: str | Sequence[int], embeds: Any) -> tuple[list[int], list[torch.Tensor]]:
    """A text prompt with precomputed image embeddings ([tokens, hidden] per image, e.g. from our
    TensorRT vision engine): each image's rows become its placeholders."""
    rows = list(embeds) if isinstance(embeds, (list, tuple)) else [embeds]
    rows = [r for e in rows for r in (list(e) if isinstance(e, torch.Tensor) and e.dim() == 3 else [e])]  # [N,T,H] -> N images
    for r in rows:
        check_embeds(tuple(r.shape), hidden, spec.max_image_tokens)
    ids = expand_images(prompt_ids(tokenizer, text, spec.image_token_id), [int(r.shape[0]) for r in rows], spec.image_token_id)
    return ids, [torch.as_tensor(r) for r in rows]
