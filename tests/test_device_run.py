"""CPU rehearsal of benchmarks/device_run.sh: the one device call must work the first time it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from test_attention import write_masks

from tumor_xai import Predictor

SCRIPT = REPO / "benchmarks" / "device_run.sh"


@pytest.mark.slow
def test_device_script_trains_picks_by_validation_and_returns_loadable_weights(tiny_dataset, tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    out.mkdir()
    env = {
        **os.environ,
        "DATA": str(tiny_dataset),
        "MASKS": str(write_masks(tiny_dataset, tmp_path / "masks")),
        "OUT": str(out),
        "RUNS": str(runs),
        "VARIANTS": "cam+strong",
        "SEEDS": "0",
        "EXTRA_SEEDS": "1",
        "EPOCHS": "1",
        "IMAGE_SIZE": "64",
        "BATCH_SIZE": "8",
        "DEVICE": "cpu",
        "EVAL_WORKERS": "1",
        "ARCH": "resnet_tiny",
        "PART_SIZE": "40K",  # several parts, so the reassembly is exercised as the 22 MB ResNet18 needs
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "2",
    }
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # What comes back fits the device tool's limits: at most 8 files of at most 16 MiB.
    files = sorted(p for p in out.iterdir())
    assert len([p for p in files if ".part-" in p.name]) >= 2
    assert len(files) <= 8 and all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in files), files
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best_variant"]
    assert best == "cam+strong"
    best_runs = [r for r in summary["runs"] if r["variant"] == best]
    assert sorted(r["seed"] for r in best_runs) == [0, 1], "the extra seeds train the variant validation prefers"
    assert all("val_acc" in r and "val_stress_min" in r and "official_acc" in r for r in best_runs)
    assert summary["ship"] in {r["run"] for r in best_runs}
    assert all(0 <= r["pointing"] <= 1 and 0 <= r["heat_in_mask"] <= 1 for r in best_runs)
    assert json.loads((runs / "cam+strong" / "seed0" / "config.json").read_text())["cam_loss_weight"] == 1.0
    # Every seed keeps out seed 0's carve-out (the shipped weights'), so the median is chosen, and gated, on one set.
    assert json.loads((runs / "cam+strong" / "seed1" / "config.json").read_text())["split_seed"] == 0
    assert "| cam+strong | 2 |" in (out / "summary.md").read_text()  # variant, runs, ...
    assert "split seed 0, shared by every run" in (out / "summary.md").read_text()

    # The parts reassemble into weights that the app's loader accepts.
    unpack = subprocess.run(
        ["bash", str(SCRIPT), "--unpack", "out", "ship"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert unpack.returncode == 0, unpack.stderr
    pred = Predictor.from_pretrained(tmp_path / "ship").predict(next((tiny_dataset / "Testing" / "glioma").iterdir()))
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5


def test_device_script_refuses_to_start_without_data(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "DATA": str(tmp_path / "none"),
        "DEVICE": "cpu",
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "not found" in proc.stderr
