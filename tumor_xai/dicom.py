"""DICOM decoding, loaded only when a DICOM file arrives (training on image files needs no pydicom).

:func:`tumor_xai.decode.load_image` recognises DICOM by content and calls :func:`decode_dicom`.

How intensities are mapped to [0, 1]
    The modality LUT (rescale slope/intercept) and then the VOI LUT or the first window in the file
    are applied with :mod:`pydicom.pixels`, and the window's output range is mapped to [0, 1];
    without a window the full range of the rescaled values is used (min-max). MONOCHROME1 is
    inverted; RGB, YBR and PALETTE COLOR are converted to gray. Multi-frame datasets: only the
    middle frame is decoded, and ``info["frame"]`` says which one. Windows held only in per-frame
    functional groups (enhanced MR/CT) are not read: full range there.

Transfer syntaxes
    Whatever pydicom decodes with the installed packages (uncompressed little/big endian, deflate,
    RLE; JPEG baseline/extended 8-bit and JPEG 2000 through Pillow). Others (JPEG-LS, lossless JPEG,
    HTJ2K without their plugins) are refused with a message naming the transfer syntax and the
    package it would need.

Privacy
    Only the DICOM elements needed to rebuild the pixels are parsed (``specific_tags``), so patient
    names and IDs are never turned into values, logged, returned in ``info`` or put into an error
    message; ``info`` carries a whitelist of non-identifying facts, with code strings (modality,
    body part, photometric interpretation) echoed only from closed sets. pydicom's value validation
    (whose warnings quote values) is off during our reads, and DICOM refusals are raised without a
    chained library exception.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tumor_xai.inputs import (
    DECODER_ERRORS,
    RETRY,
    DecodedImage,
    InvalidImageError,
    Limits,
    check_shape,
    min_max,
    rgb_to_gray,
    unreadable,
)

__all__ = ["BODY_PARTS", "MODALITIES", "decode_dicom"]

logger = logging.getLogger(__name__)

_DICOM_ERRORS = (*DECODER_ERRORS, InvalidDicomError, BytesLengthException)

# The only DICOM elements parsed: pixel module, LUTs and a few non-identifying descriptors.
_DICOM_TAGS = [
    "Modality",
    "BodyPartExamined",
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
MODALITIES = frozenset(
    "MR CT PT NM US CR DX MG XA RF OT SC SEG SR PR KO DOC ES XC OP OPT IO PX GM SM BI"
    " RTIMAGE RTDOSE RTPLAN RTSTRUCT RTRECORD REG".split()
)
_NON_IMAGE_MODALITIES = frozenset("SR PR KO DOC REG RTPLAN RTSTRUCT RTRECORD".split())
# Body Part Examined defined terms (PS3.16 Annex L, a selection), compared without spaces; which of
# them fit a brain MRI is decided in ``tumor_xai.ood``.
BODY_PARTS = frozenset(
    "HEAD BRAIN SKULL HEADNECK SELLA IAC NECK ORBIT EYE EAR FACE JAW TMJ SINUS NOSE CSPINE TSPINE LSPINE"
    " SSPINE COCCYX SPINE CHEST THORAX LUNG HEART AORTA BREAST RIB STERNUM ABDOMEN ABDOMENPELVIS CHESTABDOMEN"
    " CHESTABDPELVIS PELVIS LIVER KIDNEY PANCREAS SPLEEN GALLBLADDER BLADDER PROSTATE UTERUS OVARY BOWEL COLON"
    " SHOULDER CLAVICLE SCAPULA ARM UPRARM ELBOW FOREARM WRIST HAND FINGER HIP LEG THIGH KNEE ANKLE FOOT TOE"
    " EXTREMITY UPREXM LOWREXM WHOLEBODY".split()
)
_PHOTOMETRIC = frozenset(
    "MONOCHROME1 MONOCHROME2 RGB YBR_FULL YBR_FULL_422 YBR_ICT YBR_RCT YBR_PARTIAL_420".split() + ["PALETTE COLOR"]
)
_UID_STRING = re.compile(r"^[0-9.]{1,64}$")
_DICOM_LOCK = threading.Lock()


def decode_dicom(data: bytes, name: str, limits: Limits, *, force: bool) -> DecodedImage:
    """Decode DICOM ``data`` (``force``: no preamble, recognised by its first tag) or raise InvalidImageError."""
    # pydicom's value validation warns (and logs) with the offending value quoted; in a damaged file
    # that value can run into neighbouring elements, patient name included. Validation is switched
    # off for the duration of our read only; pydicom's setting is global, hence the lock.
    with _DICOM_LOCK, pydicom.config.disable_value_validation():
        return _decode_dicom_unlocked(data, name, limits, force=force)


def _decode_dicom_unlocked(data: bytes, name: str, limits: Limits, *, force: bool) -> DecodedImage:
    # A library message could quote header values, so the refusal is raised *outside* the
    # ``except`` block: the InvalidImageError carries neither a __cause__ nor a __context__.
    stage = "header"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force, specific_tags=_DICOM_TAGS)
        ds.walk(lambda *_: None)  # elements are parsed lazily; parse them all now, while errors mean "header"
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            if force:  # preamble-less guess: most likely not DICOM at all
                raise InvalidImageError(unreadable(name, data))
            raise InvalidImageError(_no_pixels(name, ds))
        ts = _transfer_syntax(ds)
        _check_decoder(ts, name)
        info = _dicom_info(ds, ts, name)
        check_shape(info["Columns"], info["Rows"], name, limits)
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
    except _DICOM_ERRORS as exc:
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
        raise InvalidImageError(f"{name} is a DICOM file whose image size or bit depth is missing or invalid. {RETRY}")
    modality = _code(ds.get("Modality"), MODALITIES)
    info = {
        "source": f"DICOM {modality}",
        "Modality": modality,
        "PhotometricInterpretation": _code(ds.get("PhotometricInterpretation"), _PHOTOMETRIC),
        "BitsStored": bits,
        "Rows": rows,
        "Columns": cols,
        "NumberOfFrames": frames,
        "TransferSyntax": _ts_name(ts),
    }
    body_part = ds.get("BodyPartExamined")
    if body_part:  # echoed only from the closed set; free text becomes "other"
        info["BodyPartExamined"] = _code(re.sub(r"[\s_^-]", "", str(body_part)), BODY_PARTS)
    return info


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
    return rgb_to_gray(rgb)


def _apply_window(values: np.ndarray, ds: pydicom.Dataset, info: dict[str, Any]) -> np.ndarray:
    """VOI LUT or the first window -> [0, 1]; the full rescaled range when the file has neither."""
    lut = ds.get("VOILUTSequence")
    has_lut = bool(lut) and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]  # pydicom's own test
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        info["window"] = "full range (no window in the file)"
        return min_max(values.astype(np.float64))
    try:
        out = apply_voi_lut(values, ds, index=0)
        lo, hi = _voi_output_range(ds, has_lut)
    except (ValueError, TypeError, LookupError, ArithmeticError, NotImplementedError) as exc:
        # A broken window in an otherwise good scan: show it, and say so in info and the log.
        logger.warning("ignoring the DICOM window: %s", type(exc).__name__)
        info["window"] = "full range (the file's window is invalid)"
        return min_max(values.astype(np.float64))
    if has_lut:
        info["window"] = "VOI LUT"
    else:
        info["window"] = f"center {_first(ds.WindowCenter):g}, width {_first(ds.WindowWidth):g}"
    if hi <= lo:
        return min_max(out.astype(np.float64))
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


def _no_pixels(name: str, ds: pydicom.Dataset) -> str:
    modality = _code(ds.get("Modality"), MODALITIES)
    if "Rows" in ds or modality in MODALITIES - _NON_IMAGE_MODALITIES:  # an image whose file ends early
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
