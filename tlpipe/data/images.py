"""Decode, validate and resize one image file into a uint8 RGB array.

Pure functions, safe to run in worker processes: no TensorFlow, no global state
beyond Pillow's pixel limit, which is set per call.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ResizeMode = Literal["stretch", "center_crop"]


class ImageRejected(ValueError):
    """An input file that cannot become a training image; the message is the reason."""


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image and what we learned about its file."""

    pixels: np.ndarray  # (size, size, 3) uint8
    sha256: str
    width: int
    height: int
    mode: str


def hash_bytes(data: bytes) -> str:
    """Return the SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (L, P, RGBA, CMYK, I;16, F, ...) to 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(image: Image.Image, size: int, mode: ResizeMode) -> Image.Image:
    """Resize to ``size`` x ``size``: stretch (as the course's ``load_img``) or centre crop."""
    if mode == "stretch":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BILINEAR)
    left = (new_size[0] - size) // 2
    top = (new_size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _open_checked(data: bytes, min_side: int, max_pixels: int) -> Image.Image:
    """Open image bytes, rejecting non-images, bombs and too-small images."""
    if not data:
        raise ImageRejected("empty file")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(f"decompression bomb: more than {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected(f"corrupt or truncated image: {error}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if width * height > max_pixels:
        raise ImageRejected(f"decompression bomb: {width}x{height} exceeds {max_pixels} pixels")
    if min(width, height) < min_side:
        raise ImageRejected(f"too small: {width}x{height}, minimum side is {min_side}")
    return image


def decode_bytes(
    data: bytes, size: int, mode: ResizeMode = "stretch", min_side: int = 32, max_pixels: int = 89_478_485
) -> DecodedImage:
    """Decode image bytes into a validated ``(size, size, 3)`` uint8 RGB array.

    JPEGs are decoded at reduced scale (Pillow draft mode) when that still leaves
    at least ``size`` pixels per side; EXIF orientation is applied.

    Raises:
        ImageRejected: With the reason the file cannot be used.
    """
    image = _open_checked(data, min_side, max_pixels)
    width, height = image.size
    original_mode = image.mode
    try:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = resize_image(_to_rgb(image), size, mode)
        pixels = np.asarray(image, dtype=np.uint8)
    except ImageRejected:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected(f"corrupt or truncated image: {error}") from None
    if pixels.shape != (size, size, 3):
        raise ImageRejected(f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(pixels, hash_bytes(data), width, height, original_mode)


def decode_file(
    path: Path, size: int, mode: ResizeMode = "stretch", min_side: int = 32, max_pixels: int = 89_478_485
) -> DecodedImage:
    """Read and decode one file; see :func:`decode_bytes`."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageRejected(f"unreadable file: {error.strerror or error}") from None
    return decode_bytes(data, size, mode, min_side, max_pixels)


def resize_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 (n, H, W, 3) batch to (n, size, size, 3) with PIL bilinear."""
    if batch.shape[1:3] == (size, size):
        return batch
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
                     for image in batch])
