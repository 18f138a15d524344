"""Image loading and preprocessing: `pad` (official), `native` (any aspect ratio), explicit HxW.

`pad` reproduces LLaVA's `expand2square` + CLIPImageProcessor exactly: PIL bicubic resize of
uint8 pixels, rescale in float64 then cast to float32, normalize in float32.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

STRIDE = 64
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 64_000_000  # decoded pixels; a 8000x8000 image is fine, a bomb is not
MODES = ("pad", "native")


@dataclass(frozen=True)
class PreprocessConfig:
    """What the tower's preprocessor_config.json says, plus our mode and token budget."""

    resolution: int = 1536
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # bicubic
    mode: str = "pad"
    max_tokens: int | None = None  # native mode: bound on (H/64)(W/64)
    size: tuple[int, int] | None = None  # explicit (H, W), overrides mode

    @classmethod
    def from_preprocessor_config(cls, cfg: dict[str, Any], **overrides: Any) -> PreprocessConfig:
        size = cfg.get("size", {})
        res = size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else size
        base = cls(
            resolution=int(res),
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            resample=int(cfg.get("resample", 3)),
        )
        fields = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**base.__dict__, **fields})

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["size"] = list(self.size) if self.size else None
        return d


def visual_tokens(height: int, width: int, stride: int = STRIDE) -> int:
    """Visual tokens ConvNeXt† makes for an input of this size: (H/64)·(W/64)."""
    check_size(height, width, stride)
    return (height // stride) * (width // stride)


def check_size(height: int, width: int, stride: int = STRIDE) -> None:
    if height <= 0 or width <= 0 or height % stride or width % stride:
        raise ImageError(f"image size {height}x{width} is not a positive multiple of {stride} on both sides")


def parse_size(text: str) -> tuple[int, int]:
    """'768x1024' (HxW) or '768' (square) → (H, W), validated."""
    try:
        parts = [int(p) for p in text.lower().replace("×", "x").split("x")]
    except ValueError:
        raise ImageError(f"size '{text}' is not of the form HxW (e.g. 1536x1536)") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ImageError(f"size '{text}' is not of the form HxW (e.g. 1536x1536)")
    check_size(parts[0], parts[1])
    return parts[0], parts[1]


def native_size(height: int, width: int, resolution: int, max_tokens: int | None = None) -> tuple[int, int]:
    """Paper §4.3: short side → resolution, aspect kept, each side rounded to a multiple of 64.

    When (H/64)(W/64) exceeds max_tokens the image is scaled down (aspect kept) until it fits.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"image has an empty side ({width}x{height})")
    scale = resolution / min(height, width)

    def rounded(s: float) -> tuple[int, int]:
        return (max(STRIDE, round(height * s / STRIDE) * STRIDE), max(STRIDE, round(width * s / STRIDE) * STRIDE))

    h, w = rounded(scale)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ImageError(f"max_tokens must be >= 1, got {max_tokens}")
        tokens = (h // STRIDE) * (w // STRIDE)
        if tokens > max_tokens:
            scale *= math.sqrt(max_tokens / tokens)
            h, w = rounded(scale)
            while (h // STRIDE) * (w // STRIDE) > max_tokens:
                if h >= w and h > STRIDE:
                    h -= STRIDE
                elif w > STRIDE:
                    w -= STRIDE
                else:
                    h -= STRIDE
    return h, w


def load_image(source: str | os.PathLike | Image.Image | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open any Pillow format, honour EXIF orientation, convert to RGB, refuse decompression bombs."""
    if isinstance(source, Image.Image):
        img = source
        name = "<image>"
    else:
        import io

        name = "<bytes>" if isinstance(source, bytes) else str(source)
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise ImageError(f"image not found: {name}")
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        old = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = max_pixels
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"{name} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                        "(decompression-bomb guard); downscale it or raise the limit"
                    )
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(
                f"{name} is larger than the limit of {max_pixels} pixels (decompression-bomb guard); "
                "downscale it or raise the limit"
            ) from None
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not an image Pillow can read") from None
        except OSError as exc:
            raise ImageError(f"{name} could not be decoded (truncated or corrupt?): {exc}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - a broken EXIF block should not reject the pixels
        pass
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: paste centred on a square of the mean colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, 0) if h > w else (0, (side - h) // 2))
    return out


def target_size(img: Image.Image, cfg: PreprocessConfig) -> tuple[int, int]:
    """(H, W) the tower will see for this image under this config."""
    if cfg.size is not None:
        return cfg.size
    if cfg.mode == "pad":
        return cfg.resolution, cfg.resolution
    if cfg.mode == "native":
        return native_size(img.size[1], img.size[0], cfg.resolution, cfg.max_tokens)
    raise ImageError(f"unknown preprocessing mode '{cfg.mode}' (use one of {', '.join(MODES)} or an explicit HxW)")


def _resize_shortest_then_crop(img: Image.Image, size: int, resample: int) -> Image.Image:
    """CLIPImageProcessor: resize shortest edge to `size`, centre-crop size×size."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    img = img.resize((new_w, new_h), resample=resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size)) if (new_w, new_h) != (size, size) else img


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image → pixel_values [3,H,W] float32."""
    if cfg.size is None and cfg.mode == "pad":
        fill = tuple(int(m * 255) for m in cfg.mean)
        img = _resize_shortest_then_crop(expand_to_square(img, fill), cfg.resolution, cfg.resample)
    else:
        h, w = target_size(img, cfg)
        check_size(h, w)
        img = img.resize((w, h), resample=cfg.resample)
    arr = np.asarray(img, dtype=np.uint8)
    x = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(images: list[Image.Image], cfg: PreprocessConfig) -> list[np.ndarray]:
    """Each image preprocessed on its own (native sizes differ); stack equal shapes yourself."""
    return [preprocess(im, cfg) for im in images]
