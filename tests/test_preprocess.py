"""Preprocessing modes, token counts and image loading edge cases."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convllava_export import preprocess as pre
from convllava_export.errors import ImageError
from convllava_export.preprocess import (
    DEFAULT_MAX_TOKENS,
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


def test_native_size_default_cap_and_extreme_aspect():
    for hw in ((1, 100_000), (100_000, 1), (3, 40_000), (1, 10**12)):
        h, w = native_size(*hw, 1536)
        assert visual_tokens(h, w) <= DEFAULT_MAX_TOKENS and min(h, w) == 64
    assert native_size(900, 1600, 1536) == (1536, 2752)  # ordinary aspect ratios are untouched
    assert visual_tokens(*native_size(1, 100_000, 1536, max_tokens=10_000)) == 10_000  # an explicit budget wins


def test_native_size_always_within_budget():
    for h in (1, 7, 63, 64, 65, 300, 1000, 9999):
        for w in (1, 5, 64, 129, 640, 5000):
            for res in (64, 336, 1536):
                for cap in (1, 2, 3, 5, 16, 144, 576, None):
                    oh, ow = native_size(h, w, res, cap)
                    assert oh >= 64 and ow >= 64 and visual_tokens(oh, ow) <= (cap or DEFAULT_MAX_TOKENS), (h, w, res, cap)


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


def _official_pad(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """LLaVA's expand2square + CLIPImageProcessor (resize, float64 rescale, float32 normalize), spelled out."""
    w, h = img.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in cfg.mean))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    x = (np.asarray(canvas.resize((cfg.resolution, cfg.resolution), resample=3)).astype(np.float64) / 255).astype(np.float32)
    return ((x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)).transpose(2, 0, 1)


def test_pad_bit_exact_with_official_below_canvas_bound():
    rng = np.random.default_rng(0)
    cfg = PreprocessConfig(resolution=128)
    for w, h in ((300, 100), (57, 211), (128, 128), (1, 900)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        np.testing.assert_array_equal(preprocess(img, cfg), _official_pad(img, cfg))


def test_normalization_table_bit_exact_for_every_value():
    i, j = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    arr = np.stack([i, j, 255 - j], -1)
    img = Image.fromarray(arr.astype(np.uint8))
    cfg = PreprocessConfig(size=(256, 256))  # same size: the resize is a copy
    x = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    expect = ((x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)).transpose(2, 0, 1)
    np.testing.assert_array_equal(preprocess(img, cfg), expect)


def test_pad_canvas_above_bound_is_shrunk_first(monkeypatch):
    # the real bound (8000, with 1536: a 5.2x final shrink) is exercised in a subprocess below
    monkeypatch.setattr(pre, "PAD_MAX_SIDE", 640)
    rng = np.random.default_rng(0)
    cfg = PreprocessConfig(resolution=128)
    for w, h in ((2400, 600), (700, 2400), (3, 4000)):
        img = Image.fromarray(rng.integers(0, 256, (max(1, h // 100), max(1, w // 100), 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        got, want = preprocess(img, cfg), _official_pad(img, cfg)
        levels = np.abs(got - want) * np.asarray(cfg.std, np.float32)[:, None, None] * 255
        assert not np.array_equal(got, want)  # the shrinking path was taken
        assert levels.mean() < 0.5 and levels.max() < 16, (w, h, levels.mean(), levels.max())


BOUNDED_RUN = textwrap.dedent(
    """
    import io, resource, sys
    from PIL import Image
    from convllava_export.preprocess import PreprocessConfig, load_image, preprocess

    w, h, mode, budget = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + budget, vm + budget))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(usage.ru_utime + usage.ru_stime) + 30
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    x = preprocess(load_image(buf.getvalue()), PreprocessConfig(mode=mode))
    print(len(buf.getvalue()), *x.shape)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limit read from /proc")
@pytest.mark.parametrize("mode", ["pad", "native"])
@pytest.mark.parametrize("wh", [(1, 100_000), (100_000, 1), (3, 40_000)])
def test_extreme_aspect_ratio_cost_is_bounded(wh, mode):
    """A few-hundred-byte PNG strip once asked for a 100000² canvas (pad) or 10^9 tokens (native).

    Pillow's pixel buffers are invisible to tracemalloc, so the run gets 512 MiB of address space
    on top of its imports (and 30 s of CPU) in a subprocess: the old code dies there with MemoryError.
    """
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", BOUNDED_RUN, *map(str, wh), mode, str(512 << 20)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    size, c, h, w = map(int, res.stdout.split())
    assert size < 1000 and c == 3 and h % 64 == 0 and w % 64 == 0
    if mode == "pad":
        assert (h, w) == (1536, 1536)
    else:
        assert min(h, w) == 64 and visual_tokens(h, w) <= DEFAULT_MAX_TOKENS


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
