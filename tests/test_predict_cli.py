"""The batch CLI: one CSV row per file, bad files recorded without stopping, overlays with --explain."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import CLASSES, synthetic_slice
from PIL import Image

from tumor_xai import Predictor, predict, report


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(synthetic_slice(0, rng)).save(folder / "a.jpg")
    Image.fromarray(synthetic_slice(2, rng, 96)).crop((0, 10, 96, 80)).save(folder / "sub" / "b.png")
    (folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def read_rows(out):
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_folder_with_good_and_bad_files(inputs, tiny_weights, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "missing.jpg"
    code = predict.main([str(inputs), str(missing), "--out", str(out), "--weights", str(tiny_weights), "--explain"])
    assert code == 0
    rows = {r["file"].split("/")[-1]: r for r in read_rows(out)}
    assert set(rows) == {"a.jpg", "b.png", "broken.jpg", "missing.jpg"}
    for name in ("a.jpg", "b.png"):
        r = rows[name]
        assert r["error"] == "" and r["label"] in CLASSES
        assert sum(float(r[f"p_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-4)
        assert float(r["tumor_probability"]) == pytest.approx(1.0 - float(r["p_notumor"]), abs=1e-5)
        assert r["screening_positive"] in ("true", "false") and r["in_distribution"] in ("true", "false")
        overlay = Image.open(r["overlay"])
        assert overlay.size == Image.open(r["file"]).size  # drawn on the file's own pixels
    assert rows["b.png"]["overlay"] != rows["a.jpg"]["overlay"]
    for name in ("broken.jpg", "missing.jpg"):
        assert rows[name]["error"] and rows[name]["label"] == "" and rows[name]["overlay"] == ""
    assert "missing.jpg" in rows["missing.jpg"]["error"]  # the message names the file
    assert "2 file(s) classified, 2 could not be read" in capsys.readouterr().out


def test_without_explain_writes_no_overlays(inputs, tiny_weights, tmp_path):
    out = tmp_path / "out"
    assert predict.main([str(inputs / "a.jpg"), "--out", str(out), "--weights", str(tiny_weights)]) == 0
    (row,) = read_rows(out)
    assert row["overlay"] == "" and not (out / "overlays").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "nope"], "invalid choice: 'nope'"),
        (["--layer", "layer7"], "unknown target layer 'layer7'"),
    ],
)
def test_bad_arguments_exit_2(inputs, tiny_weights, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        predict.main([str(inputs), "--out", str(tmp_path / "o"), "--weights", str(tiny_weights), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unusable_weights_exit_2_with_the_fix(inputs, tmp_path, capsys):
    assert predict.main([str(inputs), "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "nowhere")]) == 2
    assert "python -m tumor_xai.train" in capsys.readouterr().err


def test_columns_are_the_prediction_record_and_formulas_are_defused(tiny_weights, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["=1+1.png", "@SUM(1+1).png", "+cmd.png", "-2.png"]
    for name in names:
        Image.fromarray(synthetic_slice(1, rng)).save(folder / name)
    out = tmp_path / "out"
    monkeypatch.chdir(folder)  # relative names: the first cell is the name as given
    assert predict.main(["--out", str(out), "--weights", str(tiny_weights), "--", *names]) == 0
    with open(out / "predictions.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    pred = Predictor.from_pretrained(tiny_weights).predict(folder / names[0])
    assert header == ["file", *pred.to_dict(), "overlay", "error"]
    assert header == report.batch_columns(CLASSES)
    for row in rows:
        assert row[0].startswith("'"), row[0]  # a spreadsheet shows the name as text
    assert [r[0][1:] for r in rows] == names


@pytest.mark.parametrize("text", ["=HYPERLINK(x)", "+1", "-1", "@SUM(1)", "\tx", "\rx"])
def test_csv_cells_that_a_spreadsheet_would_run_are_text(text):
    assert report.csv_cell(text) == "'" + text
    assert report.csv_cell("glioma_1.jpg") == "glioma_1.jpg" and report.csv_cell(None) == ""
    assert report.csv_cell(True) == "true" and report.csv_cell(0.25) == "0.250000"


@pytest.mark.slow
def test_scans_get_a_folder_each_with_slices_curve_and_top_overlays(tiny_weights, tmp_path, capsys):
    import zipfile

    from conftest import example_slices, make_nifti
    from test_volume import series_files

    from tumor_xai.scan import scan_columns

    nifti = make_nifti(tmp_path / "brain.nii.gz", example_slices(5))
    series = tmp_path / "series"
    series.mkdir()
    for name, data in series_files(example_slices(4), tilt=10.0).items():
        (series / name).write_bytes(data)
    unrelated = tmp_path / "unrelated"  # DICOM slices of two series: single files, one row each
    unrelated.mkdir()
    for name in ("a.dcm", "b.dcm"):  # each call makes a new series
        (unrelated / name).write_bytes(next(iter(series_files(example_slices(1)).values())))
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in series.iterdir():
            zf.write(f, f"x/{f.name}")
    out = tmp_path / "out"
    args = [str(nifti), str(series), str(archive), str(unrelated), "--out", str(out), "--weights", str(tiny_weights)]
    assert predict.main([*args, "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "3 scan(s) classified, 0 refused" in printed and "2 file(s) classified" in printed
    for name, n in (("brain", 5), ("series", 4), ("series_2", 4)):
        with open(out / name / "slices.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == scan_columns(CLASSES) and [int(r["slice"]) for r in rows] == list(range(n))
        assert (out / name / "curve.png").is_file() and len(list((out / name / "top").iterdir())) == 2
    positions = [float(r["position_mm"]) for r in rows]
    assert positions == sorted(positions)
    assert len(read_rows(out)) == 2  # the unrelated DICOM files


def test_an_out_of_distribution_file_gets_no_verdict_in_the_csv(tiny_weights, tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(blank)
    out = tmp_path / "out"
    assert predict.main([str(blank), "--out", str(out), "--weights", str(tiny_weights), "--explain"]) == 0
    (row,) = read_rows(out)
    assert row["in_distribution"] == "false" and "blank" in row["ood_reason"] and row["error"] == ""
    verdict = ["label", *(f"p_{c}" for c in CLASSES), "tumor_probability", "screening_positive", "target", "overlay"]
    assert {k: row[k] for k in verdict} == dict.fromkeys(verdict, "")
