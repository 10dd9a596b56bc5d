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
    * DICOM: the modality LUT (rescale slope/intercept) and then the VOI LUT or the first window in
      the file are applied with :mod:`pydicom.pixels`, and the window's output range is mapped to
      [0, 1]; without a window the full range of the rescaled values is used (min-max).
      MONOCHROME1 is inverted; RGB, YBR and PALETTE COLOR are converted to gray. Multi-frame
      datasets: only the middle frame is decoded, and ``info["frame"]`` says which one. Windows
      held only in per-frame functional groups (enhanced MR/CT) are not read: full range there.
    * DICOM transfer syntaxes: whatever pydicom decodes with the installed packages (uncompressed
      little/big endian, deflate, RLE; JPEG baseline/extended 8-bit and JPEG 2000 through Pillow).
      Others (JPEG-LS, lossless JPEG, HTJ2K without their plugins) are refused with a message naming
      the transfer syntax and the package it would need.

Limits
    Files over ``max_bytes`` (32 MB), images over ``max_pixels`` (40 MP, checked from the header
    before any pixel is decoded; Pillow's own ``DecompressionBombError`` is mapped too), sides under
    ``min_side`` (16 px) and aspect ratios over 10:1 are refused. Pillow's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (False), so truncated files are refused.

Privacy
    Only the DICOM elements needed to rebuild the pixels are parsed (``specific_tags``), so patient
    names and IDs are never turned into values, logged, returned in ``info`` or put into an error
    message; ``info`` carries a whitelist of non-identifying facts, with code strings echoed only
    from closed sets. pydicom's value validation (whose warnings quote values) is off during our
    reads, and DICOM refusals are raised without a chained library exception.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = [
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
MAX_ASPECT = 10.0  # a slice is roughly square; a 20:1 strip is not an MRI slice

_PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")  # the JPEG plugin also opens MPO (phone photos)
_SUPPORTED = "JPEG, PNG, BMP, TIFF, WebP, GIF or DICOM"
_RETRY = "Re-export the image and try again."
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Decoders of untrusted bytes (Pillow's plugins, pydicom's parser) raise a wide range of types on
# malformed input; these are the ones seen, and the fuzz test in tests/test_decode.py pins them.
_DECODER_ERRORS = (
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
    InvalidDicomError,
    BytesLengthException,
    Image.DecompressionBombError,
    MemoryError,
)

# The only DICOM elements parsed: pixel module, LUTs and a few non-identifying descriptors.
_DICOM_TAGS = [
    "Modality",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
]
# Header values echoed in ``info`` and messages come from these closed sets, never as free text.
_MODALITIES = frozenset(
    "MR CT PT NM US CR DX MG XA RF OT SC SEG SR PR KO DOC ES XC OP OPT IO PX GM SM BI"
    " RTIMAGE RTDOSE RTPLAN RTSTRUCT RTRECORD REG".split()
)
_NON_IMAGE_MODALITIES = frozenset("SR PR KO DOC REG RTPLAN RTSTRUCT RTRECORD".split())
_PHOTOMETRIC = frozenset(
    "MONOCHROME1 MONOCHROME2 RGB YBR_FULL YBR_FULL_422 YBR_ICT YBR_RCT YBR_PARTIAL_420".split() + ["PALETTE COLOR"]
)
_UID_STRING = re.compile(r"^[0-9.]{1,64}$")
_DICOM_LOCK = threading.Lock()


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


ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray | DecodedImage


@dataclass(frozen=True)
class _Limits:
    max_bytes: int
    max_pixels: int
    min_side: int


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
    limits = _Limits(max_bytes, max_pixels, min_side)
    if source is None:
        raise InvalidImageError("No image was given. Choose an image file and try again.")
    if isinstance(source, DecodedImage):
        return source
    if isinstance(source, Image.Image):
        _check_shape(source.width, source.height, "This image", limits)
        try:
            return _from_pil(source, source.format or "PIL")
        except _DECODER_ERRORS as exc:
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


def _read_file(path: Path, limits: _Limits) -> bytes:
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


def _decode_bytes(data: bytes, name: str, limits: _Limits) -> DecodedImage:
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
    raise InvalidImageError(_unreadable(name, data))


def _from_array(arr: np.ndarray, limits: _Limits) -> DecodedImage:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise InvalidImageError(f"An image array must be H x W, H x W x 3 or H x W x 4; got shape {arr.shape}.")
    _check_shape(arr.shape[1], arr.shape[0], "This image array", limits)
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
    gray, colorfulness = _rgb_to_gray(values)
    return DecodedImage(gray, "array", colorfulness, {"source": source})


# ----------------------------------------------------------------------------------------------
# Pillow formats


def _decode_pil(data: bytes, name: str, limits: _Limits) -> DecodedImage | None:
    """Decode a Pillow-readable format; ``None`` if Pillow does not recognise the bytes at all."""
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"{name} is too large to decode safely ({exc}).") from exc
    except _DECODER_ERRORS as exc:
        fmt = next((f for sig, f in _SIGNATURES.items() if data.startswith(sig)), "image")
        raise InvalidImageError(_damaged(name, fmt, exc, part="header")) from exc
    fmt = "JPEG" if img.format == "MPO" else (img.format or "image")
    with img:
        _check_shape(img.width, img.height, name, limits)
        try:
            img.load()  # first frame only, for GIF and multi-page TIFF
            decoded = _from_pil(img, fmt)
            if getattr(img, "is_animated", False):
                decoded.info["frame"] = "first frame of a multi-frame file"
        except _DECODER_ERRORS as exc:
            raise InvalidImageError(_damaged(name, fmt, exc)) from exc
    logger.debug("decoded %s %dx%d", decoded.info.get("source"), decoded.size[1], decoded.size[0])
    return decoded


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
        return DecodedImage(_min_max(arr.astype(np.float64)), fmt, 0.0, info)
    if mode == "L":
        return DecodedImage(np.asarray(img, dtype=np.float32) / 255.0, fmt, 0.0, info)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        rgb = rgba[..., :3] * rgba[..., 3:]  # composite on black, the MRI background
    else:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    gray, colorfulness = _rgb_to_gray(rgb)
    return DecodedImage(gray, fmt, colorfulness, info)


def _damaged(name: str, fmt: str, exc: BaseException, part: str = "image data") -> str:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or any(
        w in text for w in ("truncated", "ends early", "broken data stream", "end of file")
    ):
        return f"{name} is a truncated {fmt}: the {part} ends early. {_RETRY}"
    return f"{name} is a damaged {fmt}: its {part} could not be decoded ({exc}). {_RETRY}"


# ----------------------------------------------------------------------------------------------
# DICOM


def _looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM dataset without the 128-byte preamble starts with a tag of group 0002 or 0008."""
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def _decode_dicom(data: bytes, name: str, limits: _Limits, *, force: bool) -> DecodedImage:
    # pydicom's value validation warns (and logs) with the offending value quoted; in a damaged file
    # that value can run into neighbouring elements, patient name included. Validation is switched
    # off for the duration of our read only; pydicom's setting is global, hence the lock.
    with _DICOM_LOCK, pydicom.config.disable_value_validation():
        return _decode_dicom_unlocked(data, name, limits, force=force)


def _decode_dicom_unlocked(data: bytes, name: str, limits: _Limits, *, force: bool) -> DecodedImage:
    # A library message could quote header values, so the refusal is raised *outside* the
    # ``except`` block: the InvalidImageError carries neither a __cause__ nor a __context__.
    stage = "header"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force, specific_tags=_DICOM_TAGS)
        ds.walk(lambda *_: None)  # elements are parsed lazily; parse them all now, while errors mean "header"
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            if force:  # preamble-less guess: most likely not DICOM at all
                raise InvalidImageError(_unreadable(name, data))
            raise InvalidImageError(_no_pixels(name, ds))
        ts = _transfer_syntax(ds)
        _check_decoder(ts, name)
        info = _dicom_info(ds, ts, name)
        _check_shape(info["Columns"], info["Rows"], name, limits)
        frames = info["NumberOfFrames"]
        index = frames // 2 if frames > 1 else None
        if index is not None:
            info["frame"] = f"middle frame {index + 1} of {frames}"
        stage = "pixels"
        arr = pixel_array(ds, index=index)
        stage = "values"
        gray, colorfulness = _dicom_to_gray(arr, ds, info)
    except InvalidImageError:
        raise
    except _DECODER_ERRORS as exc:
        logger.debug("DICOM %s failed: %s", stage, type(exc).__name__)
        failure = _dicom_failure(name, stage, exc, ds.file_meta.get("TransferSyntaxUID") if stage != "header" else None)
    else:
        failure = None
    if failure:
        raise InvalidImageError(failure)
    if gray.ndim != 2 or not np.isfinite(gray).all():
        raise InvalidImageError(f"{name} is a DICOM file whose pixel data did not decode to one 2-D slice.")
    logger.debug("decoded %s %dx%d (%s)", info["source"], info["Columns"], info["Rows"], info["TransferSyntax"])
    return DecodedImage(gray.astype(np.float32), "DICOM", colorfulness, info)


def _dicom_failure(name: str, stage: str, exc: BaseException, ts: UID | None) -> str:
    """The message for a DICOM that failed at ``stage``; never quotes the library's own message."""
    if stage == "header":
        return (
            f"{name} looks like a DICOM file, but its header could not be read: it is truncated or damaged. "
            "Export the slice from the PACS or viewer again and try again."
        )
    if stage == "pixels" and ("less than expected" in str(exc) or isinstance(exc, EOFError)):
        reason = "its pixel data is shorter than its header says, so the file is truncated"
    elif stage == "pixels" and ts is not None and UID(ts).is_compressed:
        reason = f"its {_ts_name(UID(ts))} pixel data could not be decoded by the installed decoders"
    else:
        reason = f"its pixel data could not be decoded ({type(exc).__name__})"
    return f"{name} is a DICOM file, but {reason}. Export the slice again and try again."


def _dicom_info(ds: pydicom.Dataset, ts: UID, name: str) -> dict[str, Any]:
    """The whitelisted, non-identifying facts about a DICOM slice."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    except (AttributeError, TypeError, ValueError):
        rows = cols = frames = bits = 0  # refused just below
    if min(rows, cols, frames) < 1 or not 1 <= bits <= 32:
        raise InvalidImageError(f"{name} is a DICOM file whose image size or bit depth is missing or invalid. {_RETRY}")
    modality = _code(ds.get("Modality"), _MODALITIES)
    return {
        "source": f"DICOM {modality}",
        "Modality": modality,
        "PhotometricInterpretation": _code(ds.get("PhotometricInterpretation"), _PHOTOMETRIC),
        "BitsStored": bits,
        "Rows": rows,
        "Columns": cols,
        "NumberOfFrames": frames,
        "TransferSyntax": _ts_name(ts),
    }


def _check_decoder(ts: UID, name: str) -> None:
    """Refuse, naming the transfer syntax, what pydicom cannot decode with the installed packages."""
    decoder = None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        pass  # refused below, outside the handler, so no library message rides along as __context__
    if decoder is None:
        raise InvalidImageError(
            f"{name} stores its pixels as {_ts_name(ts)}, which this tool cannot decode. "
            "Export it uncompressed (Explicit VR Little Endian) and try again."
        )
    if not decoder.is_available:
        needs = "; or ".join(decoder.missing_dependencies)
        raise InvalidImageError(
            f"{name} stores its pixels as {_ts_name(ts)}, which needs an extra decoder package ({needs}). "
            "Export it uncompressed (Explicit VR Little Endian) or as PNG and try again."
        )


def _dicom_to_gray(arr: np.ndarray, ds: pydicom.Dataset, info: dict[str, Any]) -> tuple[np.ndarray, float]:
    photometric, bits = info["PhotometricInterpretation"], info["BitsStored"]
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(arr, ds)
        gray = _apply_window(values, ds, info)
        if photometric == "MONOCHROME1":  # 0 means white in MONOCHROME1
            gray = 1.0 - gray
        return gray, 0.0
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype == np.uint16 else 8
    elif not (photometric == "RGB" or photometric.startswith("YBR")):  # pixel_array turns YBR into RGB
        raise InvalidImageError(
            f"This DICOM file uses a photometric interpretation ({photometric}) that this tool does not support; "
            "export it as MONOCHROME2 or RGB."
        )
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidImageError("This DICOM file's colour pixel data is not one RGB slice.")
    rgb = np.clip(arr.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)
    return _rgb_to_gray(rgb)


def _apply_window(values: np.ndarray, ds: pydicom.Dataset, info: dict[str, Any]) -> np.ndarray:
    """VOI LUT or the first window -> [0, 1]; the full rescaled range when the file has neither."""
    lut = ds.get("VOILUTSequence")
    has_lut = bool(lut) and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]  # pydicom's own test
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        info["window"] = "full range (no window in the file)"
        return _min_max(values.astype(np.float64))
    try:
        out = apply_voi_lut(values, ds, index=0)
        lo, hi = _voi_output_range(ds, has_lut)
    except (ValueError, TypeError, LookupError, ArithmeticError, NotImplementedError) as exc:
        # A broken window in an otherwise good scan: show it, and say so in info and the log.
        logger.warning("ignoring the DICOM window: %s", type(exc).__name__)
        info["window"] = "full range (the file's window is invalid)"
        return _min_max(values.astype(np.float64))
    if has_lut:
        info["window"] = "VOI LUT"
    else:
        info["window"] = f"center {_first(ds.WindowCenter):g}, width {_first(ds.WindowWidth):g}"
    if hi <= lo:
        return _min_max(out.astype(np.float64))
    return np.clip((out.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _voi_output_range(ds: pydicom.Dataset, has_lut: bool) -> tuple[float, float]:
    """The output range pydicom's VOI LUT / windowing maps into (PS3.3 C.11.2, as pydicom implements it)."""
    if has_lut:
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation") or 0) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:  # no file meta: the encoding the parser detected is the transfer syntax
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    return UID(ts)


def _ts_name(ts: UID) -> str:
    if ts.is_transfer_syntax:
        return ts.name
    return f"the unrecognised transfer syntax {ts}" if _UID_STRING.match(str(ts)) else "an unrecognised transfer syntax"


def _code(value: object, known: frozenset[str]) -> str:
    """A DICOM code string, echoed only if it is one of the ``known`` terms (never free text from the header)."""
    text = str(value).strip().upper() if value is not None else ""
    return text if text in known else "other"


def _first(value: object) -> float:
    return float(value[0]) if isinstance(value, (list, tuple, MultiValue)) else float(value)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _check_shape(width: int, height: int, name: str, limits: _Limits) -> None:
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


def _too_big(name: str, size: int, limits: _Limits) -> str:
    return (
        f"{name} is {size / 2**20:.1f} MB, more than the {limits.max_bytes / 2**20:g} MB this tool accepts. "
        "Export a single slice (PNG or JPEG) and try again."
    )


def _scale_by_bit_depth(arr: np.ndarray) -> np.ndarray:
    """Unsigned integers -> [0, 1] by the smallest bit depth (>= 8) that holds the maximum."""
    top = int(arr.max()) if arr.size else 0
    bits = max(8, top.bit_length())
    return (arr.astype(np.float32) / float(2**bits - 1)).astype(np.float32)


def _min_max(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    out = (np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _rgb_to_gray(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """(H, W, 3|4) floats in [0, 1] -> (luma, colourfulness); an alpha channel is composited on black."""
    if rgb.shape[2] == 4:
        rgb = rgb[..., :3] * rgb[..., 3:]
    colorfulness = float(np.mean(rgb.max(axis=2) - rgb.min(axis=2)))
    gray = np.clip(rgb @ _LUMA, 0.0, 1.0).astype(np.float32)
    return gray, colorfulness


_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _unreadable(name: str, data: bytes) -> str:
    """The message for bytes no decoder recognised, saying what they look like."""
    fmt = next((f for sig, f in _SIGNATURES.items() if data.startswith(sig)), None)
    if fmt is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "WebP"
    if fmt is not None:  # the right magic bytes, but Pillow could not even read the header
        return f"{name} starts like a {fmt} file but is truncated or damaged. {_RETRY}"
    return f"{name} is not an image this tool can read: {_describe(data)}. Use a {_SUPPORTED} file."


def _no_pixels(name: str, ds: pydicom.Dataset) -> str:
    modality = _code(ds.get("Modality"), _MODALITIES)
    if "Rows" in ds or modality in _MODALITIES - _NON_IMAGE_MODALITIES:  # an image whose file ends early
        return f"{name} is a truncated DICOM file: it ends before its pixel data. Export the slice again and try again."
    if modality == "other":
        return (
            f"{name} is a DICOM file without image pixels: it is truncated, or it is not an image object. "
            "Export the slice again and try again."
        )
    return (
        f"{name} is a DICOM file without image pixels (modality {modality}), e.g. a report or a structure set. "
        "Choose an image series file instead."
    )


def _describe(data: bytes) -> str:
    """What the bytes look like, for the error message."""
    head = data[:512]
    if head.startswith(b"%PDF"):
        return "it is a PDF document; export the slice as PNG or JPEG"
    if head.startswith(b"PK\x03\x04"):
        return "it is a ZIP archive; unzip it and choose one image"
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed (a .gz file, e.g. a NIfTI volume); decompress it and export one slice"
    if len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "it is a NIfTI volume; export one axial slice as PNG or DICOM"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "it is a HEIC/AVIF photo; export it as JPEG or PNG"
    text = head.decode("utf-8", errors="replace")
    if sum((c.isprintable() or c.isspace()) and c != "\ufffd" for c in text) >= 0.95 * len(text):
        return "it contains text, not image data"
    return f"its content is not {_SUPPORTED}"
