"""Last-layer retraining on lesion-pasted twins: only the classifier changes, the choice follows validation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_weights
from test_attention import write_masks

from tumor_xai.checkpoint import load_weights
from tumor_xai.preprocess import PreprocessConfig
from tumor_xai.retrain_head import choose, fit_head, main


@pytest.fixture(scope="module")
def retrained(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    init = make_weights(root / "init", preprocessing={**PreprocessConfig(input_size=64).to_dict(), "version": 1})
    masks = write_masks(tiny_dataset, root / "masks")
    out = root / "out"
    args = ["--init", str(init), "--data", str(tiny_dataset), "--masks", str(masks), "--out", str(out)]
    assert main([*args, "--passes", "1", "--batch-size", "8", "--anchor", "0,10"]) == 0
    return init, out, args


@pytest.mark.slow
def test_only_the_classifier_changes_and_the_choice_is_recorded(retrained):
    init, out, _ = retrained
    before, after = load_weights(init), load_weights(out)
    for name, tensor in after.model.state_dict().items():
        assert tensor.equal(before.model.state_dict()[name]) != name.startswith("fc."), name
    record = json.loads((out / "model.json").read_text())["head_retraining"]
    assert [r["anchor"] for r in record["table"]] == [0.0, 10.0] and record["chosen_anchor"] in (0.0, 10.0)
    assert record["n_pasted"] > 0 and record["init_sha256"] == before.metadata["weights_sha256"]
    assert record["start"]["validation_errors"] >= 0 and 0 <= record["table"][0]["pasted_sensitivity"] <= 1
    assert record["table"][0]["worst_stress_errors"] >= 0
    meta = after.metadata
    assert meta["calibration"]["temperature"] > 0 and 0 <= meta["screening"]["threshold"] <= 1
    # The start was fitted under preprocessing version 1: the features are decoded by this code, so the
    # decision and the OOD statistics are fitted under its version, and the weights say so.
    assert meta["preprocessing"] == PreprocessConfig(input_size=64).to_dict() != before.metadata["preprocessing"]
    assert "threshold" in meta["ood"] and {"ood.means", "ood.precision"} <= after.extras.keys()


@pytest.mark.slow
def test_a_start_fitted_under_this_version_keeps_its_ood_statistics(retrained, tmp_path):
    _, first, args = retrained
    out = tmp_path / "again"
    argv = ["--init", str(first), *args[2:6], "--out", str(out), "--passes", "1", "--batch-size", "8", "--anchor", "1"]
    assert main(argv) == 0
    before, after = load_weights(first), load_weights(out)
    assert after.metadata["ood"] == before.metadata["ood"]
    for name, tensor in before.extras.items():
        assert after.extras[name].equal(tensor), name


@pytest.mark.slow
def test_an_average_and_max_pooled_refit_keeps_the_network_and_refuses_features_of_another_pooling(
    retrained, tmp_path, capsys
):
    import shutil

    _, first, args = retrained
    out = tmp_path / "avgmax"
    argv = ["--init", str(first), *args[2:6], "--out", str(out), "--passes", "1", "--batch-size", "8"]
    assert main([*argv, "--anchor", "1", "--pooling", "avgmax"]) == 0
    before, after = load_weights(first), load_weights(out)
    assert after.metadata["pooling"] == "avgmax" and before.metadata["pooling"] == "avg"
    assert after.metadata["head_retraining"]["pooling"] == "avgmax"
    for name, tensor in before.model.state_dict().items():
        if not name.startswith("fc."):
            assert after.model.state_dict()[name].equal(tensor), name
    width = before.model.fc.in_features
    assert after.model.fc.weight.shape == (4, 2 * width) and after.model.fc.weight[:, width:].abs().sum() > 0
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(first / "features.pt", stale / "features.pt")  # average-pooled features
    with pytest.raises(SystemExit):
        main([*argv[:-6], "--out", str(stale), "--pooling", "avgmax"])
    assert "another pooling" in capsys.readouterr().err


def test_a_second_call_reuses_the_features(retrained):
    _, out, args = retrained
    stamp = (out / "features.pt").stat().st_mtime_ns
    assert main([*args, "--anchor", "1"]) == 0
    assert (out / "features.pt").stat().st_mtime_ns == stamp
    assert json.loads((out / "model.json").read_text())["head_retraining"]["chosen_anchor"] == 1.0


def test_the_anchor_pulls_towards_the_start_and_the_choice_respects_validation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 4, (200,), generator=g)
    w0, b0 = torch.randn(4, 8, generator=g), torch.zeros(4)
    free, _ = fit_head(x, y, w0, b0, 0.0)
    held, _ = fit_head(x, y, w0, b0, 100.0)
    assert (held - w0).norm() < 0.01 * (free - w0).norm()
    rows = [
        {"anchor": 0.0, "validation_errors": 5, "worst_stress_errors": 6, "pasted_sensitivity": 1.0},
        {"anchor": 0.1, "validation_errors": 3, "worst_stress_errors": 4, "pasted_sensitivity": 0.9},
        {"anchor": 1.0, "validation_errors": 2, "worst_stress_errors": 4, "pasted_sensitivity": 0.9},
    ]

    def start(clean: int, stress: int) -> dict:
        return {"validation_errors": clean, "worst_stress_errors": stress}

    assert choose(rows, start(2, 4), max_lost=1)["anchor"] == 1.0  # 5 errors is too many; tie -> stronger pull
    assert choose(rows, start(4, 5), max_lost=1)["anchor"] == 0.0
    assert choose(rows, start(4, 2), max_lost=1)["anchor"] == 1.0  # all too fragile under stress: the strongest pull
    assert choose(rows, start(0, 0), max_lost=0)["anchor"] == 1.0  # none allowed: the strongest pull


def test_bad_anchors_are_refused(tiny_dataset, tmp_path, capsys):
    args = ["--init", "x", "--data", str(tiny_dataset), "--masks", "m", "--out", str(tmp_path), "--anchor", "a,-1"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "--anchor takes non-negative numbers" in capsys.readouterr().err
