"""What every input reader shares: the decoded-image type, the one error type, limits and pixel helpers.

:mod:`tumor_xai.decode` (single images), :mod:`tumor_xai.dicom` (DICOM files and series) and
:mod:`tumor_xai.volume` (NIfTI and DICOM volumes) all build on these names, and none of them imports
another's private ones: decode calls into dicom, never the other way round.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "DECODER_ERRORS",
    "MAX_ASPECT",
    "RETRY",
    "SUPPORTED",
    "DecodedImage",
    "InvalidImageError",
    "Limits",
    "check_shape",
    "describe",
    "min_max",
    "rgb_to_gray",
    "unreadable",
]

MAX_ASPECT = 10.0  # a slice is roughly square; a 20:1 strip is not an MRI slice
SUPPORTED = "JPEG, PNG, BMP, TIFF, WebP, GIF or DICOM"
RETRY = "Re-export the image and try again."
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Decoders of untrusted bytes (Pillow's plugins, pydicom's parser, nibabel) raise a wide range of types
# on malformed input; these are the ones seen, and the fuzz test in tests/test_decode.py pins them
# (``tumor_xai.dicom`` adds pydicom's own two).
DECODER_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    LookupError,
    ArithmeticError,
    EOFError,
    struct.error,
    zlib.error,
    AttributeError,
    RuntimeError,
    NotImplementedError,
    Image.DecompressionBombError,
    MemoryError,
)


class InvalidImageError(ValueError):
    """The input could not be read as an image the model can take."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded slice: grayscale intensities in [0, 1], plus how colourful the original was."""

    gray: np.ndarray  # float32, H x W, values in [0, 1]
    format: str  # "JPEG", "PNG", ..., "DICOM", "array", "PIL"
    colorfulness: float = 0.0  # mean over pixels of (max - min) across R, G, B, in [0, 1]; 0 for gray
    info: dict = field(default_factory=dict)  # non-identifying facts: source, mode, bit depth, window ...

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.gray.shape[0], self.gray.shape[1]


@dataclass(frozen=True)
class Limits:
    """What one decoded image may be: bytes of the file, pixels, and the shortest side."""

    max_bytes: int
    max_pixels: int
    min_side: int


def check_shape(width: int, height: int, name: str, limits: Limits) -> None:
    """Refuse (InvalidImageError) an image over ``limits.max_pixels``, under ``min_side`` or too elongated."""
    if width * height > limits.max_pixels:
        raise InvalidImageError(
            f"{name} is {width} x {height} pixels, more than the {limits.max_pixels / 1e6:g} megapixels this tool "
            "accepts. Downscale it (an MRI slice needs well under 1 megapixel) and try again."
        )
    if min(width, height) < limits.min_side:
        raise InvalidImageError(
            f"{name} is only {width} x {height} pixels; an MRI slice needs at least "
            f"{limits.min_side} x {limits.min_side}. Use the original image, not a thumbnail."
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InvalidImageError(
            f"{name} is {width} x {height} pixels, too elongated to be one MRI slice. Crop it to the slice and try again."
        )


def min_max(values: np.ndarray) -> np.ndarray:
    """``values`` stretched so its finite minimum is 0 and maximum 1 (float32; all zeros when flat)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    out = (np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def rgb_to_gray(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """(H, W, 3|4) floats in [0, 1] -> (luma, colourfulness); an alpha channel is composited on black."""
    if rgb.shape[2] == 4:
        rgb = rgb[..., :3] * rgb[..., 3:]
    colorfulness = float(np.mean(rgb.max(axis=2) - rgb.min(axis=2)))
    gray = np.clip(rgb @ _LUMA, 0.0, 1.0).astype(np.float32)
    return gray, colorfulness


SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def unreadable(name: str, data: bytes) -> str:
    """The message for bytes no decoder recognised, saying what they look like."""
    fmt = next((f for sig, f in SIGNATURES.items() if data.startswith(sig)), None)
    if fmt is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "WebP"
    if fmt is not None:  # the right magic bytes, but Pillow could not even read the header
        return f"{name} starts like a {fmt} file but is truncated or damaged. {RETRY}"
    return f"{name} is not an image this tool can read: {describe(data)}. Use a {SUPPORTED} file."


def describe(data: bytes) -> str:
    """What the bytes look like, for an error message."""
    head = data[:512]
    if head.startswith(b"%PDF"):
        return "it is a PDF document; export the slice as PNG or JPEG"
    if head.startswith(b"PK\x03\x04"):
        return "it is a ZIP archive; unzip it and choose one image (the Scan tab reads a zip of a DICOM series)"
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed (a .gz file, e.g. a NIfTI volume: the Scan tab reads whole volumes)"
    if len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "it is a NIfTI volume; the Scan tab (or Predictor.predict_volume) reads whole volumes"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "it is a HEIC/AVIF photo; export it as JPEG or PNG"
    text = head.decode("utf-8", errors="replace")
    if sum((c.isprintable() or c.isspace()) and c != "\ufffd" for c in text) >= 0.95 * len(text):
        return "it contains text, not image data"
    return f"its content is not {SUPPORTED}"
