"""What the vLLM plugin and the TensorRT-LLM registration share, with no engine imported.

A folder written by `export vllm` holds the released weights under their released names, a
config.json naming ARCHITECTURE, and a `convllava` section with the preprocessing. Both engines
map the released names onto the same module tree (`module_name`), count the same visual tokens
per image (`image_tokens`) and give the LLM the prompt ids the official code makes
(`official_prompt_ids`), whatever their own tokenizer did to the text first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..preprocess import MODES, STRIDE, PreprocessConfig, native_size
from ..prompt import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, tokenize_with_images

ARCHITECTURE = "ConvLlavaForConditionalGeneration"
SECTION = "convllava"  # config.json key of what only ConvLLaVA needs
DEFAULT_MAX_IMAGES = 8

# released name prefix -> module prefix, most specific first (the tower sits under "model.")
PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.mm_projector.", "multi_modal_projector."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


class FolderError(ValueError):
    """A request or folder the model cannot take; engines answer it as a client error (400)."""


def module_name(released: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` -> `language_model.model.layers.0.mlp.up_proj.weight`."""
    for old, new in PREFIXES:
        if released.startswith(old):
            return new + released[len(old):]
    raise FolderError(f"weight '{released}' is not part of a ConvLLaVA checkpoint (known prefixes: {', '.join(p for p, _ in PREFIXES)})")


@dataclass(frozen=True)
class FolderSpec:
    """The `convllava` section: preprocessing, the placeholder id, and the bounds."""

    preprocess: PreprocessConfig
    image_token_id: int
    max_images: int
    max_image_tokens: int
    projector: str = "mlp2x_gelu"

    @classmethod
    def from_config(cls, config: Any) -> FolderSpec:
        """From config.json's dict or a transformers config object (the section is kept as an attribute)."""
        section = config.get(SECTION) if isinstance(config, Mapping) else getattr(config, SECTION, None)
        if not isinstance(section, Mapping):
            raise FolderError(f"config.json has no '{SECTION}' section: write the folder with `convllava-export export vllm`")
        pre = dict(section["preprocess"])
        pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
        pre["size"] = tuple(pre["size"]) if pre.get("size") else None
        return cls(PreprocessConfig(**pre), int(section["image_token_id"]), int(section["max_images"]),
                   int(section["max_image_tokens"]), section.get("projector", "mlp2x_gelu"))

    def to_dict(self) -> dict[str, Any]:
        return {"preprocess": self.preprocess.to_dict(), "image_token_id": self.image_token_id, "max_images": self.max_images,
                "max_image_tokens": self.max_image_tokens, "projector": self.projector}

    def with_overrides(self, overrides: Mapping[str, object]) -> PreprocessConfig:
        """The preprocessing for one request: `mode` (pad | native) may be chosen per request."""
        mode = overrides.get("mode")
        if mode is None:
            return self.preprocess
        if mode not in MODES:
            raise FolderError(f"mode '{mode}' is not one of {', '.join(MODES)}")
        return PreprocessConfig(**{**self.preprocess.__dict__, "mode": mode})


def image_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(H, W) the tower sees for an image of this size (what `preprocess.target_size` gives)."""
    if cfg.size is not None:
        return cfg.size
    if cfg.mode == "pad":
        return cfg.resolution, cfg.resolution
    return native_size(height, width, cfg.resolution, cfg.max_tokens)


def image_tokens(width: int, height: int, cfg: PreprocessConfig, bound: int) -> int:
    """Placeholder tokens for one image: (H/64)·(W/64) of the size it is resized to; past the
    folder's bound it is refused (FolderError), never silently cut."""
    h, w = image_size(width, height, cfg)
    n = (h // STRIDE) * (w // STRIDE)
    if n > bound:
        raise FolderError(f"an image of {width}x{height} makes {n} visual tokens at {h}x{w}; this model takes at most {bound} per image")
    return n


def largest_image(cfg: PreprocessConfig, bound: int) -> tuple[int, int]:
    """(width, height) of an image that makes the most tokens this config allows (engines profile with it)."""
    if cfg.size is not None:
        return cfg.size[1], cfg.size[0]
    side = cfg.resolution // STRIDE
    if cfg.mode == "pad" or side * side >= bound:
        return cfg.resolution, cfg.resolution
    return STRIDE * (bound // side), cfg.resolution


def check_embeds(shape: Sequence[int], hidden: int, bound: int) -> None:
    """Precomputed image embeddings ([tokens, hidden]) as a request may bring them."""
    if len(shape) != 2 or shape[1] != hidden:
        raise FolderError(f"image embeddings must be [tokens, {hidden}] per image, got {list(shape)}")
    if not 0 < shape[0] <= bound:
        raise FolderError(f"image embeddings of {shape[0]} tokens: this model takes 1 to {bound} per image")


def prompt_text(tokenizer: Any, ids: Sequence[int], image_token_id: int) -> str:
    """The text an engine tokenized, back from its ids: runs of ordinary tokens are decoded, special
    tokens kept as written, the leading BOS dropped (the official tokenization adds its own)."""
    special = set(tokenizer.all_special_ids) | {image_token_id}
    parts: list[str] = []
    run: list[int] = []
    for i in ids:
        if i in special:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(IMAGE_TOKEN if i == image_token_id else tokenizer.convert_ids_to_tokens(i))
        else:
            run.append(i)
    if run:
        parts.append(tokenizer.decode(run))
    if parts and parts[0] == tokenizer.bos_token:
        parts = parts[1:]
    return "".join(parts)


def official_prompt_ids(tokenizer: Any, ids: Sequence[int], image_token_id: int) -> list[int]:
    """The ids the official code gives the prompt these ids spell (LLaVA's `tokenizer_image_token`:
    each piece around `<image>` tokenized alone), with `image_token_id` at each image.

    An engine's tokenizer treats `<image>` as one special token and does not start the text after
    it with SentencePiece's word marker; the official pieces do. Re-tokenizing the text keeps the
    LLM's input equal to the reference's.
    """
    official = tokenize_with_images(tokenizer, prompt_text(tokenizer, ids, image_token_id))
    return [image_token_id if t == IMAGE_TOKEN_INDEX else t for t in official]
