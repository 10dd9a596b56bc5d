"""The dataset report CLI: Markdown with every linked figure, counts that match the data, planted duplicates found."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_dataset
from PIL import Image

from tumor_xai.dataset_report import _head_extent, jpeg_quality, main, nearest_mad

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(data: Path, out: Path) -> tuple[str, dict]:
    assert main(["--data", str(data), "--out", str(out), "--max-examples", "3", "--workers", "2"]) == 0
    return (out / "README.md").read_text(), json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def clean_report(tiny_dataset, tmp_path_factory) -> tuple[Path, str, dict]:
    out = tmp_path_factory.mktemp("report-clean")
    return (out, *_run(tiny_dataset, out))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """A tiny dataset with three planted duplicates, and the report on it."""
    root = make_dataset(tmp_path_factory.mktemp("planted-data"))
    tr, te = root / "Training", root / "Testing"
    # 1. the same picture re-encoded at another JPEG quality, across the split, same label
    with Image.open(tr / "glioma" / "Tr-gl_0003.jpg") as img:
        img.save(te / "glioma" / "Te-gl_planted.jpg", quality=70)
    # 2. a byte-identical copy across the split under another label
    shutil.copyfile(tr / "meningioma" / "Tr-me_0005.jpg", te / "pituitary" / "Te-pi_planted.jpg")
    # 3. a byte-identical copy within Training
    shutil.copyfile(tr / "notumor" / "Tr-no_0001.jpg", tr / "notumor" / "Tr-no_copy.jpg")
    out = tmp_path_factory.mktemp("report-planted")
    text, summary = _run(root, out)
    return {"text": text, "summary": summary}


@pytest.mark.slow  # builds a whole report (decoding, census, seven figures)
def test_report_links_only_figures_that_exist(clean_report):
    out, text, _ = clean_report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) >= 7
    for link in links:
        png = out / link
        assert png.is_file(), f"README links {link}, which was not written"
        assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow  # builds a whole report (decoding, census, seven figures)
def test_counts_table_matches_the_dataset(clean_report):
    _, text, summary = clean_report
    for name in CLASSES:
        assert re.search(rf"^\| {name} \| 10 \| 4 \| 14 \|$", text, re.M), name
    assert re.search(r"^\| \*\*total\*\* \| 40 \| 16 \| 56 \|$", text, re.M)
    assert summary["counts"] == {"Training": [10] * 4, "Testing": [4] * 4}
    assert summary["class_names"] == CLASSES


@pytest.mark.slow  # builds a whole report (decoding, census, seven figures)
def test_clean_synthetic_dataset_has_no_duplicates(clean_report):
    _, _, summary = clean_report
    assert summary["exact"]["testing_identical_to_training"] == 0
    assert summary["near"]["testing_with_training_twin"] == 0
    assert summary["near"]["training_pairs"] == 0
    assert summary["near"]["duplicate_free_testing"] == 16


@pytest.mark.slow  # builds a whole report (decoding, census, seven figures)
def test_planted_duplicates_are_found_and_counted(planted):
    s = planted["summary"]
    near, exact = s["near"], s["exact"]
    assert near["testing_with_training_twin"] == 2
    assert near["testing_with_training_twin_per_class"] == {"glioma": 1, "meningioma": 0, "notumor": 0, "pituitary": 1}
    assert near["duplicate_free_testing"] == 18 - 2
    assert sorted(near["testing_with_training_twin_files"]) == [
        "Testing/glioma/Te-gl_planted.jpg",
        "Testing/pituitary/Te-pi_planted.jpg",
    ]
    assert exact["testing_identical_to_training"] == 1  # the re-encoded copy differs in bytes
    assert exact["training_redundant"] == 1
    assert near["training_pairs"] == 1
    assert near["training_redundant"] == 1
    assert "1 Training images are redundant copies, 1 of them in notumor" in planted["text"]


@pytest.mark.slow  # builds a whole report (decoding, census, seven figures)
def test_cross_class_duplicate_is_listed_by_name(planted):
    s, text = planted["summary"], planted["text"]
    assert s["near"]["cross_class_across"] == [
        ["Testing/pituitary/Te-pi_planted.jpg", "Training/meningioma/Tr-me_0005.jpg", 0.0]
    ]
    assert s["exact"]["cross_class_across"] == [
        ["Testing/pituitary/Te-pi_planted.jpg", "Training/meningioma/Tr-me_0005.jpg"]
    ]
    assert "`Testing/pituitary/Te-pi_planted.jpg`" in text
    assert s["near"]["closest_cross_class_across"][2] == 0.0


def test_missing_data_folder_exits_2_with_a_message(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_dataset_without_testing_split_exits_2(tmp_path, capsys):
    make_dataset(tmp_path / "data", per_class={"Training": 1})
    assert main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 2
    assert "Missing split folder" in capsys.readouterr().err


@pytest.mark.parametrize("quality", [50, 75, 95])
def test_jpeg_quality_estimate_recovers_the_saved_setting(tmp_path, quality):
    path = tmp_path / "x.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(path, quality=quality)
    with Image.open(path) as img:
        assert jpeg_quality(img) == pytest.approx(quality, abs=1)


def test_jpeg_quality_is_none_for_png():
    assert jpeg_quality(Image.new("L", (8, 8))) is None


def test_head_extent_measures_the_box_around_the_foreground():
    images = np.zeros((2, 100, 100), np.uint8)
    images[0, 10:60, 20:70] = 120  # a 50 x 50 head
    assert _head_extent(images).tolist() == [0.25, 0.0]


def test_nearest_mad_separates_same_and_other_labels():
    a = np.zeros((1, 4, 4), np.float32)
    b = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 5.0)]).astype(np.float32)
    dist, idx, other = nearest_mad(a, np.array([0]), b, np.array([0, 1]))
    assert dist.tolist() == [1.0] and idx.tolist() == [0] and other.tolist() == [5.0]
    _, _, none = nearest_mad(a, np.array([0]), b, np.array([0, 0]))
    assert np.isinf(none).all()
