"""Preprocessing modes, token counts and image loading edge cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from convllava_export.errors import ImageError
from convllava_export.preprocess import (
    PreprocessConfig,
    load_image,
    native_size,
    parse_size,
    preprocess,
    visual_tokens,
)


def test_visual_tokens():
    assert visual_tokens(768, 768) == 144
    assert visual_tokens(1024, 1024) == 256
    assert visual_tokens(1536, 1536) == 576
    assert visual_tokens(64, 192) == 3
    with pytest.raises(ImageError, match="multiple of 64"):
        visual_tokens(100, 64)


@pytest.mark.parametrize(
    "hw, res, expect",
    [((900, 1600), 1536, (1536, 2752)), ((1600, 900), 1536, (2752, 1536)), ((500, 500), 768, (768, 768)), ((10, 1000), 64, (64, 6400))],
)
def test_native_size_keeps_aspect_and_rounds(hw, res, expect):
    h, w = native_size(*hw, res)
    assert (h, w) == expect and h % 64 == 0 and w % 64 == 0


def test_native_size_token_bound():
    h, w = native_size(900, 1600, 1536, max_tokens=576)
    assert visual_tokens(h, w) <= 576
    assert w > h and abs((w / h) - 16 / 9) < 0.25  # aspect roughly kept
    assert native_size(100, 8000, 64, max_tokens=4) == (64, 256)


def test_parse_size():
    assert parse_size("768x1024") == (768, 1024)
    assert parse_size("512") == (512, 512)
    for bad in ("100x64", "axb", "1x2x3"):
        with pytest.raises(ImageError):
            parse_size(bad)


def test_modes_shapes():
    img = Image.new("RGB", (300, 100), (10, 200, 30))
    assert preprocess(img, PreprocessConfig(resolution=256)).shape == (3, 256, 256)
    assert preprocess(img, PreprocessConfig(resolution=128, mode="native")).shape == (3, 128, 384)
    assert preprocess(img, PreprocessConfig(size=(64, 192))).shape == (3, 64, 192)
    x = preprocess(img, PreprocessConfig(resolution=128, mode="native"))
    assert x.dtype == np.float32
    # a uniform colour maps to (c/255 - mean)/std everywhere
    expect = (np.array([10, 200, 30]) / 255 - np.array(PreprocessConfig().mean)) / np.array(PreprocessConfig().std)
    np.testing.assert_allclose(x[:, 60, 200], expect, atol=1e-5)


def test_pad_mode_pads_with_mean_colour():
    img = Image.new("RGB", (256, 64), (255, 0, 0))
    x = preprocess(img, PreprocessConfig(resolution=256))
    # the top rows are the pad colour (122,116,104)
    expect = (np.array([122, 116, 104]) / 255 - np.array(PreprocessConfig().mean)) / np.array(PreprocessConfig().std)
    np.testing.assert_allclose(x[:, 0, 128], expect, atol=1e-5)


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_honoured():
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    loaded = load_image(_png(img, "JPEG", exif=exif.tobytes()))
    assert loaded.size == (100, 200)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16"])
def test_modes_converted_to_rgb(mode):
    img = Image.new("RGB", (32, 16), (200, 50, 50)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    assert load_image(_png(img, fmt)).mode == "RGB"


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert load_image(_png(img)).getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_guard():
    img = Image.new("L", (3000, 3000))
    with pytest.raises(ImageError, match="decompression-bomb guard"):
        load_image(_png(img), max_pixels=1_000_000)


def test_bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    data = _png(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="could not be decoded"):
        load_image(tmp_path / "cut.jpg")
