"""Input decoding: every supported format decodes to gray [0, 1]; every bad input raises InvalidImageError."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from tumor_xai import decode
from tumor_xai.decode import DecodedImage, InvalidImageError, load_image

MARKER = "ZZQXSECRETPATIENTZZ"


def dicom_file(name: str) -> Path:
    """A file bundled with pydicom; never downloads (``download=False``)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom version")
    return Path(path)


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def gradient(h: int = 48, w: int = 64) -> np.ndarray:
    """A uint8 slice with structure in both directions (so a transpose is detectable)."""
    yy, xx = np.mgrid[:h, :w]
    return ((yy * 3 + xx * 2) % 256).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def check_decoded(d: DecodedImage, shape: tuple[int, int]) -> None:
    assert d.gray.dtype == np.float32
    assert d.gray.shape == shape
    assert np.isfinite(d.gray).all()
    assert 0.0 <= d.gray.min() and d.gray.max() <= 1.0


# ---------------------------------------------------------------------------------------------
# Pillow formats


@pytest.mark.parametrize(
    ("fmt", "kw", "tol"),
    [
        ("JPEG", {"quality": 95}, 0.06),
        ("PNG", {}, 0.0),
        ("BMP", {}, 0.0),
        ("TIFF", {}, 0.0),
        ("WEBP", {"lossless": True}, 0.0),
        ("GIF", {}, 0.0),
    ],
)
def test_each_format_decodes_from_path_and_bytes(tmp_path, fmt, kw, tol):
    arr = gradient()
    data = encode(Image.fromarray(arr), fmt, **kw)
    path = tmp_path / f"slice.{fmt.lower()}"
    path.write_bytes(data)
    for source in (path, str(path), data, bytearray(data)):
        d = load_image(source)
        check_decoded(d, arr.shape)
        assert d.format == fmt
        assert d.colorfulness == pytest.approx(0.0, abs=1e-3)
        assert np.abs(d.gray - arr / 255.0).max() <= tol + 1e-6


def test_png_16bit_uses_the_actual_bit_depth(tmp_path):
    twelve_bit = np.array([[0, 1024, 2048, 4095]] * 16 * 4, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "scan16.png"
    Image.fromarray(twelve_bit).save(path)
    d = load_image(path)
    assert d.info["source"] == "PNG 16-bit"
    np.testing.assert_allclose(d.gray, twelve_bit / 4095.0, atol=1e-6)

    full = twelve_bit.astype(np.uint32) * 16
    full[0, 0] = 65535
    d = load_image(encode(Image.fromarray(full.astype(np.uint16)), "PNG"))
    assert d.gray[0, 0] == pytest.approx(1.0)
    assert d.gray[0, 3] == pytest.approx(4095 * 16 / 65535, abs=1e-6)


def test_rgb_is_converted_with_luma_weights_and_reports_colourfulness():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (255, 0, 0)  # pure red: colourfulness 1
    rgb[:, 16:] = (128, 128, 128)  # gray: colourfulness 0
    d = load_image(encode(Image.fromarray(rgb), "PNG"))
    assert d.gray[0, 0] == pytest.approx(0.299, abs=1e-3)
    assert d.gray[0, 20] == pytest.approx(128 / 255, abs=1e-3)
    assert d.colorfulness == pytest.approx(0.5, abs=1e-3)


def test_rgba_and_la_are_composited_on_black():
    rgba = np.full((32, 32, 4), 255, np.uint8)
    rgba[:16, :, 3] = 0  # top half: white but fully transparent
    d = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert d.gray[:16].max() == 0.0
    assert d.gray[16:].min() == pytest.approx(1.0, abs=1e-3)

    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    d = load_image(encode(la, "PNG"))
    assert d.gray[:16].max() == 0.0 and d.gray[16:].min() == pytest.approx(1.0, abs=1e-3)


def test_cmyk_is_converted_to_rgb_first():
    cmyk = np.zeros((32, 32, 4), np.uint8)
    cmyk[:, :16, 0] = 255  # cyan
    cmyk[:, 16:, 3] = 255  # black
    d = load_image(encode(Image.fromarray(cmyk, "CMYK"), "TIFF"))
    assert d.gray[0, 0] == pytest.approx(0.587 + 0.114, abs=1e-3)
    assert d.gray[0, 20] == 0.0
    assert d.colorfulness == pytest.approx(0.5, abs=1e-3)


def test_palette_images_use_their_palette_and_transparency():
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    img.paste(1, (0, 0, 32, 16))  # top half: palette entry 1 (white)
    d = load_image(encode(img, "PNG"))
    assert d.gray[:16].min() == pytest.approx(1.0) and d.gray[16:].max() == 0.0

    img.info["transparency"] = 1  # white entry is transparent -> black on composite
    d = load_image(encode(img, "PNG", transparency=1))
    assert d.gray.max() == 0.0


def test_animated_gif_uses_the_first_frame():
    frames = [Image.fromarray(np.full((32, 32), v, np.uint8)) for v in (200, 50)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    d = load_image(data)
    assert d.gray.mean() == pytest.approx(200 / 255, abs=0.02)
    assert "first frame" in d.info["frame"]


def test_exif_orientation_6_comes_back_rotated():
    arr = np.zeros((30, 60), np.uint8)  # stored: 60 wide, 30 high
    arr[:10, :10] = 255  # bright block at the stored top-left
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    d = load_image(encode(img, "JPEG", exif=exif, quality=95))
    assert d.size == (60, 30)
    assert d.gray[:10, -10:].mean() > 0.9  # the block is now top-right
    assert d.gray[:10, :10].mean() < 0.1


def test_pil_images_and_arrays_are_accepted():
    arr = gradient(32, 40)
    decoded = load_image(arr)
    assert load_image(decoded) is decoded
    check_decoded(load_image(Image.fromarray(arr)), (32, 40))
    np.testing.assert_allclose(load_image(arr).gray, arr / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_image(arr[..., None]).gray, arr / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_image(arr.astype(np.float32) / 255.0).gray, arr / 255.0, atol=1e-6)
    np.testing.assert_allclose(load_image(np.stack([arr] * 3, axis=2)).gray, arr / 255.0, atol=1e-3)
    rgba = np.dstack([arr, arr, arr, np.zeros_like(arr)])
    assert load_image(rgba).gray.max() == 0.0
    sixteen = arr.astype(np.uint16) * 16  # 12-bit values
    np.testing.assert_allclose(load_image(sixteen).gray, sixteen / 4095.0, atol=1e-6)
    check_decoded(load_image(Image.fromarray(sixteen)), (32, 40))


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.full((32, 32), 2.0, np.float32), r"in \[0, 1\]"),
        (np.full((32, 32), np.nan, np.float32), "NaN"),
        (np.zeros((32, 32), np.int32), "int32"),
        (np.zeros((2, 32, 32, 3), np.uint8), "shape"),
        (np.zeros((32, 32, 2), np.uint8), "shape"),
        (np.zeros((8, 8), np.uint8), "at least 16"),
    ],
)
def test_bad_arrays_are_refused(array, match):
    with pytest.raises(InvalidImageError, match=match):
        load_image(array)


# ---------------------------------------------------------------------------------------------
# DICOM


def test_dicom_mr_applies_the_window_from_the_file():
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    d = load_image(dicom_file("MR_small.dcm"))
    check_decoded(d, (64, 64))
    assert d.format == "DICOM" and d.info["source"] == "DICOM MR"
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    values = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    expected = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2 LINEAR
    np.testing.assert_allclose(d.gray, expected, atol=1e-5)
    assert d.info["window"] == f"center {c:g}, width {w:g}"


def test_dicom_rescale_is_applied_before_the_window():
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 1000, 2000
    d = load_image(dicom_bytes(ds))
    expected = np.clip((ds.pixel_array * 2.0 - 100 - 999.5) / 1999 + 0.5, 0, 1)
    np.testing.assert_allclose(d.gray, expected, atol=1e-5)


def test_dicom_without_window_uses_the_full_range():
    d = load_image(dicom_file("CT_small.dcm"))
    check_decoded(d, (128, 128))
    assert d.info["Modality"] == "CT"
    assert d.gray.min() == 0.0 and d.gray.max() == 1.0
    assert "full range" in d.info["window"]


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_dicom_transfer_syntaxes_decode_to_the_same_slice(name):
    reference = load_image(dicom_file("MR_small.dcm")).gray
    d = load_image(dicom_file(name))
    np.testing.assert_allclose(d.gray, reference, atol=1e-6)


def test_deflated_dicom_decodes():
    d = load_image(dicom_file("image_dfl.dcm"))
    check_decoded(d, (512, 512))
    assert "Deflated" in d.info["TransferSyntax"]


def test_dicom_without_plugin_is_refused_naming_the_transfer_syntax():
    with pytest.raises(InvalidImageError, match=r"JPEG-LS Lossless.*pylibjpeg.*Export it uncompressed"):
        load_image(dicom_file("MR_small_jpeg_ls_lossless.dcm"))


def test_truncated_dicom_is_refused():
    with pytest.raises(InvalidImageError, match="DICOM file, but its pixel data is shorter than its header says"):
        load_image(dicom_file("MR_truncated.dcm"))


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    mono2 = load_image(dicom_bytes(ds)).gray
    ds.PhotometricInterpretation = "MONOCHROME1"
    d = load_image(dicom_bytes(ds))
    np.testing.assert_allclose(d.gray, 1.0 - mono2, atol=1e-6)
    assert d.info["PhotometricInterpretation"] == "MONOCHROME1"


def test_rgb_dicom_is_converted_to_gray():
    d = load_image(dicom_file("SC_rgb_rle.dcm"))
    check_decoded(d, (100, 100))
    assert d.colorfulness > 0.1


def test_multiframe_dicom_takes_the_middle_frame():
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    base = ds.pixel_array.astype(np.int16)
    frames = np.stack([base, base + 300, base + 600]).astype(base.dtype)
    single = ds.copy()
    single.PixelData = frames[1].tobytes()
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    d = load_image(dicom_bytes(ds))
    np.testing.assert_allclose(d.gray, load_image(dicom_bytes(single)).gray, atol=1e-6)
    assert d.info["frame"] == "middle frame 2 of 3"


def test_dicom_without_preamble_is_found_by_content():
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)  # bare dataset: no preamble, no DICM, no file meta
    d = load_image(fp.getvalue())
    np.testing.assert_allclose(d.gray, load_image(dicom_file("MR_small.dcm")).gray, atol=1e-6)


def test_content_wins_over_the_extension(tmp_path):
    fake_jpg = tmp_path / "scan.jpg"
    fake_jpg.write_bytes(dicom_file("MR_small.dcm").read_bytes())
    assert load_image(fake_jpg).format == "DICOM"
    fake_dcm = tmp_path / "scan.dcm"
    fake_dcm.write_bytes(encode(Image.fromarray(gradient()), "PNG"))
    assert load_image(fake_dcm).format == "PNG"


def test_dicom_without_pixels_is_refused():
    with pytest.raises(InvalidImageError, match="DICOM file without image pixels"):
        load_image(dicom_file("rtplan.dcm"))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while *writing* the invalid test values
def test_no_patient_identifier_leaks(tmp_path, caplog):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    for keyword in ("PatientName", "PatientID", "InstitutionName", "StudyDescription", "ReferringPhysicianName"):
        setattr(ds, keyword, MARKER)
    good = dicom_bytes(ds)
    caplog.set_level(logging.DEBUG)
    outputs = []
    d = load_image(good)
    outputs += [repr(d), str(d.info)]
    bad_inputs = [good[: len(good) - 500], good[:400]]  # pixel data cut, header cut
    ds.WindowWidth = 0  # an invalid window takes the warning path
    bad_inputs.append(dicom_bytes(ds))
    ds.PhotometricInterpretation = MARKER  # free text in a whitelisted field is not echoed
    ds.Modality = MARKER
    bad_inputs.append(dicom_bytes(ds))
    for data in bad_inputs:
        try:
            outputs.append(repr(load_image(data)))
        except InvalidImageError as exc:
            outputs.append(str(exc))
            outputs.append(repr(exc.__cause__) + repr(exc.__context__))
    assert any("truncated" in o for o in outputs)  # the failure paths were really taken
    for text in outputs + [caplog.text]:
        assert MARKER not in text


def test_no_patient_identifier_leaks_from_damaged_files(caplog, recwarn):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.PatientName = ds.PatientID = MARKER
    good = bytearray(dicom_bytes(ds))
    rng = np.random.default_rng(7)
    caplog.set_level(logging.DEBUG)
    texts = []
    for _ in range(60):  # corrupt lengths and values so elements run into the patient's
        data = bytearray(good[: int(rng.integers(132, len(good) + 1))])
        for pos in rng.integers(128, min(len(data), 900), 3):
            data[pos] = int(rng.integers(0, 256))
        try:
            d = load_image(bytes(data))
        except InvalidImageError as exc:
            texts.append(str(exc))
            assert exc.__cause__ is None and exc.__context__ is None
        else:
            texts.append(repr(d))
    texts += [caplog.text] + [str(w.message) for w in recwarn]
    assert not [t for t in texts if MARKER in t]


# ---------------------------------------------------------------------------------------------
# Bad inputs and limits


def _truncated(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.jpg", b"", "empty"),
        ("noise.png", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not an image"),
        ("notes.jpg", b"patient notes, not an image\n" * 20, "contains text"),
        ("report.jpg", b"%PDF-1.7\n" + b"\x00" * 200, "PDF"),
        ("bundle.png", b"PK\x03\x04" + b"\x00" * 200, "ZIP"),
        (
            "cut.jpg",
            _truncated(encode(Image.fromarray(gradient()), "JPEG"), 0.6),
            "truncated JPEG: the image data ends early",
        ),
        ("cut.png", _truncated(encode(Image.fromarray(gradient()), "PNG"), 0.6), "truncated PNG"),
        ("header.png", encode(Image.fromarray(gradient()), "PNG")[:20], "truncated PNG: the header ends early"),
        ("header.gif", encode(Image.fromarray(gradient()), "GIF")[:200], "starts like a GIF file but is truncated"),
        ("header.dcm", lambda: dicom_file("MR_small.dcm").read_bytes()[:300], "without image pixels: it is truncated"),
        ("rows.dcm", lambda: dicom_file("MR_small.dcm").read_bytes()[:830], "truncated DICOM file: it ends before its"),
        (
            "pixels.dcm",
            lambda: dicom_file("MR_small.dcm").read_bytes()[:-8200],
            "pixel data is shorter than its header",
        ),
    ],
)
def test_bad_files_raise_a_clear_error(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content() if callable(content) else content)
    with pytest.raises(InvalidImageError, match=match):
        load_image(path)


def test_missing_path_directory_and_wrong_type(tmp_path):
    with pytest.raises(InvalidImageError, match="There is no file at"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="is a folder"):
        load_image(tmp_path)
    if Path("/dev/zero").exists():  # would stream forever if read
        with pytest.raises(InvalidImageError, match="not a regular file"):
            load_image("/dev/zero")
    with pytest.raises(InvalidImageError, match="No image was given"):
        load_image(None)
    with pytest.raises(InvalidImageError, match="Cannot read an image from a int"):
        load_image(42)


def test_file_size_limit(tmp_path):
    data = encode(Image.fromarray(gradient()), "PNG")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(InvalidImageError, match="MB, more than the"):
        load_image(path, max_bytes=len(data) - 1)
    with pytest.raises(InvalidImageError, match="MB, more than the"):
        load_image(data, max_bytes=len(data) - 1)
    assert load_image(data, max_bytes=len(data)).size == (48, 64)


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` (a decompression bomb's header)."""
    data = bytearray(encode(Image.fromarray(gradient(16, 16)), "PNG"))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    with pytest.raises(InvalidImageError, match="7000 x 7000 pixels, more than the 40 megapixels"):
        load_image(_png_claiming(7000, 7000))  # 49 MP: under Pillow's own bomb limit, over ours
    with pytest.raises(InvalidImageError, match="too large|megapixels"):
        load_image(_png_claiming(60000, 60000))  # Pillow's DecompressionBombError
    with pytest.raises(InvalidImageError, match="64 x 48 pixels, more than the 0.001 megapixels"):
        load_image(encode(Image.fromarray(gradient()), "PNG"), max_pixels=1000)


def test_absurd_shapes_are_refused():
    with pytest.raises(InvalidImageError, match=r"only 12 x 12 pixels.*at least 16 x 16"):
        load_image(encode(Image.fromarray(np.zeros((12, 12), np.uint8)), "PNG"))
    with pytest.raises(InvalidImageError, match="too elongated"):
        load_image(encode(Image.fromarray(np.zeros((20, 400), np.uint8)), "PNG"))
    assert load_image(np.zeros((8, 8), np.uint8), min_side=8).size == (8, 8)


@pytest.mark.filterwarnings("ignore::UserWarning")  # damaged files make Pillow and pydicom warn, as they should
def test_fuzzed_bytes_only_raise_invalid_image_error():
    rng = np.random.default_rng(1234)
    seeds = [
        encode(Image.fromarray(gradient(32, 32)), "JPEG", quality=90),
        encode(Image.fromarray(gradient(32, 32)), "PNG"),
        dicom_file("MR_small.dcm").read_bytes(),
        dicom_file("MR_small_RLE.dcm").read_bytes(),
    ]
    outcomes = {"ok": 0, "refused": 0}
    for i in range(240):
        data = bytearray(seeds[i % len(seeds)])
        data = data[: int(rng.integers(1, len(data) + 1))]  # random truncation
        if i % 3 == 0 and len(data) > 8:  # and sometimes a few flipped bytes as well
            for pos in rng.integers(0, len(data), 4):
                data[pos] = int(rng.integers(0, 256))
        try:
            d = load_image(bytes(data))
        except InvalidImageError as exc:
            assert str(exc)
            outcomes["refused"] += 1
        else:
            assert np.isfinite(d.gray).all() and 0.0 <= d.gray.min() and d.gray.max() <= 1.0
            outcomes["ok"] += 1
    assert outcomes["refused"] > 100  # most truncations must be caught, not decoded as garbage silently
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------------------------
# Large images are reduced while decoding


def _blocks(arr: np.ndarray, f: int) -> np.ndarray:
    h, w = arr.shape[0] // f * f, arr.shape[1] // f * f
    return arr[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def test_large_png_is_box_reduced_before_conversion():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (41, 33), dtype=np.uint8)
    big = np.kron(small, np.ones((100, 100), np.uint8))  # 4100 x 3300: reduced by 4
    d = load_image(encode(Image.fromarray(big), "PNG"))
    assert d.size == (1025, 825) and d.info["reduced_from"] == (3300, 4100)
    np.testing.assert_allclose(d.gray, _blocks(big.astype(np.float32), 4) / 255.0, atol=1 / 255)


def test_large_16bit_palette_and_rgba_images_keep_their_meaning():
    ramp = np.tile(np.linspace(0, 4095, 2200).astype(np.uint16), (2100, 1))  # 12-bit values in 16-bit PNG
    d = load_image(encode(Image.fromarray(ramp), "PNG"))
    assert d.size == (1050, 1100) and d.info["source"] == "PNG 16-bit"
    np.testing.assert_allclose(d.gray[:, -1], 4095 / 4095, atol=2e-3)
    pal = Image.fromarray(np.where(np.arange(2048)[None, :] < 1024, 10, 200).astype(np.uint8).repeat(2048, 0))
    pal = pal.convert("P")
    d = load_image(encode(pal, "PNG"))
    assert d.size == (1024, 1024) and abs(d.gray[0, 0] - 10 / 255) < 0.01 and abs(d.gray[0, -1] - 200 / 255) < 0.01
    rgba = np.zeros((2048, 2048, 4), np.uint8)
    rgba[..., :3], rgba[:, :1024, 3] = 200, 255  # right half transparent: black once composited
    d = load_image(encode(Image.fromarray(rgba), "PNG"))
    assert d.size == (1024, 1024) and d.gray[0, 0] == pytest.approx(200 / 255, abs=0.01) and d.gray[0, -1] == 0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16", "L"])
def test_strip_reduction_equals_one_whole_image_reduce(monkeypatch, mode):
    # Full-size decodes are reduced strip by strip so no second full-size copy exists; the result
    # must be exactly Pillow's reduce of the whole image, including the partial last block and strip.
    monkeypatch.setattr(decode, "_STRIP_PIXELS", 40_000)
    rng = np.random.default_rng(1)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 4096, (2303, 2101), dtype=np.uint16))
        expected = img.convert("I").reduce(2).convert("I;16")
    else:
        img = Image.fromarray(rng.integers(0, 256, (2303, 2101, 4), dtype=np.uint8), "RGBA").convert(mode)
        if mode == "P":
            img.info["transparency"] = 0
        expected = (img.convert("RGBA") if mode == "P" else img).reduce(2)
    got = decode._reduce(img)
    assert got.mode == expected.mode and got.size == expected.size == (1051, 1152)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.slow
def test_large_jpeg_is_decoded_at_a_reduced_scale():
    yy, xx = np.mgrid[:3000, :4200]
    img = Image.fromarray(((yy // 300 + xx // 300) % 2 * 200 + 20).astype(np.uint8))
    d = load_image(encode(img, "JPEG", quality=90))
    assert d.info["reduced_from"] == (4200, 3000)
    assert 1024 <= max(d.size) < 2048 and d.size[1] / d.size[0] == pytest.approx(1.4, abs=0.01)
    assert abs(float(d.gray.mean()) - 120 / 255) < 0.02


def test_images_below_twice_the_decode_side_are_untouched():
    d = load_image(encode(Image.fromarray(np.zeros((2047, 300), np.uint8)), "PNG"))
    assert d.size == (2047, 300) and "reduced_from" not in d.info


# ---------------------------------------------------------------------------------------------
# pydicom is needed only for DICOM


@pytest.mark.slow
@pytest.mark.e2e
def test_training_and_evaluation_import_without_pydicom(tmp_path):
    import subprocess
    import sys

    jpeg = tmp_path / "slice.jpg"
    jpeg.write_bytes(encode(Image.fromarray(gradient()), "JPEG"))
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError("pydicom is blocked in this test")
sys.meta_path.insert(0, Block())
import tumor_xai.train, tumor_xai.evaluate, tumor_xai.data
from tumor_xai.decode import InvalidImageError, load_image
assert load_image({str(jpeg)!r}).size == (48, 64)
try:
    load_image({str(dicom_file("MR_small.dcm"))!r})
except InvalidImageError as exc:
    assert "needs the pydicom package" in str(exc), exc
else:
    raise AssertionError("a DICOM decoded without pydicom")
assert not any(m == "pydicom" or m.startswith("pydicom.") for m in sys.modules)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while *writing* "Whole Body" (not a CS value)
def test_dicom_body_part_is_echoed_only_from_the_closed_set():
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    assert "BodyPartExamined" not in load_image(dicom_bytes(ds)).info
    ds.BodyPartExamined = "Whole Body"
    assert load_image(dicom_bytes(ds)).info["BodyPartExamined"] == "WHOLEBODY"
    ds.BodyPartExamined = MARKER[:16]
    info = load_image(dicom_bytes(ds)).info
    assert info["BodyPartExamined"] == "other" and MARKER[:16] not in repr(info)
