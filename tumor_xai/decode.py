"""Input decoding: every supported file or in-memory image becomes one grayscale float array.

This is the edge of the package. Whatever a user hands in (a path, bytes, a PIL image, a numpy
array) is decoded here, and every failure becomes :class:`InvalidImageError` with a message a
person can act on. Code past this module trusts its inputs.

What is accepted
    JPEG (and MPO), PNG (8 and 16 bit), BMP, TIFF, WebP and GIF (first frame), recognised by
    content through Pillow; DICOM recognised by content (``DICM`` at byte 128, or a preamble-less
    dataset whose first tag is in group 0002 or 0008), never by file extension.

How intensities are mapped to [0, 1]
    * 8-bit images: ``value / 255``. RGB(A), CMYK, palette and LA images are composited on black
      (the MRI background) and converted with the ITU-R 601 luma weights Pillow uses.
    * 16-bit images and ``uint16`` arrays: divided by ``2**b - 1`` where ``b`` is the smallest bit
      depth (at least 8) that holds the brightest pixel. A 12-bit scan stored in a 16-bit PNG thus
      uses the 12-bit range instead of looking almost black, black stays black, and nothing is
      clipped. (The model's own per-image percentile stretch happens later, in ``preprocess``.)
    * 32-bit integer or float images (TIFF ``I``/``F``): min-max, since they have no nominal range.
    * DICOM: see :mod:`tumor_xai.dicom` (modality LUT, window, MONOCHROME1, colour, middle frame of
      a multi-frame file). pydicom is imported only when a DICOM arrives, so training and
      evaluation on image files run without it.

Limits
    Files over ``max_bytes`` (32 MB), images over ``max_pixels`` (40 MP, checked from the header
    before any pixel is decoded; Pillow's own ``DecompressionBombError`` is mapped too), sides under
    ``min_side`` (16 px) and aspect ratios over 10:1 are refused. Pillow's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (False), so truncated files are refused.

Large images
    An image whose longer side is at least twice ``DECODE_SIDE`` (1024 px) is reduced by an integer
    factor while it is decoded, to a longer side between 1024 and 2047 px: JPEG through Pillow's
    ``draft`` (the decoder's own DCT scaling, so the full-size pixels never exist), other formats
    through ``Image.reduce`` (box average) on the 8/16-bit image, before any float array is made.
    The model sees 224 px and the heatmap is drawn on the decoded image, so nothing downstream
    changes but memory and time; ``info["reduced_from"]`` keeps the original width and height.

Privacy
    DICOM headers are read without patient identifiers; see :mod:`tumor_xai.dicom`.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tumor_xai.inputs import (
    DECODER_ERRORS,
    RETRY,
    SIGNATURES,
    DecodedImage,
    InvalidImageError,
    Limits,
    check_shape,
    min_max,
    rgb_to_gray,
    unreadable,
)

__all__ = [
    "DECODE_SIDE",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "DecodedImage",
    "ImageSource",
    "InvalidImageError",
    "load_image",
]

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 40_000_000
MIN_SIDE = 16
DECODE_SIDE = 1024  # larger images are reduced while decoding to a longer side of 1024-2047 px
_STRIP_PIXELS = 1 << 20  # pixels per strip when reducing an image that was decoded at full size

_PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")  # the JPEG plugin also opens MPO (phone photos)


ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray | DecodedImage


def load_image(
    source: ImageSource,
    *,
    max_bytes: int = MAX_FILE_BYTES,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> DecodedImage:
    """Decode ``source`` into a :class:`DecodedImage`; raise :class:`InvalidImageError` if it can't be.

    ``source`` is a path, the file's bytes, a PIL image, or a numpy array (``uint8``, ``uint16`` or
    float in [0, 1]; H x W, H x W x 1, x 3 or x 4); a :class:`DecodedImage` is returned as it is. Files over ``max_bytes``, images over
    ``max_pixels`` (checked from the header, before the pixels are decoded) and images with a side
    under ``min_side`` pixels are refused.
    """
    limits = Limits(max_bytes, max_pixels, min_side)
    if source is None:
        raise InvalidImageError("No image was given. Choose an image file and try again.")
    if isinstance(source, DecodedImage):
        return source
    if isinstance(source, Image.Image):
        check_shape(source.width, source.height, "This image", limits)
        try:
            return _from_pil(source, source.format or "PIL")
        except DECODER_ERRORS as exc:
            raise InvalidImageError(f"This image could not be converted to grayscale ({exc}).") from exc
    if isinstance(source, np.ndarray):
        return _from_array(source, limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), "The uploaded data", limits)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return _decode_bytes(_read_file(path, limits), f"'{path.name}'", limits)
    raise InvalidImageError(
        f"Cannot read an image from a {type(source).__name__}; pass a file path, bytes, a PIL image or a numpy array."
    )


# ----------------------------------------------------------------------------------------------
# Sources


def _read_file(path: Path, limits: Limits) -> bytes:
    name = f"'{path.name}'"
    if not path.exists():
        raise InvalidImageError(f"There is no file at {path}. Check the path and try again.")
    if path.is_dir():
        raise InvalidImageError(f"{path} is a folder, not an image file. Choose one image file inside it.")
    if not path.is_file():  # a device or a pipe could stream forever
        raise InvalidImageError(f"{path} is not a regular file. Choose an image file.")
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise InvalidImageError(_too_big(name, size, limits))
        with path.open("rb") as f:
            return f.read(limits.max_bytes + 1)  # never more than the limit, even if the file grows
    except OSError as exc:
        raise InvalidImageError(f"Cannot read {name}: {exc.strerror or exc}.") from exc


def _decode_bytes(data: bytes, name: str, limits: Limits) -> DecodedImage:
    if not data:
        raise InvalidImageError(f"{name} is empty (0 bytes). Choose the image file again.")
    if len(data) > limits.max_bytes:
        raise InvalidImageError(_too_big(name, len(data), limits))
    if data[128:132] == b"DICM":
        return _decode_dicom(data, name, limits, force=False)
    decoded = _decode_pil(data, name, limits)
    if decoded is not None:
        return decoded
    if _looks_like_bare_dicom(data):
        return _decode_dicom(data, name, limits, force=True)
    raise InvalidImageError(unreadable(name, data))


def _from_array(arr: np.ndarray, limits: Limits) -> DecodedImage:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise InvalidImageError(f"An image array must be H x W, H x W x 3 or H x W x 4; got shape {arr.shape}.")
    check_shape(arr.shape[1], arr.shape[0], "This image array", limits)
    if arr.dtype == np.uint8:
        values, source = arr.astype(np.float32) / 255.0, "array uint8"
    elif arr.dtype == np.uint16:
        values, source = _scale_by_bit_depth(arr), "array uint16"
    elif np.issubdtype(arr.dtype, np.floating):
        values = arr.astype(np.float32)
        if not np.isfinite(values).all():
            raise InvalidImageError("This image array contains NaN or infinite values.")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidImageError(
                f"A float image array must hold intensities in [0, 1]; this one spans {lo:g} to {hi:g}. "
                "Divide by its maximum (e.g. 255) or pass it as uint8/uint16."
            )
        source = "array float"
    else:
        raise InvalidImageError(
            f"Image arrays of type {arr.dtype} are not supported; pass uint8, uint16, or float values in [0, 1]."
        )
    if values.ndim == 2:
        return DecodedImage(values, "array", 0.0, {"source": source})
    gray, colorfulness = rgb_to_gray(values)
    return DecodedImage(gray, "array", colorfulness, {"source": source})


# ----------------------------------------------------------------------------------------------
# Pillow formats


def _decode_pil(data: bytes, name: str, limits: Limits) -> DecodedImage | None:
    """Decode a Pillow-readable format; ``None`` if Pillow does not recognise the bytes at all."""
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"{name} is too large to decode safely ({exc}).") from exc
    except DECODER_ERRORS as exc:
        fmt = next((f for sig, f in SIGNATURES.items() if data.startswith(sig)), "image")
        raise InvalidImageError(_damaged(name, fmt, exc, part="header")) from exc
    fmt = "JPEG" if img.format == "MPO" else (img.format or "image")
    with img:
        check_shape(img.width, img.height, name, limits)
        try:
            size = img.size
            factor = _reduction(size)
            if factor > 1 and fmt == "JPEG":  # DCT scaling by 1/2, 1/4 or 1/8: the full image is never made
                img.draft(img.mode, (size[0] // factor, size[1] // factor))
            img.load()  # first frame only, for GIF and multi-page TIFF
            animated = getattr(img, "is_animated", False)
            reduced = _reduce(img)
            decoded = _from_pil(reduced, fmt)
            if reduced.size != size:
                decoded.info["reduced_from"] = size
            if animated:
                decoded.info["frame"] = "first frame of a multi-frame file"
        except DECODER_ERRORS as exc:
            raise InvalidImageError(_damaged(name, fmt, exc)) from exc
    logger.debug("decoded %s %dx%d", decoded.info.get("source"), decoded.size[1], decoded.size[0])
    return decoded


def _reduction(size: tuple[int, int]) -> int:
    """The integer factor that brings the longer side of ``size`` to [DECODE_SIDE, 2 * DECODE_SIDE)."""
    return max(1, max(size) // DECODE_SIDE)


def _reduce(img: Image.Image) -> Image.Image:
    """``img`` box-averaged by :func:`_reduction` of its (possibly drafted) size, still 8/16-bit.

    Done in strips of rows, a multiple of the factor high, so the result is the same as one
    ``Image.reduce`` while no second full-size copy exists (Pillow converts RGBA to premultiplied
    RGBa for it, and palette or 16-bit images need a conversion first: 144 MB each for a 6000 px PNG).
    """
    factor = _reduction(img.size)
    if factor == 1:
        return img
    mode = img.mode
    if mode == "P":  # average colours, not palette indices
        mode = "RGBA" if "transparency" in img.info else "RGB"
    elif mode == "1":
        mode = "L"
    elif mode.startswith("I;16"):  # Image.reduce has no 16-bit mode; int32 holds it exactly
        mode = "I"
    width, height = img.size
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, _STRIP_PIXELS // (width * factor))
    for top in range(0, height, rows):
        strip = img.crop((0, top, width, min(height, top + rows)))
        out.paste(strip.convert(mode).reduce(factor), (0, top // factor))
    return out.convert(img.mode) if img.mode.startswith("I;16") else out


def _from_pil(img: Image.Image, fmt: str) -> DecodedImage:
    """A loaded PIL image (any mode) -> :class:`DecodedImage`, honouring EXIF orientation."""
    if img.getexif().get(0x0112, 1) != 1:  # orientation tag: transpose only when it asks for it
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    info: dict[str, Any] = {"mode": mode, "source": fmt}
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        info["source"] = f"{fmt} 16-bit" if mode.startswith("I;16") else f"{fmt} 32-bit"
        if mode.startswith("I;16") or (mode == "I" and arr.min() >= 0 and arr.max() < 2**16):
            return DecodedImage(_scale_by_bit_depth(arr), fmt, 0.0, info)
        return DecodedImage(min_max(arr.astype(np.float64)), fmt, 0.0, info)
    if mode == "L":
        return DecodedImage(np.asarray(img, dtype=np.float32) / 255.0, fmt, 0.0, info)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        rgb = rgba[..., :3] * rgba[..., 3:]  # composite on black, the MRI background
    else:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    gray, colorfulness = rgb_to_gray(rgb)
    return DecodedImage(gray, fmt, colorfulness, info)


def _damaged(name: str, fmt: str, exc: BaseException, part: str = "image data") -> str:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or any(
        w in text for w in ("truncated", "ends early", "broken data stream", "end of file")
    ):
        return f"{name} is a truncated {fmt}: the {part} ends early. {RETRY}"
    return f"{name} is a damaged {fmt}: its {part} could not be decoded ({exc}). {RETRY}"


# ----------------------------------------------------------------------------------------------
# DICOM


def _looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM dataset without the 128-byte preamble starts with a tag of group 0002 or 0008."""
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def _decode_dicom(data: bytes, name: str, limits: Limits, *, force: bool) -> DecodedImage:
    try:
        from tumor_xai import dicom  # imports pydicom: only when a DICOM arrives
    except ImportError:
        dicom = None  # refused outside the handler, without the import error as context
    if dicom is None:
        raise InvalidImageError(
            f"{name} is a DICOM file, and reading DICOM needs the pydicom package, which is not installed here. "
            "Install it (pip install pydicom) or export the slice as PNG."
        )
    return dicom.decode_dicom(data, name, limits, force=force)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _too_big(name: str, size: int, limits: Limits) -> str:
    return (
        f"{name} is {size / 2**20:.1f} MB, more than the {limits.max_bytes / 2**20:g} MB this tool accepts. "
        "Export a single slice (PNG or JPEG) and try again."
    )


def _scale_by_bit_depth(arr: np.ndarray) -> np.ndarray:
    """Unsigned integers -> [0, 1] by the smallest bit depth (>= 8) that holds the maximum."""
    top = int(arr.max()) if arr.size else 0
    bits = max(8, top.bit_length())
    return (arr.astype(np.float32) / float(2**bits - 1)).astype(np.float32)
