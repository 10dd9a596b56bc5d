"""Whole-scan prediction: batched per-slice answers equal single-slice ones, marked slices, summary and files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, example_slices, make_nifti
from PIL import Image
from test_volume import series_files

from tumor_xai import Predictor
from tumor_xai.inputs import InvalidImageError
from tumor_xai.scan import scan_columns, summary_markdown, write_scan
from tumor_xai.volume import read_volume


@pytest.fixture()
def scan_path(tmp_path):
    slices = example_slices(7)
    slices[0] = 0  # a slice past the head: marked, not assessed
    return make_nifti(tmp_path / "scan.nii.gz", slices)


def test_every_slice_is_classified_as_a_single_slice_would_be(tiny_weights_dir, scan_path):
    predictor = Predictor.from_pretrained(tiny_weights_dir)
    steps = []
    scan = predictor.predict_volume(scan_path, top_k=3, batch_size=4, progress=lambda f, t: steps.append(f))
    n = len(scan.volume)
    assert scan.probabilities.shape == (n, len(CLASSES))
    np.testing.assert_allclose(scan.probabilities.sum(axis=1), 1.0, atol=1e-5)
    for i in (1, 4, 6):
        single = predictor.predict(scan.volume.slice_image(i), explain=True)
        np.testing.assert_allclose(scan.probabilities[i], list(single.probabilities.values()), atol=1e-5)
        np.testing.assert_allclose(scan.heatmap(i), single.heatmap, atol=1e-5)  # the same Grad-CAM
    assert scan.excluded[0].startswith("too little head") and all(e is None for e in scan.excluded[1:])
    assert len(scan.top) == 3 and 0 not in scan.top
    assert list(scan.tumor_probability[scan.top]) == sorted(scan.tumor_probability[scan.top], reverse=True)
    heat = scan.heatmap(scan.top[0])
    assert (
        heat.shape == scan.volume.slices.shape[1:] and 0 <= heat.min() and heat.max() <= 1 and np.isfinite(heat).all()
    )
    assert steps[0] == 0.0 and steps[-1] == 1.0 and len(steps) >= 3


@pytest.mark.slow
def test_summary_and_files(tiny_weights_dir, scan_path, tmp_path):
    scan = Predictor.from_pretrained(tiny_weights_dir).predict_volume(scan_path, top_k=2)
    s = scan.summary()
    assert s["slices"] == 7 and s["slices_assessed"] == 6 and s["slices_little_head"] == 1
    assert s["max_tumor_slice"] in range(1, 7) and s["screening_threshold"] == 0.5
    over = s["slices_over_threshold"]
    assert over == [i for i in range(1, 7) if scan.tumor_probability[i] >= 0.5]
    assert s["most_likely_class_over_threshold"] in (None, "glioma", "meningioma", "pituitary")
    assert "7 axial slices" in summary_markdown(scan)
    paths = write_scan(scan, tmp_path / "out")
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == scan_columns(CLASSES) and [int(r["slice"]) for r in rows] == list(range(7))
    assert rows[0]["assessed"] == "false" and rows[0]["label"] == "" and rows[0]["not_assessed_reason"]
    assert float(rows[3]["position_mm"]) == pytest.approx(scan.volume.positions[3])
    assert sorted(p.name for p in (tmp_path / "out" / "top").iterdir()) == [
        f"{r:02d}_slice_{i:03d}.png" for r, i in enumerate(scan.top, 1)
    ]
    assert paths["curve"].stat().st_size > 5000 and json.loads(paths["summary"].read_text())["slices"] == 7


def test_a_ct_series_is_refused_in_words(tiny_weights_dir, tmp_path):
    for name, data in series_files(example_slices(3), modality="CT").items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(InvalidImageError, match="Not assessed: the DICOM header says this is a CT image"):
        Predictor.from_pretrained(tiny_weights_dir).predict_volume(tmp_path)


def test_a_scan_without_a_head_is_refused(tiny_weights_dir, tmp_path):
    blank = np.zeros((3, 64, 64), np.uint8)
    blank[:, 2:8, 2:8] = 255
    with pytest.raises(InvalidImageError, match="no slice of this scan shows enough of a head"):
        Predictor.from_pretrained(tiny_weights_dir).predict_volume(make_nifti(tmp_path / "b.nii", blank))


def test_a_volume_object_is_taken_as_it_is_and_thin_reformats_are_refused(tiny_weights_dir, scan_path):
    predictor = Predictor.from_pretrained(tiny_weights_dir)
    vol = read_volume(scan_path)
    scan = predictor.predict_volume(vol)
    rows = scan.rows()
    assert scan.volume is vol and len(rows) == len(vol)
    verdict = ["label", *(f"p_{c}" for c in scan.class_names), "tumor_probability", "screening_positive"]
    for row, excluded in zip(rows, scan.excluded, strict=True):  # not assessed: no verdict, only the reason
        assert row["assessed"] is (excluded is None) and row["not_assessed_reason"] == excluded
        assert all((row[k] is None) is (excluded is not None) for k in verdict), row
    assert any(e is not None for e in scan.excluded) and any(e is None for e in scan.excluded)
    # 7 slices of 2.5 mm make 96 x 18 px coronal slices: strips, not slices like the training ones
    with pytest.raises(InvalidImageError, match="do not look like the brain MRI slices"):
        predictor.predict_volume(read_volume(scan_path, "coronal"))


@pytest.mark.slow
def test_scan_request_writes_every_slice_and_refuses_bad_options(tiny_weights_dir, scan_path, tmp_path, monkeypatch):
    from tumor_xai import scan_ui, serve

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    predictor = Predictor.from_pretrained(tiny_weights_dir)
    answer = scan_ui.scan_request(predictor, [str(scan_path)], "axial", 2, browsable=True)
    assert len(answer.top) == 2 and Path(answer.csv).is_file()
    image, caption = scan_ui.browse_slice(answer.browse, 0)
    assert Path(image).parent == tmp_path / "cache" and caption.startswith("slice 0 (") and "not assessed" in caption
    image, caption = scan_ui.browse_slice(answer.browse, answer.scan.top[0])
    with Image.open(image) as shown:  # drawn on the slice's own pixels
        assert shown.size == (96, 96) and shown.mode == "RGB"
    assert caption == answer.scan.caption(answer.scan.top[0])
    with pytest.raises(serve.RequestError, match="no slice 7"):
        scan_ui.browse_slice(answer.browse, 7)
    for path in (answer.browse["slices"], answer.browse["cams"]):
        Path(path).unlink()
    with pytest.raises(serve.RequestError, match="no longer on the server"):
        scan_ui.browse_slice(answer.browse, 1)
    for plane, k, message in [("oblique", 2, "plane must be one of"), ("axial", 99, "top_k must be a whole number")]:
        with pytest.raises(serve.RequestError, match=message):
            scan_ui.scan_request(predictor, [str(scan_path)], plane, k)
    with pytest.raises(serve.RequestError, match="Add a NIfTI file"):
        scan_ui.scan_request(predictor, [], "axial", 2)


def test_tcia_dev_volume_end_to_end(tiny_weights_dir, tmp_path):
    from test_volume import TCIA

    if not TCIA.is_dir():
        pytest.skip("TUMOR_XAI_DATA is not set (the TCIA dev volumes are its sibling)")
    scan = Predictor.from_pretrained(tiny_weights_dir).predict_volume(TCIA / "PGBM-002" / "Post_Scan_T1.nii.gz")
    assert len(scan.rows()) == 24 and scan.volume.slices.shape[1:] == (256, 256)
    assert all(e is not None and e.startswith("too little head") for e in scan.excluded[20:])  # empty top slices
    paths = write_scan(scan, tmp_path / "out")
    assert paths["curve"].is_file()
