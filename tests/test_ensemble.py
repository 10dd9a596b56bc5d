"""Several weights folders as one network: logits averaged, refitted on the shared carve-out, loaded like any weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_weights

from tumor_xai import ensemble, inference
from tumor_xai.checkpoint import load_weights
from tumor_xai.model import average_models, build_model, combine_models
from tumor_xai.predictor import Predictor
from tumor_xai.preprocess import PreprocessConfig

CARVE_OUT = {"seed": 0, "val_fraction": 0.25}


def _members(n: int) -> list[torch.nn.Module]:
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = build_model("resnet_tiny")
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):  # not the identity defaults
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        models.append(m.eval())
    return models


def test_the_combined_network_averages_its_members_logits_and_their_activation_maps():
    members = _members(3)
    combined = combine_models(members).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(combined(x), torch.stack([m(x) for m in members]).mean(0), atol=1e-5, rtol=0)
        # The hook-free Grad-CAM of the combined network is the mean of the members' (before the ReLU).
        targets = torch.tensor([1, 3])
        fmap, _ = inference.features_and_logits(combined, x)
        cams = [
            inference.class_activation_map(inference.features_and_logits(m, x)[0], m.fc.weight, targets, relu=False)
            for m in members
        ]
        mine = inference.class_activation_map(fmap, combined.fc.weight, targets, relu=False)
        torch.testing.assert_close(mine, torch.stack(cams).mean(0), atol=1e-5, rtol=0)
    shell = build_model("resnet_tiny", members=3)  # what a checkpoint builds before loading the tensors
    shell.load_state_dict(combined.state_dict(), strict=True)


@pytest.mark.slow
def test_the_cli_writes_weights_that_load_predict_and_say_what_they_are(tiny_dataset, tmp_path):
    a = make_weights(tmp_path / "a", seed=0, training=CARVE_OUT)
    b = make_weights(tmp_path / "b", seed=1, training=CARVE_OUT)
    out = tmp_path / "ens"
    assert ensemble.main(["--data", str(tiny_dataset), "--out", str(out), str(a), str(b)]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["members"] == 2 and [m["folder"] for m in meta["ensemble"]["members"]] == [str(a), str(b)]
    assert meta["calibration"]["fitted_on"] == "validation carve-out" and meta["calibration"]["n"] == 8
    assert "threshold" in meta["screening"] and "threshold" in meta["ood"] and meta["training"] == CARVE_OUT
    assert meta["preprocessing"] == PreprocessConfig(input_size=64).to_dict()
    loaded = load_weights(out)
    x = inference.to_input(torch.randint(0, 255, (1, 64, 64), dtype=torch.uint8), loaded.preprocess)
    members = [load_weights(p).model for p in (a, b)]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), (members[0](x) + members[1](x)) / 2, atol=1e-5, rtol=0)
    image = next((tiny_dataset / "Testing" / "glioma").iterdir())  # in distribution for the tiny data's OOD fit
    pred = Predictor.from_pretrained(out).predict(image, explain=True)
    assert (
        pred.in_distribution
        and pred.heatmap is not None
        and sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    )


def test_averaged_weights_are_the_mix_of_the_members_parameters_and_statistics():
    a, b = _members(2)
    soup = average_models([a, b], [0.75, 0.25])
    for key, value in soup.state_dict().items():
        if value.is_floating_point():  # weights, biases, BatchNorm running means and variances
            torch.testing.assert_close(value, 0.75 * a.state_dict()[key] + 0.25 * b.state_dict()[key])
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # an all-or-nothing mix is that member, and the members are left as they were
        torch.testing.assert_close(average_models([a, b], [0.0, 1.0]).eval()(x), b(x))
    with pytest.raises(ValueError, match="summing to 1"):
        average_models([a, b], [0.5, 0.6])
    with pytest.raises(ValueError, match="different architectures"):
        average_models([a, build_model("resnet18")])


def test_the_cli_averages_weights_into_one_network_and_records_the_mix(tiny_dataset, tmp_path):
    # A member fitted under an older preprocessing version still averages (the code applies the current
    # one to both); the average's decision is fitted now, under the current version, and says so.
    old = {**PreprocessConfig(input_size=64).to_dict(), "version": 1}
    a = make_weights(tmp_path / "a", seed=0, training=CARVE_OUT, preprocessing=old)
    b = make_weights(tmp_path / "b", seed=1, training={**CARVE_OUT, "init": str(a)})
    out = tmp_path / "soup"
    argv = ["--data", str(tiny_dataset), "--out", str(out), "--combine", "weights", "--mix", "0.7,0.3", str(a), str(b)]
    assert ensemble.main(argv) == 0
    meta = json.loads((out / "model.json").read_text())
    assert (
        meta["members"] == 1 and meta["ensemble"]["mix"] == [0.7, 0.3] and "parameters" in meta["ensemble"]["combine"]
    )
    assert "threshold" in meta["screening"] and "threshold" in meta["ood"] and meta["training"] == CARVE_OUT
    assert meta["preprocessing"] == PreprocessConfig(input_size=64).to_dict()
    expected = average_models([load_weights(p).model.float() for p in (a, b)], [0.7, 0.3]).eval()
    x = inference.to_input(torch.randint(0, 255, (1, 64, 64), dtype=torch.uint8), load_weights(out).preprocess)
    with torch.no_grad():
        torch.testing.assert_close(load_weights(out).model.float()(x), expected(x), atol=1e-4, rtol=0)
    with pytest.raises(SystemExit):  # a mix is for averaged weights only
        ensemble.main(["--data", str(tiny_dataset), "--out", str(out), "--mix", "0.5,0.5", str(a), str(b)])


def test_an_average_pooled_member_averages_with_an_avgmax_fine_tune_but_not_side_by_side(tiny_dataset, tmp_path):
    from tumor_xai.checkpoint import save_weights
    from tumor_xai.model import pooling_of, set_pooling

    a = make_weights(tmp_path / "a", seed=0, training=CARVE_OUT)
    torch.manual_seed(1)
    fine = set_pooling(build_model("resnet_tiny"), "avgmax")
    with torch.no_grad():
        fine.fc.weight.normal_()  # the maximum's half weighs something
    b = save_weights(
        fine, tmp_path / "b", {**json.loads((a / "model.json").read_text()), "training": {**CARVE_OUT, "init": str(a)}}
    )
    members = [load_weights(a), load_weights(b)]
    with pytest.raises(ValueError, match="another pooling"):
        ensemble.check_members(members)
    ensemble.check_members(members, "weights")
    out = tmp_path / "soup"
    argv = ["--data", str(tiny_dataset), "--out", str(out), "--combine", "weights", "--mix", "0.7,0.3", str(a), str(b)]
    assert ensemble.main(argv) == 0
    soup = load_weights(out)
    start = set_pooling(load_weights(a).model.float(), "avgmax")  # its maximum weighs zero: same answers
    expected = average_models([start, load_weights(b).model.float()], [0.7, 0.3]).eval()
    x = inference.to_input(torch.randint(0, 255, (1, 64, 64), dtype=torch.uint8), soup.preprocess)
    with torch.no_grad():
        assert pooling_of(soup.model) == "avgmax" and soup.metadata["pooling"] == "avgmax"
        torch.testing.assert_close(soup.model.float()(x), expected(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(start(x), load_weights(a).model.float()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("combine", "mix", "message"),
    [
        ("logits", [0.5, 0.5], "--combine weights only"),
        ("weights", [1.0], "1 shares for 2"),
        ("weights", [0.7, 0.4], "sum to 1"),
        ("weights", [1.2, -0.2], ">= 0"),
        ("mean", None, "combine must be one of"),
    ],
)
def test_a_bad_mix_is_refused_in_words(combine, mix, message):
    with pytest.raises(ValueError, match=message):
        ensemble.check_mix(combine, mix, 2)
    ensemble.check_mix("weights", [0.7, 0.3], 2)  # and a good one passes


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"training": {"seed": 1, "val_fraction": 0.25}}, "another validation carve-out"),
        ({"training": CARVE_OUT, "class_names": ["a", "b", "c", "d"]}, "another class_names"),
        ({"training": CARVE_OUT, "preprocessing": PreprocessConfig(input_size=32).to_dict()}, "another preprocessing"),
        ({"training": CARVE_OUT, "members": 2}, "is an ensemble already"),
    ],
)
def test_members_that_cannot_share_a_carve_out_or_outputs_are_refused(tmp_path, second, message):
    a = load_weights(make_weights(tmp_path / "a", training=CARVE_OUT))
    b = load_weights(make_weights(tmp_path / "b", **second)) if "members" not in second else None
    if b is None:  # an ensemble's folder: metadata says so (the tensors are a member's, which is enough here)
        b = load_weights(make_weights(tmp_path / "b", training=CARVE_OUT))
        b.metadata["members"] = 2
    with pytest.raises(ValueError, match=message):
        ensemble.check_members([a, b])
    with pytest.raises(ValueError, match="at least two"):
        ensemble.check_members([a])


def test_an_ensemble_is_not_a_starting_point_for_training(tmp_path):
    from tumor_xai.train import TrainConfig, check_init

    folder = tmp_path / "ens"
    folder.mkdir()
    meta = {"arch": "resnet_tiny", "members": 2, "training": CARVE_OUT, "ensemble": {"members": [{"folder": "a"}]}}
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fine-tune one of its members"):
        check_init(TrainConfig(data="x", init=str(folder), arch="resnet_tiny", val_fraction=0.25))
