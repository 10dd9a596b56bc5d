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


def test_an_out_of_distribution_file_gets_no_verdict_in_the_csv(tiny_weights, tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(blank)
    out = tmp_path / "out"
    assert predict.main([str(blank), "--out", str(out), "--weights", str(tiny_weights), "--explain"]) == 0
    (row,) = read_rows(out)
    assert row["in_distribution"] == "false" and "blank" in row["ood_reason"] and row["error"] == ""
    verdict = ["label", *(f"p_{c}" for c in CLASSES), "tumor_probability", "screening_positive", "target", "overlay"]
    assert {k: row[k] for k in verdict} == dict.fromkeys(verdict, "")
