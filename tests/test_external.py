"""External sets (other collections): index.csv reading, the figures, and the evaluation CLI's --external."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from test_attention import write_masks

from tumor_xai import evaluate as ev
from tumor_xai.checkpoint import load_weights
from tumor_xai.data import DataError
from tumor_xai.external import evaluate_external, read_index, summary_line

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def make_external(data, out, label_of=lambda name: "tumour", with_masks=True):
    """The tiny Testing tumour slices as an external set (labels from ``label_of(class)``), masks beside them."""
    masks = write_masks(data, out.parent / f"{out.name}-masks")
    (out / "img").mkdir(parents=True)
    rows = []
    for name in ("glioma", "meningioma", "pituitary", "notumor"):
        for p in sorted((data / "Testing" / name).iterdir())[:2]:
            shutil.copy(p, out / "img" / p.name)
            row = {"image": f"img/{p.name}", "label": label_of(name) if name != "notumor" else "notumor", "mask": ""}
            if with_masks and name != "notumor":
                shutil.copy(masks / "Testing" / name / f"{p.stem}.png", out / "img" / f"{p.stem}.png")
                row["mask"] = f"img/{p.stem}.png"
            rows.append(row)
    with open(out / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "label", "mask"])
        w.writeheader()
        w.writerows(rows)
    return out


def test_figures_of_an_external_set(tiny_dataset, tiny_weights, tmp_path):
    folder = make_external(tiny_dataset, tmp_path / "ext")
    m = evaluate_external(load_weights(tiny_weights), folder)
    assert m["n"] == 8 and m["n_tumour"] == 6  # two notumor slices are not tumours
    assert 0 <= m["tumour_sensitivity_argmax"] <= 1 and 0 <= m["tumour_sensitivity_flag"] <= 1
    q = m["notumor_probability_on_tumours"]
    assert q["q10"] <= q["q50"] <= q["q90"] and 0 <= q["share_over_0.9"] <= q["share_over_0.5"] <= 1
    assert m["class_accuracy"] is not None and m["n_class_known"] == 2  # only notumor is a known class here
    assert m["heatmap"]["n"] == 6 and 0 <= m["heatmap"]["pointing"] <= 1 and 0 <= m["heatmap"]["mass_in_mask"] <= 1
    assert "tumour sensitivity" in summary_line("ext", m)


def test_known_classes_give_class_accuracy(tiny_dataset, tiny_weights, tmp_path):
    folder = make_external(tiny_dataset, tmp_path / "ext", label_of=lambda name: name, with_masks=False)
    m = evaluate_external(load_weights(tiny_weights), folder)
    assert m["n_class_known"] == 8 and sum(m["predicted_classes"].values()) == 8 and "heatmap" not in m


@pytest.mark.parametrize(
    "content, match",
    [
        ("image,label\nimg/x.jpg,cancer\n", "label 'cancer' is not one of"),
        ("image,label\nimg/missing.jpg,tumour\n", "does not exist"),
        ("file,kind\n", "needs the columns"),
    ],
)
def test_bad_index_names_the_problem(tmp_path, content, match):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.jpg").write_bytes(b"")
    (tmp_path / "index.csv").write_text(content)
    with pytest.raises(DataError, match=match):
        read_index(tmp_path, CLASSES)
    with pytest.raises(DataError, match="no index.csv"):
        read_index(tmp_path / "img", CLASSES)


def test_cli_external_is_recorded_in_metrics_and_report(tiny_dataset, tiny_weights, tmp_path, capsys):
    folder = make_external(tiny_dataset, tmp_path / "ext")
    out = tmp_path / "eval"
    argv = ["--data", str(tiny_dataset), "--weights", str(tiny_weights), "--out", str(out), "--no-stress"]
    assert ev.main([*argv, "--external", str(folder), "--record"]) == 0
    assert "ext: 8 slices, tumour sensitivity" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["external"]["ext"]["n_tumour"] == 6
    assert "Other collections" in (out / "report.md").read_text()
    recorded = json.loads((tiny_weights / "model.json").read_text())["metrics"]
    assert recorded["external"]["ext"]["n"] == 8 and "--external" in recorded["evaluated_with"]
