"""The training CLI: argument checks, a one-epoch CPU smoke run, resume, and 2-process DDP with gloo."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tumor_xai import Predictor
from tumor_xai.schedule import lr_factor
from tumor_xai.train import main

SMOKE = ["--epochs", "1", "--image-size", "64", "--batch-size", "8", "--device", "cpu", "--arch", "resnet_tiny"]


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["--data", str(tiny_dataset), "--out", str(out), *SMOKE, "--epochs", "2"]) == 0
    return out


def test_smoke_run_writes_a_loadable_calibrated_folder(trained, tiny_dataset):
    for name in (
        "model.safetensors",
        "model.json",
        "config.json",
        "log.json",
        "last/train_state.pt",
        "best/model.json",
    ):
        assert (trained / name).is_file(), name
    log = json.loads((trained / "log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2] and {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(log[0])
    meta = json.loads((trained / "model.json").read_text())
    assert meta["training"]["epochs"] == 2 and meta["preprocessing"]["input_size"] == 64
    assert meta["calibration"]["temperature"] > 0 and 0 <= meta["screening"]["threshold"] <= 1
    assert "ood" in meta and len(meta["data_fingerprint"]) == 64
    pred = Predictor.from_pretrained(trained).predict(next((tiny_dataset / "Testing" / "glioma").iterdir()))
    assert list(pred.probabilities) == ["glioma", "meningioma", "notumor", "pituitary"]
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5
    assert pred.label in pred.probabilities and pred.tumor_probability is not None


def test_resume_continues_from_last_epoch(trained, tiny_dataset, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    assert main(["--data", str(tiny_dataset), "--out", str(out), *SMOKE, "--epochs", "3", "--resume"]) == 0
    assert [e["epoch"] for e in json.loads((out / "log.json").read_text())] == [1, 2, 3]


def test_pooling_avgmax_fine_tunes_an_average_pooled_start_and_stays_avgmax(trained, tiny_dataset, tmp_path, capsys):
    from tumor_xai.checkpoint import load_weights
    from tumor_xai.model import pooling_of

    out = tmp_path / "amx"
    args = ["--data", str(tiny_dataset), *SMOKE, "--pooling", "avgmax"]
    assert main([*args, "--out", str(out), "--init", str(trained)]) == 0
    loaded = load_weights(out)
    assert pooling_of(loaded.model) == "avgmax" and loaded.metadata["training"]["pooling"] == "avgmax"
    assert loaded.model.fc.in_features == 2 * load_weights(trained).model.fc.in_features
    pred = Predictor.from_pretrained(out).predict(next((tiny_dataset / "Testing" / "glioma").iterdir()), explain=True)
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5 and pred.heatmap is not None
    capsys.readouterr()
    # An avgmax start cannot lose its maximum, and a run resumes with the pooling it was trained with.
    back = tmp_path / "back"
    assert main(["--data", str(tiny_dataset), *SMOKE, "--out", str(back), "--init", str(out)]) == 2
    assert "pass --pooling avgmax" in capsys.readouterr().err and not back.exists()
    assert main(["--data", str(tiny_dataset), *SMOKE, "--out", str(out), "--epochs", "2", "--resume"]) == 2
    assert "resume it with --pooling avgmax" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--epochs", "2", "--resume"]) == 0
    assert pooling_of(load_weights(out).model) == "avgmax"


@pytest.mark.slow
def test_init_fine_tunes_from_weights_and_refuses_a_leaking_split(trained, tiny_dataset, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="tumor_xai.train")  # train() logs its progress; only main() prints
    out = tmp_path / "fine"
    assert main(["--data", str(tiny_dataset), "--out", str(out), *SMOKE, "--init", str(trained)]) == 0
    assert f"starting from {trained}" in caplog.text
    assert capsys.readouterr().out == f"wrote {out}\n"
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["init"] == str(trained)
    # Another seed draws another validation carve-out: the start's validation images would be trained on.
    bad = tmp_path / "leak"
    assert main(["--data", str(tiny_dataset), "--out", str(bad), *SMOKE, "--init", str(trained), "--seed", "1"]) == 2
    assert "--seed 0" in capsys.readouterr().err and not bad.exists()
    # ... unless it keeps the start's carve-out: another training seed on the same validation images.
    other = tmp_path / "seed1"
    assert (
        main(
            [
                "--data",
                str(tiny_dataset),
                "--out",
                str(other),
                *SMOKE,
                "--init",
                str(trained),
                "--seed",
                "1",
                "--split-seed",
                "0",
            ]
        )
        == 0
    )
    assert json.loads((other / "model.json").read_text())["training"]["split_seed"] == 0


def test_carve_out_seed_is_the_split_seed_when_given():
    from tumor_xai.data import carve_out_seed

    assert carve_out_seed({"seed": 3}) == 3
    assert carve_out_seed({"seed": 3, "split_seed": None}) == 3
    assert carve_out_seed({"seed": 3, "split_seed": 0}) == 0
    assert carve_out_seed({}) == 0  # weights from before the option: seed 0's carve-out


def test_ema_ships_the_average_and_resumes_it(trained, tiny_dataset, tmp_path, capsys):
    from tumor_xai.checkpoint import load_weights

    out = tmp_path / "ema"
    args = ["--data", str(tiny_dataset), "--out", str(out), *SMOKE, "--init", str(trained), "--ema", "0.9"]
    assert main([*args, "--epochs", "2"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert {"val_acc", "val_acc_raw"} <= set(log[-1])
    state = load_weights(out / "best").model.state_dict()
    raw = load_weights(out / "last").model.state_dict()
    # best/ (an epoch validation scored) holds the average, which trails the trained weights.
    assert any(not state[k].equal(raw[k]) for k in state if state[k].is_floating_point())
    assert main([*args, "--epochs", "3", "--resume"]) == 0
    assert [e["epoch"] for e in json.loads((out / "log.json").read_text())] == [1, 2, 3]
    # A run trained without an average cannot resume with one: there is no average to continue.
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(trained, plain)
    resumed = ["--data", str(tiny_dataset), "--out", str(plain), *SMOKE, "--epochs", "3", "--resume", "--ema", "0.9"]
    assert main(resumed) == 2 and "--ema 0.0" in capsys.readouterr().err


def test_freeze_through_trains_only_the_later_stages(trained, tiny_dataset, tmp_path, capsys):
    from tumor_xai.checkpoint import load_weights

    out = tmp_path / "frozen"
    args = ["--data", str(tiny_dataset), "--out", str(out), *SMOKE, "--init", str(trained), "--freeze-through"]
    assert main([*args, "layer3"]) == 0
    before, after = load_weights(trained).model.state_dict(), load_weights(out).model.state_dict()
    # Weights and BatchNorm statistics of the stem and stages 1-3 stay bit for bit; layer4 and the head learn.
    for name, tensor in after.items():
        same = tensor.equal(before[name])
        if name.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")):
            assert same, name
    assert not after["fc.weight"].equal(before["fc.weight"])
    assert not after["layer4.0.conv1.weight"].equal(before["layer4.0.conv1.weight"])
    # Frozen layers need starting weights.
    scratch = ["--data", str(tiny_dataset), "--out", str(tmp_path / "x"), *SMOKE, "--freeze-through", "layer4"]
    assert main(scratch) == 2 and "--init" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--image-size", "100"], "multiple of 32"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--epochs", "0"], "--epochs"),
        (["--val-fraction", "0.7"], "--val-fraction"),
        (["--resume"], "--resume"),
        (["--ema", "1"], "--ema"),
    ],
)
def test_bad_arguments_fail_before_any_work(tiny_dataset, tmp_path, capsys, extra, message):
    if "--device" in extra:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    out = tmp_path / "out"
    args = ["--data", str(tiny_dataset), "--out", str(out), *SMOKE]
    for i in range(0, len(extra), 2):  # later flags win in argparse
        args += extra[i : i + 2] if i + 1 < len(extra) else extra[i:]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists(), "nothing may be written when the arguments are bad"


def test_missing_data_folder_and_non_empty_out(tmp_path, tiny_dataset, capsys):
    assert main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *SMOKE]) == 2
    assert "does not exist" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    assert main(["--data", str(tiny_dataset), "--out", str(busy), *SMOKE]) == 2
    assert "not empty" in capsys.readouterr().err


def test_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)


@pytest.mark.slow
@pytest.mark.e2e
def test_torchrun_two_processes_with_gloo(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tumor_xai.train",
        "--data",
        str(tiny_dataset),
        "--out",
        str(out),
        *SMOKE,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr  # the log, from the main process only
    assert proc.stderr.count("data: ") == 1
    log = json.loads((out / "log.json").read_text())
    assert len(log) == 1 and log[0]["epoch"] == 1
    Predictor.from_pretrained(out)
