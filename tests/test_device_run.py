"""CPU rehearsal of benchmarks/device_run.sh: the one device call must work the first time it runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from test_attention import write_masks

from tumor_xai import Predictor

SCRIPT = REPO / "benchmarks" / "device_run.sh"


def external_set(data, masks, out):
    """An external set in the index.csv layout: the tiny Testing tumours (label 'tumour') with their masks."""
    out.mkdir()
    rows = []
    for name in ("glioma", "pituitary"):
        for p in sorted((data / "Testing" / name).iterdir()):
            shutil.copy(p, out / p.name)
            shutil.copy(masks / "Testing" / name / f"{p.stem}.png", out / f"{p.stem}.png")
            rows.append({"image": p.name, "label": "tumour", "mask": f"{p.stem}.png"})
    with open(out / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "label", "mask"])
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.mark.slow
@pytest.mark.e2e
def test_device_script_trains_side_by_side_ranks_and_returns_loadable_weights(tiny_dataset, tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    out.mkdir()
    masks = write_masks(tiny_dataset, tmp_path / "masks")
    env = {
        **os.environ,
        "DATA": str(tiny_dataset),
        "MASKS": str(masks),
        "EXTERNAL": str(external_set(tiny_dataset, masks, tmp_path / "ext")),
        "OUT": str(out),
        "RUNS": str(runs),
        "VARIANTS": "ship,paste+collections",
        "BUDGET": "4s",
        "PARALLEL": "2",
        "THREADS": "1",
        "DEVICE": "cpu",
        "TRAIN_ARGS": "--arch=resnet_tiny --image-size=64 --low-res-size=32 --batch-size=8",
        "PART_SIZE": "64k",  # several parts per model, so the reassembly is exercised
        "SHIP_TOP": "2",
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # What comes back fits the device tool's limits: at most 8 files of at most 16 MiB.
    files = sorted(out.iterdir())
    assert len(files) <= 8 and all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in files), files
    assert len([p for p in files if p.name.startswith("model0.safetensors.part-")]) >= 2
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(r["variant"] for r in summary["runs"]) == ["paste+collections", "ship"]
    for r in summary["runs"]:
        assert "val_acc" in r and "val_acc_flip_tta" in r and "val_stress_min" in r, r
        ext = r["external"]["ext"]
        assert 0 <= ext["tumour_sensitivity_argmax"] <= 1 and 0 <= ext["heatmap"]["pointing"] <= 1
        assert "official_acc" in r["testing"] and "notumor_recall" in r["testing"]
    assert summary["ship"] == summary["ranking"][0]
    cfg = json.loads((runs / "paste+collections" / "config.json").read_text())
    assert cfg["lesion_paste"] == 0.5 and cfg["augment"]["hist_match"] > 0 and cfg["time_budget"] == 4.0
    assert cfg["split_seed"] == 0 and cfg["low_res_size"] == 32 and cfg["image_size"] == 64

    # --unpack rebuilds every returned run as a loadable weights folder.
    dest = tmp_path / "ship"
    unpack = subprocess.run(["bash", str(SCRIPT), "--unpack", str(out), str(dest)], capture_output=True, text=True)
    assert unpack.returncode == 0, unpack.stderr
    first = dest / summary["ship"].rsplit("/", 1)[-1]
    pred = Predictor.from_pretrained(first).predict(next((tiny_dataset / "Testing" / "glioma").iterdir()))
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5
    assert (dest / "summary.md").is_file()
