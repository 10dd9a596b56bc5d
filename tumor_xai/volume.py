"""Whole scans: a NIfTI volume or a DICOM series read into slices displayed as the training slices are.

:func:`read_volume` takes a ``.nii``/``.nii.gz`` file, DICOM files of one series (several paths, a
folder, or a ``.zip``), or one multi-frame DICOM file, and returns a :class:`Volume`: float32 slices in
[0, 1] in anatomical order, each shown as the Kaggle training slices are (radiological view: anterior
or superior up, the patient's left on the image's right; sagittal slices face left).

Orientation
    The voxel grid is turned to nibabel's closest canonical orientation (RAS+) from the NIfTI affine or
    from the DICOM direction cosines (ImageOrientationPatient, positions from ImagePositionPatient), so
    an oblique series is shown in the closest of the three planes, without resampling through it.
    ``plane`` picks axial (default), coronal or sagittal slices; pixels are resampled to square in-plane.

Intensity
    One window for the whole volume, so neighbouring slices are comparable: from the 0.5th percentile of
    all voxels (the background) to the 99.5th percentile of the head's voxels (those above a tenth of the
    range), instead of each DICOM file's own window. MONOCHROME1 is inverted after it.

Limits and privacy
    At most :data:`MAX_SLICES` slices, :data:`MAX_BYTES` of decompressed data and :data:`MAX_FILES` files.
    Zip archives are read in memory, never extracted: members with absolute or ``..`` paths, links,
    encryption, or a compression ratio of a zip bomb are refused in words. Nothing is written to disk.
    DICOM headers are read without patient identifiers (see :mod:`tumor_xai.dicom`); NIfTI headers carry
    none that are read. Every failure is :class:`~tumor_xai.inputs.InvalidImageError`.
"""

from __future__ import annotations

import gzip
import logging
import os
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np

from tumor_xai.inputs import DECODER_ERRORS, DecodedImage, InvalidImageError, describe

__all__ = [
    "MAX_BYTES",
    "MAX_FILES",
    "MAX_SLICES",
    "PLANES",
    "Volume",
    "is_nifti",
    "read_mask",
    "read_volume",
]

logger = logging.getLogger(__name__)

PLANES = ("axial", "coronal", "sagittal")
_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS axis each plane's slices are stacked along
MAX_SLICES = 1000
MAX_BYTES = 1 << 30  # decompressed: NIfTI voxel data, the DICOM files together
MAX_FILES = 5000
MAX_SIDE = 1024  # a displayed slice's longer side after resampling to square pixels
_BOMB_RATIO = 200  # a zip member over 1 MB that compresses better than this is not a scan
_WINDOW = (0.5, 99.5)  # percentiles: all voxels (low end), the head's voxels (high end)
_WINDOW_SAMPLES = 2_000_000
ScanSource = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass
class Volume:
    """A scan's slices in anatomical order, each displayed as the training slices are."""

    slices: np.ndarray  # float32 (N, H, W) in [0, 1], one window for all
    positions: np.ndarray  # (N,) mm along the plane's normal (RAS: to the right, anterior, superior)
    pixel_spacing: float  # mm per (square) pixel of a slice
    plane: str  # "axial", "coronal" or "sagittal"
    info: dict[str, Any] = field(default_factory=dict)  # non-identifying facts (format, shape, window ...)
    notes: list[str] = field(default_factory=list)  # what a person should know (gaps, series chosen ...)

    def __len__(self) -> int:
        return len(self.slices)

    def slice_image(self, index: int) -> DecodedImage:
        """Slice ``index`` as a decoded image, with the volume's header facts (for the input checks)."""
        return DecodedImage(self.slices[index], "volume", 0.0, {**self.info, "slice": index})


def read_volume(source: ScanSource, plane: str = "axial") -> Volume:
    """Read a scan (NIfTI file, DICOM files / folder / zip, multi-frame DICOM) as ``plane`` slices.

    ``source`` is one path or several (the files of one DICOM series). Raises InvalidImageError with a
    message a person can act on for anything that is not one readable scan within the limits.
    """
    _check_plane(plane)
    paths = _paths(source)
    if len(paths) == 1 and is_nifti(paths[0]):
        data, affine, info, notes = _read_nifti(paths[0])
        invert = False
    else:
        if any(is_nifti(p) for p in paths):
            raise InvalidImageError("Choose one NIfTI file at a time, not several files together.")
        data, affine, info, notes = _read_dicom(paths)
        invert = info.get("PhotometricInterpretation") == "MONOCHROME1"
    lo, hi = _window(data)
    info["window"] = f"{lo:g} to {hi:g} (one window for the whole volume)"
    slices, positions, spacing = _to_slices(data, affine, plane, cv2.INTER_LINEAR)
    del data
    slices -= lo
    slices *= 1.0 / (hi - lo)
    np.clip(slices, 0.0, 1.0, out=slices)
    if invert:
        np.subtract(1.0, slices, out=slices)
    info.update(plane=plane, slices=len(slices), pixel_spacing_mm=round(spacing, 3))
    logger.debug("read %s: %d %s slices of %s", info.get("source"), len(slices), plane, slices.shape[1:])
    return Volume(slices, positions, spacing, plane, info, notes)


def read_mask(path: str | os.PathLike, plane: str = "axial", like: Volume | None = None) -> np.ndarray:
    """A NIfTI label volume as boolean ``(N, H, W)`` slices on the grid :func:`read_volume` gives its scan
    (same reorientation and resampling, nearest neighbour); ``like`` checks that the grids agree."""
    _check_plane(plane)
    data, affine, _, _ = _read_nifti(Path(path))
    slices, _, _ = _to_slices(np.asfortranarray(data > 0.5, dtype=np.float32), affine, plane, cv2.INTER_NEAREST)
    if like is not None and slices.shape != like.slices.shape:
        raise InvalidImageError(
            f"The mask's slices are {slices.shape}, its scan's {like.slices.shape}: they are not on one grid."
        )
    return slices > 0.5


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a NIfTI-1/2 file, plain or gzip-compressed (by content, not by name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as gz:
                    head = gz.read(544)
            else:
                head = f.read(544)
    except (OSError, EOFError, gzip.BadGzipFile):
        return False
    return (len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00")) or head[4:8] in (b"n+2\x00", b"ni2\x00")


# ----------------------------------------------------------------------------------------------
# Sources


def _check_plane(plane: str) -> None:
    if plane not in PLANES:
        raise ValueError(f"unknown plane {plane!r}; choose one of {', '.join(PLANES)}")


def _paths(source: ScanSource) -> list[Path]:
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise InvalidImageError("No scan was given. Choose a NIfTI file, or the DICOM files of one series.")
    paths = [Path(p) for p in items]
    for p in paths:
        if not p.exists():
            raise InvalidImageError(f"There is no file at {p}. Check the path and try again.")
        if not (p.is_file() or p.is_dir()):
            raise InvalidImageError(f"{p} is not a regular file. Choose the scan's files.")
    return paths


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict, list[str]]:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    name, notes = f"'{path.name}'", []
    failure = None
    try:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if raw.read(2) == b"\x1f\x8b" else raw
            raw.seek(0)
            img = _nifti_class(path).from_stream(stream)
            shape, dtype = img.header.get_data_shape(), img.header.get_data_dtype()
            _check_nifti_shape(name, shape, dtype)
            if len(shape) > 3:
                notes.append(f"The file holds {int(np.prod(shape[3:]))} volumes; the first was read.")
            data = _nifti_voxels(img, shape)
            affine = img.affine
    except InvalidImageError:
        raise
    except (*DECODER_ERRORS, ImageFileError, gzip.BadGzipFile) as exc:
        logger.debug("NIfTI %s failed: %s", path.name, type(exc).__name__)
        failure = f"{name} looks like a NIfTI file, but it could not be read ({type(exc).__name__}): it is truncated or damaged."
    if failure:
        raise InvalidImageError(failure)
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        notes.append("The file has no usable orientation (affine); its voxel axes were taken as they are.")
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # displayed as stored
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        notes.append("Voxels that were not finite numbers were set to 0.")
    codes = "".join(nib.aff2axcodes(affine))
    info = {"source": "NIfTI", "format": "NIfTI", "shape": list(data.shape), "orientation": codes}
    return data, affine, info, notes


def _nifti_voxels(img, shape: tuple[int, ...]) -> np.ndarray:
    """The first 3-D volume: stored 8/16-bit integers as they are when unscaled (half the memory of float32
    for a 16-bit scan; the window is applied later), anything else as float32."""
    proxy = img.dataobj
    if len(shape) > 3:
        return np.asarray(proxy[(...,) + (0,) * (len(shape) - 3)], dtype=np.float32)
    dtype = np.dtype(img.header.get_data_dtype())
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if dtype.kind in "iu" and dtype.itemsize <= 2 and slope == 1.0 and inter == 0.0:
        return np.asarray(proxy.get_unscaled())
    return np.asarray(proxy, dtype=np.float32)


def _nifti_class(path: Path):
    import nibabel as nib

    with open(path, "rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        data = gzip.GzipFile(fileobj=raw).read(8) if head == b"\x1f\x8b" else raw.read(8)
    return (
        nib.Nifti2Image
        if data[4:8] in (b"n+2\x00", b"ni2\x00") or data[:4] == (540).to_bytes(4, "little")
        else nib.Nifti1Image
    )


def _check_nifti_shape(name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise InvalidImageError(f"{name} holds {' x '.join(map(str, shape))} voxels: one slice, not a volume.")
    if np.dtype(dtype).kind not in "iuf" or np.dtype(dtype).fields:
        raise InvalidImageError(f"{name} stores {dtype} voxels; a scan needs grey values (integers or floats).")
    size = int(np.prod(shape[:3])) * max(4, np.dtype(dtype).itemsize)
    if size > MAX_BYTES:
        raise InvalidImageError(
            f"{name} holds {' x '.join(map(str, shape[:3]))} voxels ({size / 2**30:.1f} GB), more than the "
            f"{MAX_BYTES / 2**30:g} GB this tool reads."
        )
    if max(shape[:3]) > max(MAX_SLICES, 4096):
        raise InvalidImageError(f"{name} has {max(shape[:3])} voxels along one axis, more than this tool reads.")


def _read_dicom(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, dict, list[str]]:
    from tumor_xai import dicom

    if len(paths) == 1 and paths[0].is_file() and not zipfile.is_zipfile(paths[0]):
        with open(paths[0], "rb") as f:
            head = f.read(600)
        if not dicom.looks_like_dicom(head):
            raise InvalidImageError(
                f"'{paths[0].name}' is not a scan this tool can read: {describe(head)}. Use a NIfTI file "
                "(.nii, .nii.gz), the DICOM files of one series, or a zip of them."
            )
    archive = None
    try:
        if len(paths) == 1 and paths[0].is_file() and zipfile.is_zipfile(paths[0]):
            archive = zipfile.ZipFile(paths[0])
            files = _zip_members(archive, paths[0].name)
        else:
            files = _folder_files(paths)
        series = dicom.read_series(files, max_slices=MAX_SLICES, max_voxels=MAX_BYTES // 4)
    except zipfile.BadZipFile:
        raise InvalidImageError(f"'{paths[0].name}' is a damaged zip archive. Zip the DICOM files again.") from None
    finally:
        if archive is not None:
            archive.close()
    values = series.values  # (N, rows, cols) -> voxel axes (column, row, slice) as the affine counts them
    data = values.transpose(2, 1, 0)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = lps_to_ras @ series.affine_lps()
    info = dict(series.info, format="DICOM", shape=list(data.shape))
    return data, affine, info, list(series.notes)


def _folder_files(paths: list[Path]):
    from tumor_xai.dicom import SeriesFile

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        else:
            files.append(p)
        if len(files) > MAX_FILES:
            raise InvalidImageError(f"More than {MAX_FILES} files were given; a scan is read from at most {MAX_FILES}.")
    total = sum(f.stat().st_size for f in files)
    if total > MAX_BYTES:
        raise InvalidImageError(
            f"The files hold {total / 2**30:.1f} GB, more than the {MAX_BYTES / 2**30:g} GB this tool reads as one scan."
        )

    def reader(path: Path):
        def read() -> bytes:
            try:
                return path.read_bytes()
            except OSError as exc:
                raise InvalidImageError(f"Cannot read '{path.name}': {exc.strerror or exc}.") from None

        return read

    return [SeriesFile(f.name, reader(f)) for f in files]


def _zip_members(archive: zipfile.ZipFile, name: str):
    """The archive's files as SeriesFile readers, after refusing path tricks, links, encryption and bombs."""
    from tumor_xai.dicom import SeriesFile

    members = [m for m in archive.infolist() if not m.is_dir()]
    if len(members) > MAX_FILES:
        raise InvalidImageError(f"'{name}' holds {len(members)} files, more than the {MAX_FILES} read as one scan.")
    total = 0
    for m in members:
        parts = PurePosixPath(m.filename.replace("\\", "/")).parts
        if m.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise InvalidImageError(
                f"'{name}' holds a file whose name points outside the archive ({m.filename!r}); it was refused."
            )
        if stat.S_ISLNK(m.external_attr >> 16):
            raise InvalidImageError(f"'{name}' holds a link ({m.filename!r}); zip the files themselves.")
        if m.flag_bits & 0x1:
            raise InvalidImageError(f"'{name}' is encrypted; zip the DICOM files without a password.")
        if m.file_size > (1 << 20) and m.file_size > _BOMB_RATIO * max(m.compress_size, 1):
            raise InvalidImageError(
                f"'{name}' holds a file that expands {m.file_size / max(m.compress_size, 1):.0f}-fold "
                "(a zip bomb?); it was refused."
            )
        total += m.file_size
    if total > MAX_BYTES:
        raise InvalidImageError(
            f"'{name}' expands to {total / 2**30:.1f} GB, more than the {MAX_BYTES / 2**30:g} GB this tool reads."
        )

    def reader(member: zipfile.ZipInfo):
        def read() -> bytes:
            with archive.open(member) as f:
                data = f.read(member.file_size + 1)  # never more than declared, whatever the stream holds
            if len(data) > member.file_size:
                raise InvalidImageError(f"'{name}' holds a file larger than its header says; it was refused.")
            return data

        return read

    return [SeriesFile(PurePosixPath(m.filename).name, reader(m)) for m in members]


# ----------------------------------------------------------------------------------------------
# Geometry and intensity


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The voxel array turned to the closest canonical (RAS+) orientation, and its affine (views, no copy)."""
    from nibabel import orientations

    ornt = orientations.io_orientation(affine)
    out = orientations.apply_orientation(data, ornt)
    return out, affine @ orientations.inv_ornt_aff(ornt, data.shape)


def _to_slices(
    data: np.ndarray, affine: np.ndarray, plane: str, interpolation: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """RAS-canonical ``plane`` slices as displayed (float32 ``(N, H, W)``), their positions (mm) and pixel size.

    A slice's two in-plane RAS axes (b, c) become columns and rows, both reversed: rows run from
    anterior / superior down, columns from the patient's right to left (radiological view).
    """
    data, affine = _canonical(data, affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    axis = _PLANE_AXIS[plane]
    b, c = (ax for ax in range(3) if ax != axis)
    n, width, height = data.shape[axis], data.shape[b], data.shape[c]
    if n > MAX_SLICES:
        raise InvalidImageError(f"The scan has {n} {plane} slices, more than the {MAX_SLICES} this tool reads.")
    spacing = float(min(zooms[b], zooms[c]))
    size = (round(width * zooms[b] / spacing), round(height * zooms[c] / spacing))
    if max(size) > MAX_SIDE:
        scale = MAX_SIDE / max(size)
        size, spacing = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), spacing / scale
    shown = np.moveaxis(data, axis, 0)[:, ::-1, ::-1].transpose(0, 2, 1)  # (N, H, W) as displayed, a view
    positions = affine[axis, axis] * np.arange(n) + affine[axis, 3]
    if (
        shown.dtype == np.float32
        and shown.flags.c_contiguous
        and shown.flags.writeable
        and shown.shape[1:] == (size[1], size[0])
    ):
        # The usual axial series or LPS NIfTI: stored as displayed, so the stack is used as it is (no copy)
        return shown, positions.astype(np.float64), spacing
    out = np.empty((n, size[1], size[0]), dtype=np.float32)
    for i in range(n):
        one = np.ascontiguousarray(shown[i], dtype=np.float32)
        out[i] = one if one.shape == out.shape[1:] else cv2.resize(one, size, interpolation=interpolation)
    return out, positions.astype(np.float64), spacing


def _window(data: np.ndarray) -> tuple[float, float]:
    """One intensity window for the volume: the background's low percentile to the head's high one."""
    flat = np.ravel(data, order="K")  # memory order: a view for a transposed stack, not a copy
    sample = flat[:: max(1, flat.size // _WINDOW_SAMPLES)].astype(np.float32)
    lo = float(np.percentile(sample, _WINDOW[0]))
    top = float(np.percentile(sample, 99.9))
    head = sample[sample > lo + 0.1 * (top - lo)]
    hi = float(np.percentile(head, _WINDOW[1])) if head.size else top
    if hi <= lo:
        hi = float(sample.max()) if sample.max() > lo else lo + 1.0
    return lo, hi
