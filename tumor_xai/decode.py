"""Input decoding: every supported file or in-memory image becomes one grayscale float array.

This is the edge of the package. Whatever a user hands in (a path, bytes, a PIL image, a numpy
array) is decoded here, and every failure becomes :class:`InvalidImageError` with a message a
person can act on. Code past this module trusts its inputs.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DecodedImage", "ImageSource", "InvalidImageError", "load_image"]

logger = logging.getLogger(__name__)

ImageSource = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 40_000_000


class InvalidImageError(ValueError):
    """The input could not be read as an image the model can take."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded slice: grayscale intensities in [0, 1], plus how colourful the original was."""

    gray: np.ndarray  # float32, H x W, values in [0, 1]
    format: str
    colorfulness: float = 0.0  # mean HSV-style saturation of the original; 0 for grayscale
    info: dict = field(default_factory=dict)  # non-identifying facts (mode, bit depth, ...)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.gray.shape[0], self.gray.shape[1]


def _from_pil(img: Image.Image, fmt: str) -> DecodedImage:
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        gray = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return DecodedImage(gray.astype(np.float32), fmt, 0.0, {"mode": mode})
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    colorfulness = float(np.mean(mx - mn))
    gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return DecodedImage(gray, fmt, colorfulness, {"mode": mode})


def load_image(source: ImageSource) -> DecodedImage:
    """Decode ``source`` into a :class:`DecodedImage`; raise :class:`InvalidImageError` if it can't be."""
    if isinstance(source, Image.Image):
        return _from_pil(source, source.format or "PIL")
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            arr = arr[..., :3]
        if arr.dtype == np.uint8:
            return _from_pil(Image.fromarray(arr), "array")
        arr = arr.astype(np.float32)
        if arr.ndim == 3:
            arr = arr.mean(axis=2)
        return DecodedImage(np.clip(arr, 0.0, 1.0), "array")
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        name = "the uploaded data"
    else:
        path = Path(source)
        name = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidImageError(f"Cannot read {name}: {exc.strerror or exc}.") from exc
    if not data:
        raise InvalidImageError(f"{name} is empty.")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _from_pil(img, img.format or "unknown")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{name} is not an image this tool can read ({exc}).") from exc
