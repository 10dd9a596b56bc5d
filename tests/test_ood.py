"""The OOD flag: cheap checks with readable reasons, the Mahalanobis fit, its storage and the refit CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tumor_xai import ood
from tumor_xai.checkpoint import load_weights, save_weights
from tumor_xai.decode import DecodedImage, load_image
from tumor_xai.model import build_model


def decoded(gray: np.ndarray, colorfulness: float = 0.0) -> DecodedImage:
    return DecodedImage(gray.astype(np.float32), "array", colorfulness)


def test_cheap_checks_pass_an_mri_like_slice():
    from conftest import synthetic_slice

    assert ood.cheap_checks(load_image(synthetic_slice(0, np.random.default_rng(0), 128))) is None


@pytest.mark.parametrize(
    "image, reason",
    [
        (decoded(np.full((64, 64), 0.4)), "blank or nearly uniform"),
        (decoded(np.random.default_rng(0).random((64, 64)), colorfulness=0.3), "colour picture"),
        (decoded(np.random.default_rng(0).random((40, 200))), "aspect ratio 5.0"),
        (decoded(np.random.default_rng(0).random((20, 20))), "only 20 x 20 pixels"),
    ],
)
def test_cheap_checks_say_why(image, reason):
    assert reason in ood.cheap_checks(image)


def test_colour_photo_is_flagged_through_decoding():
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[:, 32:, 2] = 180
    assert "colour picture" in ood.cheap_checks(load_image(rgb))


def _gaussian_features(n: int, shift: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g) + shift


@pytest.mark.parametrize("covariance", ["class", "single"])
def test_fit_threshold_is_the_validation_percentile(covariance):
    train = torch.cat([_gaussian_features(200, 0.0, 0), _gaussian_features(200, 3.0, 1)])
    labels = torch.tensor([0] * 200 + [1] * 200)
    val = torch.cat([_gaussian_features(50, 0.0, 2), _gaussian_features(50, 3.0, 3)])
    extras, meta = ood.fit(train, labels, val, covariance=covariance, percentile=90.0)
    assert set(extras) == {"ood.means", "ood.precision"} and all(k.startswith("ood.") for k in extras)
    assert extras["ood.means"].shape == ((2, 16) if covariance == "class" else (1, 16))
    json.dumps(meta)  # stored in model.json
    assert meta["method"] == "mahalanobis" and meta["covariance"] == covariance
    detector = ood.OodDetector.from_weights(extras, {"ood": meta})
    d = detector.distance(val)
    assert float((d > meta["threshold"]).float().mean()) == pytest.approx(0.10, abs=0.011)
    far = detector.distance(torch.full((1, 16), 12.0))[0].item()
    assert detector.reason(far) is not None and "feature distance" in detector.reason(far)
    assert detector.reason(float(d.min())) is None


def test_class_conditional_beats_one_gaussian_between_two_clusters():
    # A point midway between two tight classes is unusual for each class, but central for one Gaussian.
    train = torch.cat([_gaussian_features(300, -4.0, 0), _gaussian_features(300, 4.0, 1)]) * 0.5
    labels = torch.tensor([0] * 300 + [1] * 300)
    mid = torch.zeros(1, 16)
    scores = {}
    for cov in ("class", "single"):
        extras, meta = ood.fit(train, labels, train[::3], covariance=cov)
        scores[cov] = ood.OodDetector.from_weights(extras, {"ood": meta}).distance(mid)[0].item() / meta["threshold"]
    assert scores["class"] > 1.0 > scores["single"]


def test_fit_rejects_bad_inputs():
    with pytest.raises(ValueError, match="choose one of class, single"):
        ood.fit(torch.zeros(4, 2), torch.zeros(4), torch.zeros(2, 2), covariance="diag")
    with pytest.raises(ValueError, match="needs validation features"):
        ood.fit(torch.randn(4, 2), torch.zeros(4), torch.zeros(0, 2))


def test_detector_round_trips_through_a_weights_folder(tmp_path):
    train, labels = _gaussian_features(100, 0.0, 0), torch.zeros(100, dtype=torch.long)
    extras, meta = ood.fit(train, labels, _gaussian_features(30, 0.0, 1))
    model = build_model("resnet18", 2)
    save_weights(
        model,
        tmp_path,
        {"arch": "resnet18", "class_names": ["a", "b"], "preprocessing": {"input_size": 64}, "ood": meta},
        extras=extras,
    )
    loaded = load_weights(tmp_path)
    detector = ood.OodDetector.from_weights(loaded.extras, loaded.metadata)
    assert torch.allclose(
        detector.distance(train[:5]), ood.OodDetector.from_weights(extras, {"ood": meta}).distance(train[:5])
    )
    assert ood.OodDetector.from_weights(loaded.extras, {}) is None
    with pytest.raises(ValueError, match="incomplete.*tumor_xai.ood"):
        ood.OodDetector.from_weights({}, loaded.metadata)


def test_refit_cli_writes_statistics_into_the_weights(tiny_dataset, tiny_weights, capsys):
    before = load_weights(tiny_weights)
    assert "ood" not in before.metadata
    assert ood.main(["--data", str(tiny_dataset), "--weights", str(tiny_weights), "--batch-size", "16"]) == 0
    after = load_weights(tiny_weights)
    assert after.metadata["ood"]["method"] == "mahalanobis"
    assert after.metadata["ood"]["num_train"] + after.metadata["ood"]["num_val"] == 40
    width = before.model.fc.in_features  # the pooled feature size of the fixture's architecture
    assert after.extras["ood.precision"].shape == (width, width)
    assert after.metadata["calibration"] == before.metadata["calibration"]  # the rest is kept
    for k, v in before.model.state_dict().items():
        assert torch.equal(v, after.model.state_dict()[k])
    assert "OOD threshold" in capsys.readouterr().out


def test_refit_cli_reports_a_class_mismatch(tiny_dataset, tmp_path, capsys):
    from conftest import make_weights

    weights = make_weights(tmp_path / "w", class_names=["a", "b", "c", "d"])
    assert ood.main(["--data", str(tiny_dataset), "--weights", str(weights)]) == 2
    assert "differ from the weights" in capsys.readouterr().err
