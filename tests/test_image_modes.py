"""load_image gives the right RGB pixels for every mode Pillow opens, checked against float references.

Each image is built here (numpy + Pillow), encoded to PNG / TIFF / JPEG / GIF bytes and loaded through
`load_image(bytes)`; the reference conversion is written out in numpy, independent of Pillow's `convert`.
Tolerance: 1 grey level.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from convllava_export.preprocess import load_image

H, W = 9, 14  # not square, so a wrong orientation shows
rng = np.random.default_rng(0)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16(samples: np.ndarray, colour_type: int, trns: int | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    h, w = samples.shape[:2]
    raw = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))
    head = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
    extra = chunk(b"tRNS", struct.pack(">H", trns)) if trns is not None else b""
    return b"\x89PNG\r\n\x1a\n" + head + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def rgb_of(data: bytes | Image.Image) -> np.ndarray:
    img = load_image(data)
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.float64)


def check(got: np.ndarray, want: np.ndarray) -> None:
    want = np.broadcast_to(want, got.shape)
    err = np.abs(got - np.round(want))
    assert err.max() <= 1, f"off by up to {err.max():.0f} levels at {np.unravel_index(err.argmax(), err.shape)}"


def grey(v: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(v, np.float64)[..., None], 3, -1)


def over_white(c: np.ndarray, alpha01: np.ndarray) -> np.ndarray:
    a = np.asarray(alpha01, np.float64)[..., None]
    return c * a + 255 * (1 - a)


def u16(shape) -> np.ndarray:
    """Random 16-bit samples plus the extremes and the values either side of a rounding step
    (uint16 as stored; the references compute in float)."""
    v = rng.integers(0, 65536, shape).astype(np.uint16)
    v.flat[:6] = [0, 65535, 128, 129, 257 * 100 + 128, 257 * 100 + 129]
    return v


# -- 16-bit and float greyscale: Pillow's convert("RGB") clips these to white ---------------------


def test_16bit_grey_png():
    v = u16((H, W))
    data = png16(v, 0)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    check(rgb_of(data), grey(v / 65535 * 255))


def test_16bit_grey_png_with_transparent_value():
    v = u16((H, W))
    v[2, :] = 4242
    want = grey(v / 65535 * 255)
    want[2, :] = 255
    check(rgb_of(png16(v, 0, trns=4242)), want)


def test_16bit_big_endian_tiff():
    v = u16((H, W))
    data = encode(Image.frombytes("I;16B", (W, H), v.astype(">u2").tobytes()), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    check(rgb_of(data), grey(v / 65535 * 255))


def test_32bit_int_tiff_taken_as_16bit_and_clipped():
    v = u16((H, W)).astype(np.int32)
    v[0, :3] = [-5, 70000, 2**31 - 1]
    data = encode(Image.fromarray(v), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    check(rgb_of(data), grey(np.clip(v, 0, 65535) / 65535 * 255))


def test_float_tiff_taken_as_0_to_1():
    v = rng.random((H, W), dtype=np.float32)
    v[0, :4] = [-0.5, 2.0, np.nan, np.inf]
    data = encode(Image.fromarray(v), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    check(rgb_of(data), grey(np.clip(np.nan_to_num(v, nan=0.0), 0, 1) * 255))


# -- 16-bit colour PNG: Pillow decodes these to 8 bits itself -------------------------------------


def test_16bit_rgb_png():
    v = u16((H, W, 3))
    data = png16(v, 2)
    assert Image.open(io.BytesIO(data)).mode == "RGB"  # Pillow keeps the high byte
    check(rgb_of(data), v / 65535 * 255)


@pytest.mark.parametrize("colour_type", [4, 6])
def test_16bit_png_with_alpha(colour_type):
    v = u16((H, W, 2 if colour_type == 4 else 4))
    colour = grey(v[..., 0]) if colour_type == 4 else v[..., :3].astype(np.float64)
    # Pillow's decoder keeps the high byte (v >> 8) of colour and alpha before we see them; from
    # there the composite over white is ours
    check(rgb_of(png16(v, colour_type)), over_white(np.floor(colour / 256), (v[..., -1] >> 8) / 255))


# -- 8-bit modes -------------------------------------------------------------------------------


def test_bilevel():
    v = rng.random((H, W)) > 0.5
    check(rgb_of(encode(Image.fromarray(v), "PNG")), grey(v * 255))


def test_grey():
    v = rng.integers(0, 256, (H, W), dtype=np.uint8)
    check(rgb_of(encode(Image.fromarray(v), "PNG")), grey(v))


def test_grey_alpha_over_white():
    la = rng.integers(0, 256, (H, W, 2), dtype=np.uint8)
    data = encode(Image.frombytes("LA", (W, H), la.tobytes()), "PNG")
    check(rgb_of(data), over_white(grey(la[..., 0]), la[..., 1] / 255))


def test_premultiplied_grey_alpha_image():
    la = rng.integers(0, 256, (H, W, 2), dtype=np.uint8)
    la[..., 0] = np.minimum(la[..., 0], la[..., 1])  # premultiplied: value <= alpha
    got = rgb_of(Image.frombytes("La", (W, H), la.tobytes()))
    check(got, grey(la[..., 0] + 255.0 - la[..., 1]))


def test_rgba_over_white():
    v = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    check(rgb_of(encode(Image.frombytes("RGBA", (W, H), v.tobytes()), "PNG")), over_white(v[..., :3].astype(np.float64), v[..., 3] / 255))


def test_premultiplied_rgba_image():
    v = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    v[..., :3] = np.minimum(v[..., :3], v[..., 3:])
    check(rgb_of(Image.frombytes("RGBa", (W, H), v.tobytes())), v[..., :3] + 255.0 - v[..., 3:])


def palette_image(mode: str = "P") -> tuple[Image.Image, np.ndarray, np.ndarray]:
    pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = rng.integers(0, 256, (H, W), dtype=np.uint8)
    idx[0, 0] = 7
    img = Image.frombytes("P", (W, H), idx.tobytes())
    img.putpalette(pal.tobytes())
    return img, pal, idx


def test_palette():
    img, pal, idx = palette_image()
    check(rgb_of(encode(img, "PNG")), pal[idx].astype(np.float64))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparent_index(fmt):
    img, pal, idx = palette_image()
    want = pal[idx].astype(np.float64)
    want[idx == 7] = 255
    check(rgb_of(encode(img, fmt, transparency=7)), want)


def test_palette_with_alpha_per_entry():
    img, pal, idx = palette_image()
    alphas = rng.integers(0, 256, 256, dtype=np.uint8)
    check(rgb_of(encode(img, "PNG", transparency=alphas.tobytes())), over_white(pal[idx].astype(np.float64), alphas[idx] / 255))


def test_palette_alpha_tiff():
    img, pal, idx = palette_image()
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    pa = Image.merge("PA", (img, Image.frombytes("L", (W, H), alpha.tobytes())))
    pa.putpalette(pal.tobytes())
    data = encode(pa, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "PA"
    check(rgb_of(data), over_white(pal[idx].astype(np.float64), alpha / 255))


def test_palette_with_rgba_palette_image():
    img, pal, idx = palette_image()
    rgba_pal = np.concatenate([pal, rng.integers(0, 256, (256, 1), dtype=np.uint8)], 1)
    img.putpalette(rgba_pal.tobytes(), "RGBA")
    check(rgb_of(img), over_white(pal[idx].astype(np.float64), rgba_pal[idx, 3] / 255))


def test_rgb_with_transparent_colour():
    v = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    v[1, :] = (1, 2, 3)
    want = v.astype(np.float64)
    want[1, :] = 255
    check(rgb_of(encode(Image.fromarray(v), "PNG", transparency=(1, 2, 3))), want)


# -- other colour spaces -----------------------------------------------------------------------


def cmyk_reference(v: np.ndarray) -> np.ndarray:
    c = v.astype(np.float64) / 255
    return 255 * (1 - c[..., :3]) * (1 - c[..., 3:])


def test_cmyk_tiff():
    v = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    check(rgb_of(encode(Image.frombytes("CMYK", (W, H), v.tobytes()), "TIFF")), cmyk_reference(v))


def test_cmyk_jpeg():
    v = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    data = encode(Image.frombytes("CMYK", (W, H), v.tobytes()), "JPEG", quality=95)
    decoded = Image.open(io.BytesIO(data))  # JPEG is lossy (and Adobe-inverted): the reference starts from its samples
    assert decoded.mode == "CMYK"
    check(rgb_of(data), cmyk_reference(np.asarray(decoded)))


def test_ycbcr_tiff():
    v = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    data = encode(Image.frombytes("YCbCr", (W, H), v.tobytes()), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "YCbCr"
    y, cb, cr = (v[..., i].astype(np.float64) for i in range(3))
    want = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], -1)  # JFIF, full range
    check(rgb_of(data), np.clip(want, 0, 255))


def test_lab_tiff():
    # in-gamut Lab samples (of random sRGB colours), stored as TIFF CIELab: L, then signed a and b
    lab = np.asarray(Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).convert("LAB"))
    data = encode(Image.frombytes("LAB", (W, H), lab.tobytes()), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    L = lab[..., 0] / 255 * 100
    a, b = (lab[..., i].view(np.int8).astype(np.float64) for i in (1, 2))
    fy = (L + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], -1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * (0.96422, 1.0, 0.82521)  # D50 white
    m = np.array(  # XYZ (D50) → linear sRGB, Bradford-adapted
        [[3.1338561, -1.6168667, -0.4906146], [-0.9787684, 1.9161415, 0.0334540], [0.0719453, -0.2289914, 1.4052427]]
    )
    lin = np.clip(xyz @ m.T, 0, 1)
    check(rgb_of(data), 255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055))


def test_hsv_image():
    v = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    h, s, val = (v[..., i] / 255 for i in range(3))
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = val * (1 - s), val * (1 - s * f), val * (1 - s * (1 - f))
    sectors = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)]
    want = np.stack([np.choose(i, [sec[c] for sec in sectors]) for c in range(3)], -1) * 255
    check(rgb_of(Image.frombytes("HSV", (W, H), v.tobytes())), want)


def test_every_pillow_mode_loads_as_rgb():
    for mode in Image.MODES:
        img = Image.new(mode, (W, H))
        assert load_image(img).mode == "RGB", mode


# -- EXIF orientation --------------------------------------------------------------------------

ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored
    3: lambda a: a[::-1, ::-1],  # 180°
    4: lambda a: a[::-1],  # flipped
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, -1),  # 90° clockwise to display
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
    8: lambda a: np.rot90(a, 1),  # 90° anticlockwise to display
}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", sorted(ORIENT))
def test_exif_orientation(orientation, fmt):
    v = np.kron(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))  # 24x40, 8-px blocks
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(v), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)  # the samples as stored (JPEG is lossy)
    check(rgb_of(data), ORIENT[orientation](stored))


def test_exif_orientation_on_16bit_grey():
    v = u16((H, W))
    img = Image.frombytes("I;16", (W, H), v.astype("<u2").tobytes())
    exif = Image.Exif()
    exif[0x0112] = 6
    check(rgb_of(encode(img, "PNG", exif=exif.tobytes())), np.rot90(grey(v / 65535 * 255), -1))
