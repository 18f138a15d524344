"""Image loading and preprocessing: `pad` (official), `native` (any aspect ratio), explicit HxW.

`pad` reproduces LLaVA's `expand2square` + CLIPImageProcessor exactly: PIL bicubic resize of
uint8 pixels, rescale in float64 then cast to float32, normalize in float32.

Every mode's cost is bounded by the config whatever the aspect ratio: `pad` never builds a canvas
with a side above PAD_MAX_SIDE (or the resolution), `native` never exceeds DEFAULT_MAX_TOKENS
unless given a larger `max_tokens`, an explicit size is its own bound.
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
# pad: the square canvas is at most this wide, so padding never allocates more than decoding the
# largest image load_image accepts by default (8000² = DEFAULT_MAX_PIXELS, 256 MB as Pillow RGB).
# Only an image whose long side exceeds it is shrunk first: 24 Mpx photos (6000x4000) stay exact,
# a 1x100000 strip (official canvas 10^10 pixels, 30-40 GB) costs the same as an 8000x8000 photo.
PAD_MAX_SIDE = math.isqrt(DEFAULT_MAX_PIXELS)
# native without max_tokens: LLaVA's context is 2048 tokens, so a larger image could not be prompted
# anyway; 2048 tokens are 8.4 Mpx, 100 MB of float32 pixel_values. 16:9 at 1536 (1032 tokens) fits.
DEFAULT_MAX_TOKENS = 2048
MODES = ("pad", "native")
ORIENTATION = 0x0112  # the EXIF tag
WHITE = (255, 255, 255)


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
    """Paper §4.3: short side → resolution, aspect kept, each side rounded to a multiple of 64 (≥ 64).

    When (H/64)(W/64) exceeds max_tokens (DEFAULT_MAX_TOKENS when None, so that no aspect ratio makes
    the input unbounded) the image is scaled down, aspect kept as far as 64-px sides allow.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"image has an empty side ({width}x{height})")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    elif max_tokens < 1:
        raise ImageError(f"max_tokens must be >= 1, got {max_tokens}")
    scale = resolution / min(height, width)

    def rounded(s: float) -> tuple[int, int]:
        return (max(STRIDE, round(height * s / STRIDE) * STRIDE), max(STRIDE, round(width * s / STRIDE) * STRIDE))

    h, w = rounded(scale)
    tokens = (h // STRIDE) * (w // STRIDE)
    if tokens > max_tokens:
        h, w = rounded(scale * math.sqrt(max_tokens / tokens))
        if (h // STRIDE) * (w // STRIDE) > max_tokens:
            # rounding, or a short side held at 64 (extreme aspect): cut the long side to fit, in one step
            short = min(h, w, max_tokens * STRIDE)
            long = max(STRIDE, max_tokens // (short // STRIDE) * STRIDE)
            h, w = (long, short) if h >= w else (short, long)
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
        if img.getexif().get(ORIENTATION, 1) != 1:  # transposing copies the pixels: only when needed
            img = ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - a broken EXIF block should not reject the pixels
        pass
    try:
        return _to_rgb(img)
    except (ValueError, ImportError) as exc:  # ImportError: a Pillow built without lcms, for LAB
        raise ImageError(f"{name} has pixel mode {img.mode}, which cannot be converted to RGB: {exc}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, transparent pixels composited on white.

    Pillow's own convert("RGB") clips 16-bit, 32-bit and float greyscale to 0..255 (a 16-bit photo
    comes out white), so those are scaled here first, and its LAB conversion uses lcms's optimised 8-bit tables (up to ~25 levels
    off), so LAB goes through an unoptimised lcms transform. Other modes (1, L, P, CMYK, YCbCr,
    HSV, ...) are Pillow's conversion.
    """
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _wide_grey_to_8bit(img)
    if img.mode == "LAB":  # CIELAB, D50 white (Pillow's and ICC's convention) → sRGB
        from PIL import ImageCms

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(img, ImageCms.buildTransform(lab, srgb, "LAB", "RGB", flags=0x0100))  # cmsFLAGS_NOOPTIMIZE
    alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if alpha or (img.mode == "P" and img.palette is not None and img.palette.mode.endswith("A")):
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
        out = Image.new("RGB", img.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image too


def _wide_grey_to_8bit(img: Image.Image) -> Image.Image:
    """Greyscale wider than 8 bits → `L`, out-of-range values clipped.

    `I;16*` and `I` are taken as 16-bit samples (what 16-bit PNG/TIFF greyscale decodes to):
    round(v·255/65535). `F` is taken as 0..1, the float-image convention (NaN → 0): round(v·255).

    A `transparency` grey value (PNG tRNS) becomes an alpha channel, matched on the 16-bit samples.
    """
    a = np.asarray(img)
    if img.mode == "F":
        grey = np.rint(np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0) * 255)
    else:
        grey = (np.clip(a, 0, 65535).astype(np.uint32) + 128) // 257  # v/257 = v·255/65535, never a tie
    out = Image.fromarray(grey.astype(np.uint8))
    if "transparency" in img.info:
        return Image.merge("LA", (out, Image.fromarray(np.where(a == img.info["transparency"], 0, 255).astype(np.uint8))))
    return out


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


def _pad_canvas(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """`expand_to_square`, bit-exact with LLaVA up to a canvas side of max(PAD_MAX_SIDE, resolution).

    Above it, the image is shrunk (aspect kept, same resample) onto a canvas of that side, at the
    place (edges rounded to the pixel) the official canvas has it. The extra resample and the
    sub-pixel shift differ from the official result (which allocates side² pixels, 30-40 GB for a
    1x100000 strip) by well under a grey level on average, a few levels along sharp edges.
    """
    w, h = img.size
    side, fill = max(w, h), tuple(int(m * 255) for m in cfg.mean)
    limit = max(PAD_MAX_SIDE, cfg.resolution)
    if side <= limit:
        return expand_to_square(img, fill)
    s = limit / side
    x0, y0 = (side - w) // 2 * s, (side - h) // 2 * s
    left, top = round(x0), round(y0)
    size = (max(1, round(x0 + w * s) - left), max(1, round(y0 + h * s) - top))
    out = Image.new(img.mode, (limit, limit), fill)
    out.paste(img.resize(size, resample=cfg.resample), (left, top))
    return out


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image → pixel_values [3,H,W] float32.

    Rescale and normalize go through a 256-entry table per channel: the same float64-then-float32
    arithmetic as CLIPImageProcessor, bit for bit, without a float64 copy of the image.
    """
    if cfg.size is None and cfg.mode == "pad":
        img = _resize_shortest_then_crop(_pad_canvas(img, cfg), cfg.resolution, cfg.resample)
    else:
        h, w = target_size(img, cfg)
        check_size(h, w)
        img = img.resize((w, h), resample=cfg.resample)
    arr = np.asarray(img, dtype=np.uint8)
    table = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    table = (table[None] - np.asarray(cfg.mean, dtype=np.float32)[:, None]) / np.asarray(cfg.std, dtype=np.float32)[:, None]
    out = np.empty((3, *arr.shape[:2]), dtype=np.float32)
    for c in range(3):
        out[c] = table[c][arr[..., c]]
    return out
