"""Reading scans: NIfTI and DICOM series in anatomical order, displayed as the training slices, one window."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import example_slices, make_nifti
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tumor_xai.inputs import InvalidImageError
from tumor_xai.volume import read_mask, read_volume

TCIA = Path(os.environ.get("TUMOR_XAI_DATA", "/nonexistent")).parent / "tcia-volumes-dev"


def rotation(degrees: float) -> np.ndarray:
    """A rotation about the LPS x axis (left-right): an oblique axial stack tilted towards coronal."""
    a = np.deg2rad(degrees)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def dicom_slice(pixels: np.ndarray, position, orientation, instance: int, series: str, modality="MR") -> bytes:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Doe^Jane", "SECRET-ID-123"  # must never surface
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = modality, series, instance
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 100 + instance, 50  # a window per file: the volume must ignore them
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def series_files(slices: np.ndarray, tilt: float = 0.0, series: str | None = None, step: float = 2.0, **kw):
    """{name: bytes} of an axial series (tilted by ``tilt`` degrees), files and instance numbers shuffled."""
    rot = rotation(tilt)
    row, col = rot @ [1.0, 0, 0], rot @ [0, 1.0, 0]
    normal = np.cross(row, col)
    series = series or generate_uid()
    order = np.random.default_rng(0).permutation(len(slices))
    return {
        f"IM{n:04d}.dcm": dicom_slice(
            slices[k], [-48, -48, -10] + normal * step * k, [*row, *col], 100 - k, series, **kw
        )
        for n, k in enumerate(order)
    }


def test_nifti_slices_are_displayed_as_the_training_slices(tmp_path):
    slices = example_slices(5)
    vol = read_volume(make_nifti(tmp_path / "scan.nii.gz", slices, spacing=2.5))
    assert vol.slices.shape == (5, 96, 96) and vol.slices.dtype == np.float32 and vol.plane == "axial"
    assert 0.0 <= vol.slices.min() and vol.slices.max() <= 1.0
    for k in range(5):  # the marker stays top-left: anterior up, the patient's right on the image's left
        assert np.corrcoef(vol.slices[k].ravel(), slices[k].ravel())[0, 1] > 0.99
        assert vol.slices[k, 2:8, 2:8].mean() > 0.95
    np.testing.assert_allclose(np.diff(vol.positions), 2.5)
    assert vol.info["orientation"] == "LPS" and "one window" in vol.info["window"]


def test_nifti_stored_superior_first_is_read_inferior_first(tmp_path):
    slices = example_slices(4)
    plain = read_volume(make_nifti(tmp_path / "a.nii", slices))
    flipped = read_volume(make_nifti(tmp_path / "b.nii.gz", slices, reverse=True))
    np.testing.assert_allclose(flipped.slices, plain.slices, atol=1e-6)
    np.testing.assert_allclose(flipped.positions, plain.positions)


def test_one_window_for_the_whole_volume(tmp_path):
    slices = example_slices(4)
    slices[1] = slices[1] // 4  # a darker slice stays darker: not stretched on its own
    vol = read_volume(make_nifti(tmp_path / "scan.nii", slices))
    assert vol.slices[1].mean() < 0.5 * vol.slices[0].mean()


def test_coronal_and_sagittal_planes_resample_to_square_pixels(tmp_path):
    path = make_nifti(tmp_path / "scan.nii", example_slices(6), spacing=2.5)
    coronal = read_volume(path, "coronal")
    sagittal = read_volume(path, "sagittal")
    assert coronal.slices.shape == (96, 15, 96)  # 6 slices x 2.5 mm -> 15 rows of 1 mm
    assert sagittal.slices.shape == (96, 15, 96)
    assert coronal.pixel_spacing == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown plane 'oblique'"):
        read_volume(path, "oblique")


def test_mask_is_read_on_its_scan_grid(tmp_path):
    slices = example_slices(4)
    mask = np.zeros_like(slices)
    mask[2, 40:50, 60:70] = 1
    scan = read_volume(make_nifti(tmp_path / "scan.nii", slices))
    got = read_mask(make_nifti(tmp_path / "mask.nii", mask), like=scan)
    assert got.dtype == bool and got.shape == scan.slices.shape
    assert np.array_equal(np.flatnonzero(got.any(axis=(1, 2))), [2]) and got[2, 40:50, 60:70].all()


def test_4d_nifti_reads_the_first_volume_and_says_so(tmp_path):
    data = np.stack([np.transpose(example_slices(3), (2, 1, 0)), np.zeros((96, 96, 3))], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1, 1, 1])), str(tmp_path / "fmri.nii"))
    vol = read_volume(tmp_path / "fmri.nii")
    assert len(vol) == 3 and vol.slices.max() > 0.9 and "first was read" in vol.notes[0]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x1f\x8b" + b"\x00" * 50, "is not a scan this tool can read: it is gzip-compressed"),
        (b"not a scan at all" * 30, "is not a scan this tool can read: it contains text"),
    ],
)
def test_unreadable_files_are_refused_in_words(tmp_path, content, message):
    (tmp_path / "x.nii.gz").write_bytes(content)
    with pytest.raises(InvalidImageError, match=message):
        read_volume(tmp_path / "x.nii.gz")


def test_truncated_nifti_is_refused(tmp_path):
    path = make_nifti(tmp_path / "scan.nii.gz", example_slices(4))
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(InvalidImageError, match="NIfTI file, but it could not be read"):
        read_volume(path)


def test_single_slice_nifti_is_not_a_volume(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 1), np.float32), np.eye(4)), str(tmp_path / "one.nii"))
    with pytest.raises(InvalidImageError, match="one slice, not a volume"):
        read_volume(tmp_path / "one.nii")


def test_dicom_series_in_shuffled_files_and_oblique_is_sorted_along_the_normal(tmp_path):
    slices = example_slices(6)
    for name, data in series_files(slices, tilt=15.0).items():
        (tmp_path / name).write_bytes(data)
    vol = read_volume(sorted(tmp_path.iterdir()))
    assert len(vol) == 6 and vol.info["Modality"] == "MR" and vol.info["format"] == "DICOM"
    for k in range(6):  # slice k of the stack, whatever the file names and instance numbers say
        assert np.corrcoef(vol.slices[k].ravel(), slices[k].ravel())[0, 1] > 0.99
        assert vol.slices[k, 2:8, 2:8].mean() > 0.9  # stored anterior-up, left on the right: shown as stored
    assert np.all(np.diff(vol.positions) > 0)
    text = repr(vol.info) + " ".join(vol.notes)
    assert "Doe" not in text and "SECRET" not in text


def test_a_folder_is_read_as_one_series_and_duplicates_and_gaps_are_reported(tmp_path):
    slices = example_slices(6)
    files = series_files(slices)
    names = sorted(files)
    files["copy.dcm"] = files[names[0]]  # the same slice twice
    del files[names[1]]  # one missing: a gap
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "DICOMDIR.txt").write_text("not a DICOM file")
    vol = read_volume(tmp_path)
    assert len(vol) == 5
    notes = " ".join(vol.notes)
    assert "1 slice(s) at the same ImagePositionPatient" in notes and "gap" in notes and "not DICOM" in notes


def test_zip_with_two_series_takes_the_larger_and_says_so(tmp_path):
    archive = tmp_path / "scans.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in series_files(example_slices(5)).items():
            zf.writestr(f"big/{name}", data)
        for name, data in series_files(example_slices(3)).items():
            zf.writestr(f"small/{name}", data)
    vol = read_volume(archive)
    assert len(vol) == 5 and "2 series (5, 3 slices)" in " ".join(vol.notes)


@pytest.mark.parametrize(
    "name, data, compress, message",
    [
        ("../../etc/evil.dcm", b"x" * 100, zipfile.ZIP_STORED, "points outside the archive"),
        ("/abs/evil.dcm", b"x" * 100, zipfile.ZIP_STORED, "points outside the archive"),
        ("bomb.dcm", b"\x00" * (8 << 20), zipfile.ZIP_DEFLATED, "zip bomb"),
    ],
)
def test_zip_tricks_are_refused_in_words(tmp_path, name, data, compress, message):
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w", compress) as zf:
        zf.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    with pytest.raises(InvalidImageError, match=message):
        read_volume(archive)


def test_multiframe_dicom_is_a_series_of_its_frames(tmp_path):
    slices = example_slices(4)
    ds = pydicom.dcmread(io.BytesIO(next(iter(series_files(slices[:1]).values()))))
    ds.NumberOfFrames = 4
    ds.PixelData = (slices.astype(np.uint16) * 16).tobytes()
    shared, frame = pydicom.Dataset(), []
    orientation = pydicom.Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [orientation]
    for k in (3, 0, 2, 1):  # frames stored out of order; their positions say where they lie
        group, position = pydicom.Dataset(), pydicom.Dataset()
        position.ImagePositionPatient = [0, 0, 3.0 * k]
        group.PlanePositionSequence = [position]
        frame.append(group)
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = frame
    ds.PixelData = (slices[[3, 0, 2, 1]].astype(np.uint16) * 16).tobytes()
    ds.save_as(tmp_path / "multi.dcm")
    vol = read_volume(tmp_path / "multi.dcm")
    assert len(vol) == 4 and vol.info["source"] == "DICOM MR multi-frame"
    for k in range(4):
        assert np.corrcoef(vol.slices[k].ravel(), slices[k].ravel())[0, 1] > 0.99
    np.testing.assert_allclose(np.diff(vol.positions), 3.0)


@pytest.mark.skipif(not TCIA.is_dir(), reason="TUMOR_XAI_DATA is not set (the TCIA dev volumes are its sibling)")
def test_tcia_dev_volume_and_mask_share_one_grid():
    scan = read_volume(TCIA / "PGBM-001" / "Pre_Scan_T1.nii.gz")
    mask = read_mask(TCIA / "PGBM-001" / "Pre_Mask.nii.gz", like=scan)
    assert scan.slices.shape == (24, 256, 256) and mask.any()
    tumour = np.flatnonzero(mask.any(axis=(1, 2)))
    assert np.all(np.diff(tumour) == 1)  # one contiguous run of tumour slices


@pytest.mark.parametrize("slope", [1.0, 2.5])
def test_integer_nifti_with_or_without_scaling_reads_like_float(tmp_path, slope):
    slices = example_slices(3)
    reference = read_volume(make_nifti(tmp_path / "f.nii", slices))
    img = nib.Nifti1Image(np.transpose(slices, (2, 1, 0)).astype(np.int16), np.diag([-1.0, -1.0, 2.5, 1.0]))
    img.header.set_slope_inter(slope, 0.0)
    nib.save(img, str(tmp_path / "i.nii.gz"))
    np.testing.assert_allclose(read_volume(tmp_path / "i.nii.gz").slices, reference.slices, atol=1e-5)
