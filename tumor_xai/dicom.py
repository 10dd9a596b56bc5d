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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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

__all__ = [
    "BODY_PARTS",
    "MODALITIES",
    "Series",
    "SeriesFile",
    "decode_dicom",
    "looks_like_dicom",
    "read_series",
    "series_uid",
]

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


# ----------------------------------------------------------------------------------------------
# Series: several single-frame files (or one multi-frame file) as one volume

# What a series needs beyond the pixel module: where each slice lies, and how large its pixels are.
# The series UID only groups files; it is never returned or shown.
_SERIES_TAGS = [
    *_DICOM_TAGS,
    "SeriesInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]
_HEADER_TAGS = [t for t in _SERIES_TAGS if not t.endswith("PixelData")]
_SAME_POSITION_MM = 0.01  # slices closer than this along the normal are duplicates
_GAP_FACTOR = 1.5  # a step this much larger than the median step is a gap


@dataclass(frozen=True)
class SeriesFile:
    """One file offered as part of a series: its name (for messages) and how to read its bytes."""

    name: str
    read: Callable[[], bytes]


@dataclass
class Series:
    """A DICOM series' slices in anatomical order, before any window: modality-LUT values and geometry."""

    values: np.ndarray  # float32 (N, rows, cols): rescaled values (MONOCHROME1 not yet inverted)
    positions: np.ndarray  # (N,) mm along the slice normal, increasing
    row_cosine: np.ndarray  # (3,) LPS direction of increasing column index
    column_cosine: np.ndarray  # (3,) LPS direction of increasing row index
    origin: np.ndarray  # (3,) LPS position of the first slice's first pixel
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    slice_step: float  # mm between slices (median)
    info: dict[str, Any]  # non-identifying facts (modality, body part, photometric, ...)
    notes: list[str] = field(default_factory=list)  # what a person should know (gaps, duplicates, choices)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.column_cosine)

    def affine_lps(self) -> np.ndarray:
        """4 x 4 voxel (column, row, slice) -> LPS mm."""
        affine = np.eye(4)
        affine[:3, 0] = self.row_cosine * self.pixel_spacing[1]
        affine[:3, 1] = self.column_cosine * self.pixel_spacing[0]
        affine[:3, 2] = self.normal * self.slice_step
        affine[:3, 3] = self.origin
        return affine


@dataclass
class _Header:
    source: SeriesFile
    series: str
    rows: int
    columns: int
    frames: int
    modality: str
    body_part: str | None
    photometric: str
    instance: int | None
    position: np.ndarray | None  # (3,) or, for multi-frame files, (frames, 3)
    orientation: np.ndarray | None  # (6,)
    spacing: tuple[float, float] | None
    step: float | None  # SpacingBetweenSlices or SliceThickness


def looks_like_dicom(data: bytes) -> bool:
    """``DICM`` at byte 128, or a preamble-less dataset starting with a group 0002 or 0008 tag."""
    return data[128:132] == b"DICM" or (len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00"))


def series_uid(path: str | Path) -> str | None:
    """The series a DICOM image file belongs to (only to group files; never shown), or None if it is none."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        if not looks_like_dicom(head):
            return None
        with _DICOM_LOCK, pydicom.config.disable_value_validation():
            ds = pydicom.dcmread(
                path, force=head[128:132] != b"DICM", stop_before_pixels=True,
                specific_tags=["SeriesInstanceUID", "Rows"],
            )  # fmt: skip
            uid = str(ds.get("SeriesInstanceUID") or "") if "Rows" in ds else None
    except (*_DICOM_ERRORS, OSError):
        return None
    return uid


def read_series(files: list[SeriesFile], *, max_slices: int, max_voxels: int) -> Series:
    """The slices of ``files`` as one series, sorted along the slice normal; InvalidImageError if they are none.

    Files that are not DICOM are left out (and counted in the notes). Several series: the one with the
    most slices is taken and the notes say so. Slices are sorted by ImagePositionPatient projected on the
    normal of ImageOrientationPatient, else by InstanceNumber; slices at one position are kept once, and
    steps over 1.5 x the median are reported as gaps. One multi-frame file is a series of its frames.
    """
    with _DICOM_LOCK, pydicom.config.disable_value_validation():
        headers, skipped = [], 0
        for f in files:
            header = _read_header(f)
            if header is None:
                skipped += 1
            else:
                headers.append(header)
        notes = [f"{skipped} file(s) that are not DICOM images were left out."] if skipped else []
        if not headers:
            raise InvalidImageError("None of the files is a DICOM image. Choose the files of one DICOM series.")
        groups: dict[str, list[_Header]] = {}
        for h in headers:
            groups.setdefault(h.series, []).append(h)
        chosen = max(groups.values(), key=lambda g: sum(h.frames for h in g))
        if len(groups) > 1:
            sizes = sorted((sum(h.frames for h in g) for g in groups.values()), reverse=True)
            notes.append(
                f"The files hold {len(groups)} series ({', '.join(map(str, sizes))} slices); the one with the most "
                f"slices ({sizes[0]}) was read."
            )
        if len(chosen) > 1 and any(h.frames > 1 for h in chosen):
            raise InvalidImageError("A series mixes multi-frame and single-frame files; choose one kind.")
        shapes = {(h.rows, h.columns) for h in chosen}
        if len(shapes) > 1:
            raise InvalidImageError(
                f"The slices of this series have different sizes ({', '.join(f'{c} x {r}' for r, c in sorted(shapes))}), "
                "so they do not form one volume."
            )
        rows, cols = shapes.pop()
        slices = sum(h.frames for h in chosen)
        if slices > max_slices:
            raise InvalidImageError(f"The series has {slices} slices, more than the {max_slices} this tool reads.")
        if slices * rows * cols > max_voxels:
            raise InvalidImageError(
                f"The series is {cols} x {rows} x {slices} voxels, more than the {max_voxels / 1e6:g} million "
                "this tool reads."
            )
        if chosen[0].frames > 1:
            return _multiframe(chosen[0], notes)
        return _single_frames(chosen, notes)


def _read_header(f: SeriesFile) -> _Header | None:
    data = f.read()
    if not looks_like_dicom(data):
        return None
    force = data[128:132] != b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force, specific_tags=_HEADER_TAGS, stop_before_pixels=True)
        ds.walk(lambda *_: None)
        if "Rows" not in ds or "Columns" not in ds:  # a DICOMDIR, a report, a structure set: no slice
            return None
        header = _Header(
            source=f,
            series=str(ds.get("SeriesInstanceUID") or ""),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            frames=int(ds.get("NumberOfFrames") or 1),
            modality=_code(ds.get("Modality"), MODALITIES),
            body_part=_code(re.sub(r"[\s_^-]", "", str(ds.BodyPartExamined)), BODY_PARTS)
            if ds.get("BodyPartExamined")
            else None,
            photometric=_code(ds.get("PhotometricInterpretation"), _PHOTOMETRIC),
            instance=int(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None,
            position=_floats(ds.get("ImagePositionPatient"), 3),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            spacing=_spacing(ds.get("PixelSpacing")),
            step=_positive_float(ds.get("SpacingBetweenSlices")) or _positive_float(ds.get("SliceThickness")),
        )
        if header.frames > 1:
            _frame_geometry(ds, header)
    except (*_DICOM_ERRORS, AttributeError):
        failure = f"'{f.name}' looks like a DICOM file, but its header could not be read: it is truncated or damaged."
    else:
        failure = None
    if failure:  # raised outside the handler: no library message (which may quote header values) rides along
        raise InvalidImageError(failure)
    if min(header.rows, header.columns, header.frames) < 1:
        raise InvalidImageError(f"'{f.name}' is a DICOM file without a valid image size.")
    return header


def _frame_geometry(ds: pydicom.Dataset, header: _Header) -> None:
    """Enhanced (multi-frame) MR/CT keep orientation, spacing and each frame's position in functional groups."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []

    def item(group: pydicom.Dataset | None, seq: str) -> pydicom.Dataset | None:
        value = group.get(seq) if group is not None else None
        return value[0] if value else None

    first = per_frame[0] if per_frame else None
    orientation = item(shared, "PlaneOrientationSequence") or item(first, "PlaneOrientationSequence")
    measures = item(shared, "PixelMeasuresSequence") or item(first, "PixelMeasuresSequence")
    if orientation is not None:
        header.orientation = _floats(orientation.get("ImageOrientationPatient"), 6)
    if measures is not None:
        header.spacing = _spacing(measures.get("PixelSpacing")) or header.spacing
        header.step = (
            _positive_float(measures.get("SpacingBetweenSlices"))
            or _positive_float(measures.get("SliceThickness"))
            or header.step
        )
    positions = [_floats((item(g, "PlanePositionSequence") or {}).get("ImagePositionPatient"), 3) for g in per_frame]
    if len(positions) == header.frames and all(p is not None for p in positions):
        header.position = np.stack(positions)
    else:
        header.position = None


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.isfinite(out).all() else None


def _spacing(value: Any) -> tuple[float, float] | None:
    out = _floats(value, 2)
    return (float(out[0]), float(out[1])) if out is not None and (out > 0).all() else None


def _positive_float(value: Any) -> float | None:
    try:
        out = abs(float(value))
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None


def _orientation(orientation: np.ndarray | None, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if orientation is None:
        notes.append("The files carry no ImageOrientationPatient; the slices are taken to be axial.")
        return np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    row, col = orientation[:3], orientation[3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    return row, col


def _series_info(h: _Header, slices: int) -> dict[str, Any]:
    info = {
        "source": f"DICOM {h.modality} series",
        "Modality": h.modality,
        "PhotometricInterpretation": h.photometric,
        "Rows": h.rows,
        "Columns": h.columns,
        "slices": slices,
    }
    if h.body_part:
        info["BodyPartExamined"] = h.body_part
    return info


def _single_frames(chosen: list[_Header], notes: list[str]) -> Series:
    first = chosen[0]
    orientations = [h.orientation for h in chosen]
    if all(o is not None for o in orientations) and any(
        not np.allclose(o, orientations[0], atol=1e-3) for o in orientations
    ):
        raise InvalidImageError(
            "The slices of this series have different orientations (a localiser or a reformat mixed in?); "
            "choose the files of one stack."
        )
    row, col = _orientation(first.orientation, notes)
    normal = np.cross(row, col)
    if all(h.position is not None for h in chosen) and first.orientation is not None:
        keys = np.array([float(h.position @ normal) for h in chosen])
        how = "ImagePositionPatient"
    elif all(h.instance is not None for h in chosen):
        keys = np.array([float(h.instance) for h in chosen])
        how = "InstanceNumber"
        notes.append("The slices carry no position; they were ordered by InstanceNumber.")
    else:
        raise InvalidImageError(
            "The slices of this series carry neither a position nor an instance number, so their order is unknown."
        )
    order = np.argsort(keys, kind="stable")
    keep, duplicates = [int(order[0])], 0
    for i in order[1:]:
        if abs(keys[i] - keys[keep[-1]]) < _SAME_POSITION_MM:
            duplicates += 1
        else:
            keep.append(int(i))
    if duplicates:
        notes.append(f"{duplicates} slice(s) at the same {how} as another were left out (duplicates).")
    headers = [chosen[i] for i in keep]
    if how == "ImagePositionPatient":
        positions = keys[keep]
        step = float(np.median(np.diff(positions))) if len(positions) > 1 else (first.step or 1.0)
    else:
        step = first.step or 1.0
        positions = (keys[keep] - keys[keep[0]]) * step
    _report_gaps(positions, step, notes)
    values = _stack([h.source for h in headers], (first.rows, first.columns))
    origin = headers[0].position if headers[0].position is not None else np.zeros(3)
    return Series(
        values,
        np.asarray(positions, dtype=np.float64),
        row,
        col,
        origin,
        first.spacing or _default_spacing(notes),
        step,
        _series_info(first, len(headers)),
        notes,
    )


def _multiframe(h: _Header, notes: list[str]) -> Series:
    row, col = _orientation(h.orientation, notes)
    normal = np.cross(row, col)
    if h.position is not None and h.orientation is not None:
        keys = h.position @ normal
        order = np.argsort(keys, kind="stable")
        positions = keys[order]
        step = float(np.median(np.diff(positions))) if len(positions) > 1 else (h.step or 1.0)
        origin = h.position[order[0]]
    else:
        notes.append("The frames carry no position; they were kept in the order stored.")
        order = np.arange(h.frames)
        step = h.step or 1.0
        positions, origin = np.arange(h.frames) * step, np.zeros(3)
    _report_gaps(positions, step, notes)
    frames = _frame_values(h.source)
    values = frames[order] if frames.ndim == 3 else frames[None]
    info = _series_info(h, h.frames)
    info["source"] = f"DICOM {h.modality} multi-frame"
    return Series(values, positions, row, col, origin, h.spacing or _default_spacing(notes), step, info, notes)


def _default_spacing(notes: list[str]) -> tuple[float, float]:
    notes.append("The files carry no PixelSpacing; square 1 mm pixels were assumed.")
    return 1.0, 1.0


def _report_gaps(positions: np.ndarray, step: float, notes: list[str]) -> None:
    if len(positions) < 3 or step <= 0:
        return
    gaps = np.flatnonzero(np.diff(positions) > _GAP_FACTOR * step)
    if len(gaps):
        where = ", ".join(f"after slice {i} ({np.diff(positions)[i]:.1f} mm)" for i in gaps[:5])
        more = f" and {len(gaps) - 5} more" if len(gaps) > 5 else ""
        notes.append(f"{len(gaps)} gap(s) in the series, where slices seem to be missing: {where}{more}.")


def _stack(files: list[SeriesFile], shape: tuple[int, int]) -> np.ndarray:
    """The files' slices in one float32 array: for the usual axial series this array becomes the displayed
    slices as it is (windowed in place), so float32 here costs less than a 16-bit stack plus a float copy."""
    values = np.empty((len(files), *shape), dtype=np.float32)
    for n, f in enumerate(files):
        frame = _frame_values(f)
        if frame.shape != shape:
            raise InvalidImageError(f"'{f.name}' does not hold one slice of {shape[1]} x {shape[0]} pixels.")
        values[n] = frame
    return values


def _frame_values(f: SeriesFile) -> np.ndarray:
    """Modality-LUT values of one file's pixels: (rows, cols), or (frames, rows, cols) for a multi-frame file."""
    data = f.read()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM", specific_tags=_SERIES_TAGS)
        ts = _transfer_syntax(ds)
        _check_decoder(ts, f"'{f.name}'")
        photometric = _code(ds.get("PhotometricInterpretation"), _PHOTOMETRIC)
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise InvalidImageError(
                f"'{f.name}' is a colour DICOM ({photometric}); a scan is read only from grayscale slices."
            )
        arr = pixel_array(ds)  # every frame of a multi-frame file
        if ds.get("RescaleSlope") is not None or ds.get("ModalityLUTSequence"):
            arr = apply_modality_lut(arr, ds)
        values = arr if arr.dtype.kind in "iu" else np.asarray(arr, dtype=np.float32)
    except InvalidImageError:
        raise
    except _DICOM_ERRORS as exc:
        logger.debug("DICOM series pixels failed: %s", type(exc).__name__)
        failure = f"'{f.name}' is a DICOM file, but its pixel data could not be decoded ({type(exc).__name__})."
    else:
        failure = None
    if failure:
        raise InvalidImageError(failure)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InvalidImageError(f"'{f.name}' holds pixel values that are not finite numbers.")
    return values
