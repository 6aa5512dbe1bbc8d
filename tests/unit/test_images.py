"""Tests for tlpipe.data.images: decoding every mode to uint8 RGB and rejecting bad files."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlpipe.data.images import DecodedImage, ImageRejected, decode_bytes, decode_file, resize_image

SIZE = 32


# ---------------------------------------------------------------- fixture helpers


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def random_rgb(seed: int, width: int = 48, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def valid_jpeg(seed: int = 0, width: int = 64, height: int = 64) -> bytes:
    return encode(random_rgb(seed, width, height), "JPEG", quality=90)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def halves_image(width: int = 80, height: int = 40) -> Image.Image:
    """Left half red, right half blue."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(array, "RGB")


def exif_jpeg(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def is_red(pixel: np.ndarray) -> bool:
    return pixel[0] > 200 and pixel[1] < 50 and pixel[2] < 50


def is_blue(pixel: np.ndarray) -> bool:
    return pixel[0] < 50 and pixel[1] < 50 and pixel[2] > 200


def assert_rgb(decoded: DecodedImage, size: int = SIZE) -> None:
    assert isinstance(decoded.pixels, np.ndarray)
    assert decoded.pixels.shape == (size, size, 3)
    assert decoded.pixels.dtype == np.uint8


def mode_samples() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the mode Pillow opens it in)."""
    rng = np.random.default_rng(7)
    gray = Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8), "L")
    rgba = np.dstack([rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), np.full((40, 48), 255, np.uint8)])
    sixteen = Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16))
    la = Image.fromarray(np.dstack([np.full((40, 48), 90, np.uint8), np.full((40, 48), 255, np.uint8)]), "LA")
    return {
        "rgb_jpeg": (encode(random_rgb(1), "JPEG"), "RGB"),
        "rgb_png": (encode(random_rgb(2), "PNG"), "RGB"),
        "gray_jpeg": (encode(gray, "JPEG"), "L"),
        "gray_png": (encode(gray, "PNG"), "L"),
        "palette_png": (encode(random_rgb(3).quantize(16), "PNG"), "P"),
        "rgba_png": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), "RGBA"),
        "la_png": (encode(la, "PNG"), "LA"),
        "cmyk_jpeg": (encode(random_rgb(4).convert("CMYK"), "JPEG"), "CMYK"),
        "gray16_png": (encode(sixteen, "PNG"), "I;16"),
        "bilevel_png": (encode(gray.convert("1"), "PNG"), "1"),
    }


MODES = mode_samples()


# ---------------------------------------------------------------- modes


@pytest.mark.parametrize("name", sorted(MODES))
@pytest.mark.parametrize("resize", ["stretch", "center_crop"])
def test_every_mode_becomes_uint8_rgb(name: str, resize: str) -> None:
    data, mode = MODES[name]
    decoded = decode_bytes(data, SIZE, resize)
    assert_rgb(decoded)
    assert decoded.mode == mode
    assert (decoded.width, decoded.height) == (48, 40)
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [16, 57, 224])
def test_output_size_follows_param(size: int) -> None:
    assert_rgb(decode_bytes(valid_jpeg(width=100, height=60), size), size)


def test_grayscale_becomes_three_equal_channels() -> None:
    data = encode(Image.new("L", (40, 40), 100), "PNG")
    pixels = decode_bytes(data, SIZE).pixels
    assert (pixels == 100).all()


def test_palette_colours_are_kept() -> None:
    data = encode(Image.new("RGB", (40, 40), (0, 128, 0)).quantize(4), "PNG")
    pixels = decode_bytes(data, SIZE).pixels.astype(int)
    assert np.abs(pixels - [0, 128, 0]).max() <= 4


def test_palette_transparency_composited_on_white() -> None:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (20, 0, 40, 40))
    data = encode(image, "PNG", transparency=0)
    decoded = decode_bytes(data, SIZE, "center_crop")
    assert decoded.mode == "P"
    assert (decoded.pixels[:, :10] == 255).all()  # transparent black -> white
    assert is_red(decoded.pixels[16, 28])


def test_rgba_alpha_composited_on_white() -> None:
    array = np.zeros((40, 40, 4), dtype=np.uint8)
    array[:, :20] = (255, 0, 0, 0)  # fully transparent red: background shows
    array[:, 20:] = (255, 0, 0, 255)  # opaque red
    decoded = decode_bytes(encode(Image.fromarray(array, "RGBA"), "PNG"), SIZE)
    assert (decoded.pixels[:, :12] == 255).all()
    assert is_red(decoded.pixels[16, 28])


def test_cmyk_jpeg_colours() -> None:
    data = encode(Image.new("RGB", (48, 48), (255, 0, 0)).convert("CMYK"), "JPEG", quality=95)
    decoded = decode_bytes(data, SIZE)
    assert decoded.mode == "CMYK"
    assert is_red(decoded.pixels[16, 16])


def test_16bit_grayscale_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    decoded = decode_bytes(data, 64, "stretch")
    assert decoded.mode.startswith("I;16")
    pixels = decoded.pixels
    assert pixels.min() <= 5
    assert pixels.max() >= 250
    # a ramp stays a ramp: 64 distinct levels, not saturated to white
    assert len(np.unique(pixels)) == 64
    assert (pixels == 255).mean() < 0.05
    assert (np.diff(pixels[..., 0].astype(int), axis=1) >= 0).all()


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (32768, 128), (65535, 255), (200, 1)])
def test_16bit_constant_values(value: int, expected: int) -> None:
    data = encode(Image.fromarray(np.full((40, 40), value, dtype=np.uint16)), "PNG")
    pixels = decode_bytes(data, SIZE).pixels
    assert (pixels == expected).all()


def test_no_exif_keeps_orientation() -> None:
    pixels = decode_bytes(encode(halves_image(), "JPEG", quality=95), SIZE, "center_crop").pixels
    assert is_red(pixels[16, 2]) and is_blue(pixels[16, 29])


def test_exif_orientation_6_is_applied() -> None:
    # Orientation 6: rotate 90 degrees clockwise for display; left (red) goes to the top.
    data = exif_jpeg(halves_image(), 6)
    decoded = decode_bytes(data, SIZE, "center_crop")
    pixels = decoded.pixels
    assert is_red(pixels[2, 16]), pixels[2, 16]
    assert is_blue(pixels[29, 16]), pixels[29, 16]
    assert is_red(pixels[2, 2]) and is_red(pixels[2, 29])
    assert (decoded.width, decoded.height) == (80, 40)  # as stored in the file
    stretched = decode_bytes(data, SIZE, "stretch").pixels
    assert is_red(stretched[2, 16]) and is_blue(stretched[29, 16])


def test_exif_orientation_6_rotates_the_shape() -> None:
    # With centre crop of a 80x40 stored image, un-rotated the crop is a centre square spanning
    # both colours left/right; rotated, the colours split top/bottom.
    rotated = decode_bytes(exif_jpeg(halves_image(), 6), SIZE, "center_crop").pixels
    plain = decode_bytes(exif_jpeg(halves_image(), 1), SIZE, "center_crop").pixels
    assert is_red(plain[16, 2]) and is_blue(plain[16, 29])
    assert is_red(rotated[2, 16]) and is_blue(rotated[29, 16])


# ---------------------------------------------------------------- resize


def test_center_crop_keeps_the_middle() -> None:
    array = np.zeros((40, 120, 3), dtype=np.uint8)
    array[:, 40:80] = 255  # white middle third
    out = resize_image(Image.fromarray(array, "RGB"), 20, "center_crop")
    assert out.size == (20, 20)
    assert (np.asarray(out)[:, 2:18] == 255).all()


def test_stretch_keeps_everything() -> None:
    array = np.zeros((40, 120, 3), dtype=np.uint8)
    array[:, :40] = 255
    out = np.asarray(resize_image(Image.fromarray(array, "RGB"), 30, "stretch"))
    assert out.shape == (30, 30, 3)
    assert (out[:, :8] == 255).all() and (out[:, 12:] == 0).all()


def test_large_jpeg_draft_decoding_still_correct() -> None:
    image = Image.new("RGB", (800, 600), (10, 200, 30))
    decoded = decode_bytes(encode(image, "JPEG", quality=95), SIZE)
    assert_rgb(decoded)
    assert (decoded.width, decoded.height) == (800, 600)
    assert np.abs(decoded.pixels.astype(int) - [10, 200, 30]).max() <= 6


# ---------------------------------------------------------------- rejections


def bad_inputs() -> dict[str, tuple[bytes, dict, str]]:
    """name -> (bytes, decode kwargs, word the reason must contain)."""
    jpeg = valid_jpeg(11)
    return {
        "empty": (b"", {}, "empty"),
        "text": (b"this is not an image at all\n" * 4, {}, "not an image"),
        "random_bytes": (np.random.default_rng(5).integers(0, 256, 500, dtype=np.uint8).tobytes(), {},
                         "not an image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], {}, "truncated"),
        "too_small": (encode(random_rgb(12, 8, 8), "PNG"), {}, "too small"),
        "too_small_one_side": (encode(random_rgb(13, 64, 20), "PNG"), {}, "too small"),
        "bomb_warning_range": (jpeg, {"max_pixels": 3000}, "decompression bomb"),  # 4096 px, < 2x limit
        "bomb_error_range": (jpeg, {"max_pixels": 1000}, "decompression bomb"),  # > 2x limit
        "bomb_huge_header": (png_claiming_size(100_000, 100_000), {}, "decompression bomb"),
    }


BAD = bad_inputs()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_rejected_with_reason(name: str) -> None:
    data, kwargs, word = BAD[name]
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRejected, match=word):
        decode_bytes(data, SIZE, **kwargs)
    assert before == Image.MAX_IMAGE_PIXELS  # the global limit is restored


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_rejected_with_reason(tmp_path: Path, name: str) -> None:
    data, kwargs, word = BAD[name]
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageRejected, match=word):
        decode_file(path, SIZE, **kwargs)


def test_corrupt_reason_word() -> None:
    jpeg = valid_jpeg(3)
    with pytest.raises(ImageRejected, match=r"corrupt or truncated"):
        decode_bytes(jpeg[: len(jpeg) // 2], SIZE)


def test_min_side_and_max_pixels_boundaries() -> None:
    data = encode(random_rgb(20, 40, 32), "PNG")
    assert_rgb(decode_bytes(data, SIZE, min_side=32, max_pixels=40 * 32))
    with pytest.raises(ImageRejected, match="too small"):
        decode_bytes(data, SIZE, min_side=33)
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_bytes(data, SIZE, max_pixels=40 * 32 - 1)


def test_image_rejected_is_value_error() -> None:
    assert issubclass(ImageRejected, ValueError)


def test_decode_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected, match="unreadable"):
        decode_file(tmp_path / "missing.png", SIZE)


def test_decode_file_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected, match="unreadable"):
        decode_file(tmp_path, SIZE)


def test_decode_file_matches_decode_bytes(tmp_path: Path) -> None:
    data = valid_jpeg(30, 50, 45)
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    from_file = decode_file(path, SIZE)
    from_bytes = decode_bytes(data, SIZE)
    np.testing.assert_array_equal(from_file.pixels, from_bytes.pixels)
    assert from_file.sha256 == from_bytes.sha256 == hashlib.sha256(data).hexdigest()


def test_decoding_is_deterministic() -> None:
    data = valid_jpeg(31, 70, 50)
    first = decode_bytes(data, SIZE).pixels
    second = decode_bytes(data, SIZE).pixels
    np.testing.assert_array_equal(first, second)
