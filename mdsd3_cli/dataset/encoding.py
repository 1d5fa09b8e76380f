"""Deterministic image encoding and the digests the manifest records (both output layouts write these bytes)."""

from __future__ import annotations

import hashlib
import io
from typing import Any, Literal

import numpy as np
from PIL import Image

ImageFormat = Literal["png", "jpeg", "webp"]
FORMAT_EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
JPEG_444_MIN_QUALITY = 90
"""From this JPEG quality on, chroma is kept at full resolution (4:4:4); below it, 4:2:0."""
WEBP_METHOD = 4


def encode_image(pixels: np.ndarray, fmt: ImageFormat, quality: int = 95, png_compress_level: int = 1) -> bytes:
    """Encode HxWx3 uint8 pixels; the same pixels and settings always give the same bytes (no metadata)."""
    check_pixels(pixels, "pixels")
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, "PNG", compress_level=png_compress_level, optimize=False)
    elif fmt == "jpeg":
        subsampling = 0 if quality >= JPEG_444_MIN_QUALITY else 2
        image.save(buffer, "JPEG", quality=quality, subsampling=subsampling, optimize=False, progressive=False)
    elif fmt == "webp":
        image.save(buffer, "WEBP", quality=quality, method=WEBP_METHOD, lossless=False, exact=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {list(FORMAT_EXTENSIONS)}")
    return buffer.getvalue()


def check_pixels(pixels: np.ndarray, name: str) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        description = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ValueError(f"{name} must be an HxWx3 uint8 array, got {description}")


FileDigest = tuple[str, int]
"""A file's SHA-256 (hex) and size in bytes, as the manifest records them."""


def digest(data: bytes) -> FileDigest:
    """SHA-256 (hex) and size of `data`."""
    return hashlib.sha256(data).hexdigest(), len(data)


def file_digest_fields(role: str, sha256: str, size: int) -> dict[str, Any]:
    """Manifest fields of one written file: `<role>_sha256` and `<role>_bytes` (role: clean or degraded)."""
    return {f"{role}_sha256": sha256, f"{role}_bytes": size}
