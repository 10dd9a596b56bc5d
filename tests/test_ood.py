"""The OOD flag: DICOM header, cheap and head-shape checks with readable reasons, the Mahalanobis fit, its
storage, the refit CLI, and the shipped detector on real non-brain medical images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tumor_xai import ood
from tumor_xai.checkpoint import load_weights, save_weights
from tumor_xai.decode import DecodedImage, load_image
from tumor_xai.model import build_model
from tumor_xai.preprocess import fit_square, quantize

REPO_ROOT = Path(__file__).resolve().parent.parent


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
    assert meta["method"] == ood.METHOD and meta["covariance"] == covariance and meta["shape"] is None
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
    fitted = after.metadata["ood"]
    assert fitted["method"] == ood.METHOD and fitted["num_train"] + fitted["num_val"] == 40
    width = before.model.layer1[-1].conv2.out_channels * ood.LAYOUT_GRID**2  # layer1's channels on a 3 x 3 grid
    assert after.extras["ood.precision"].shape == (width, width) == (fitted["dimensions"],) * 2
    assert set(fitted["shape"]["limits"]) == set(ood.SHAPE_STATS) and fitted["shape"]["n"] == 40
    assert after.metadata["calibration"] == before.metadata["calibration"]  # the rest is kept
    for k, v in before.model.state_dict().items():
        assert torch.equal(v, after.model.state_dict()[k])
    assert "OOD threshold" in capsys.readouterr().out


def test_refit_cli_reports_a_class_mismatch(tiny_dataset, tmp_path, capsys):
    from conftest import make_weights

    weights = make_weights(tmp_path / "w", class_names=["a", "b", "c", "d"])
    assert ood.main(["--data", str(tiny_dataset), "--weights", str(weights)]) == 2
    assert "differ from the weights" in capsys.readouterr().err


def test_layout_statistics_are_layer1_channel_means_on_a_3_by_3_grid():
    fmap = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    got = ood.layout_statistics(1, fmap).reshape(2, 3, 3, 3)
    assert torch.allclose(got[1, 2, 0, 1], fmap[1, 2, 0:2, 2:4].mean())  # channel 2, top row, middle column
    assert torch.allclose(got[0, 0, 2, 2], fmap[0, 0, 4:6, 4:6].mean())
    assert all(ood.layout_statistics(stage, fmap) is None for stage in (2, 3, 4))


def test_features_come_from_the_same_forward_pass(tiny_weights_dir):
    from tumor_xai import inference

    w = load_weights(tiny_weights_dir)
    squares = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    out = inference.forward(w.model, squares, w.preprocess, stage_stats=ood.layout_statistics)
    assert out.stage_stats.shape == (3, w.model.layer1[-1].conv2.out_channels * 9)
    assert torch.equal(ood.feature_vector(out), ood.extract_features(w.model, squares, w.preprocess))
    with pytest.raises(ValueError, match="stage_stats"):
        ood.feature_vector(inference.forward(w.model, squares, w.preprocess))


@pytest.mark.parametrize("method", sorted(ood.OLDER_METHODS))
def test_older_statistics_are_ignored_with_a_warning(caplog, method):
    assert ood.OodDetector.from_weights({}, {"ood": {"method": method, "threshold": 1.0}}) is None
    assert "refit them" in caplog.text
    with pytest.raises(ValueError, match="unsupported OOD method"):
        ood.OodDetector.from_weights({}, {"ood": {"method": "knn"}})


@pytest.mark.parametrize(
    "info, reason",
    [
        ({"Modality": "CT"}, "a CT image (Modality CT)"),
        ({"Modality": "US"}, "an ultrasound image"),
        ({"Modality": "MR", "BodyPartExamined": "ABDOMEN"}, "body part is ABDOMEN"),
        ({"Modality": "MR", "BodyPartExamined": "HEAD"}, None),
        ({"Modality": "MR", "BodyPartExamined": "other"}, None),  # free text we do not echo: no verdict
        ({"Modality": "OT"}, None),  # a secondary capture says nothing about what was scanned
        ({}, None),
    ],
)
def test_header_check(info, reason):
    got = ood.header_check(DecodedImage(np.zeros((8, 8), np.float32), "DICOM", 0.0, info))
    assert got == reason if reason is None else reason in got


def _disc(size: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size / 2
    head = np.hypot(yy, xx * 1.2) < radius * size
    return np.where(head, np.clip(rng.normal(120, 35, (size, size)), 1, 255), 0).astype(np.uint8)


def test_head_shape_tells_a_head_from_a_speck_a_scatter_and_a_drawing():
    rng = np.random.default_rng(0)
    head = ood.head_shape(_disc(224, 0.42, rng))
    assert head["head_area"] > 0.4 and head["single_region"] > 0.99 and head["ellipse_fit"] > 0.95
    assert head["texture"] > 5.0
    assert ood.head_shape(_disc(224, 0.1, rng))["head_area"] < 0.05
    scatter = np.zeros((224, 224), np.uint8)
    for y, x in rng.integers(10, 200, (12, 2)):
        scatter[y : y + 14, x : x + 14] = 200
    assert ood.head_shape(scatter)["single_region"] < 0.3
    drawing = np.where(_disc(224, 0.42, rng) > 0, 90, 0).astype(np.uint8)
    drawing[80:120, 90:130] = 200
    assert ood.head_shape(drawing)["texture"] < 2.0
    limits = {k: 0.5 * v for k, v in head.items()}
    assert ood.OodDetector(torch.zeros(1, 1), torch.eye(1), 1.0, limits).shape_reason(head) is None
    assert "too few grey levels" in ood.OodDetector(torch.zeros(1, 1), torch.eye(1), 1.0, limits).shape_reason(
        ood.head_shape(drawing)
    )


# --------------------------------------------------------------------------- real non-brain images


def _testdata(name: str):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom version")
    return path


@pytest.mark.parametrize(
    "name, reason",
    [
        ("CT_small.dcm", "Modality CT"),
        ("examples_overlay.dcm", "body part is ABDOMEN"),
        ("examples_ybr_color.dcm", "Modality US"),
        ("JPEG2000.dcm", "Modality NM"),
    ],
)
def test_real_non_brain_dicoms_are_flagged_by_their_header(name, reason):
    assert reason in ood.header_check(load_image(_testdata(name)))


@pytest.fixture(scope="module")
def shipped():
    from tumor_xai.predictor import Predictor

    return Predictor.from_pretrained()


def _pixels_only(name: str) -> np.ndarray:
    """A bundled DICOM's middle frame as plain pixels (what an exported PNG holds): no header to go by."""
    return load_image(_testdata(name)).gray


# Pixels without a header, so only the image checks can flag them. The abdominal MR (a round body section
# with MRI texture) passes the shipped weights' layout test, at a distance below the threshold; strict: the
# day a detector flags it, the mark must go.
_FEATURES_PASS = pytest.mark.xfail(strict=True, reason="passes the shipped weights' feature test (see the model card)")


@pytest.mark.parametrize(
    "name",
    [
        "spine CT",
        pytest.param("abdomen MR", marks=_FEATURES_PASS),
        "ultrasound",
        "Shepp-Logan phantom",
    ],
)
def test_shipped_detector_flags_non_brain_pixels(shipped, name):
    from skimage.data import shepp_logan_phantom

    others = {
        "spine CT": lambda: _pixels_only("CT_small.dcm"),
        "abdomen MR": lambda: _pixels_only("examples_overlay.dcm"),
        "ultrasound": lambda: _pixels_only("examples_ybr_color.dcm"),
        "Shepp-Logan phantom": lambda: shepp_logan_phantom().astype(np.float32),
    }
    assert not shipped.predict(others[name]()).in_distribution, f"{name} passed as a brain MRI slice"


@pytest.mark.slow
def test_shipped_detector_passes_the_examples(shipped):
    from conftest import EXAMPLES

    for path in sorted(EXAMPLES.glob("*.jpg")):
        assert shipped.predict(path).in_distribution, path.name


def test_check_runs_on_the_square_the_model_sees(shipped):
    from conftest import EXAMPLES

    image = load_image(EXAMPLES / "glioma_1.jpg")
    square = quantize(fit_square(image.gray, shipped.preprocess.input_size)[0])
    features = ood.extract_features(shipped.model, square[None], shipped.preprocess)
    assert ood.check(image, square, shipped.ood, features) is None
    ct = DecodedImage(image.gray, "DICOM", 0.0, {"Modality": "CT"})
    assert "Modality CT" in ood.check(ct, square, shipped.ood, features)


def test_fit_model_takes_training_tensors_and_check_falls_through_to_the_features(tiny_weights_dir):
    from conftest import synthetic_slice

    w = load_weights(tiny_weights_dir)
    rng = np.random.default_rng(0)
    squares = np.stack([synthetic_slice(i % 4, rng, 64) for i in range(40)])
    as_trained = torch.from_numpy(squares)[:, None]  # (N, 1, S, S) uint8, as training holds them
    extras, meta = ood.fit_model(
        w.model, as_trained, torch.arange(40) % 4, np.arange(32), np.arange(32, 40), w.preprocess
    )
    assert meta["num_train"] == 32 and meta["num_val"] == 8 and meta["shape"]["n"] == 40
    detector = ood.OodDetector.from_weights(extras, {"ood": meta})
    head = squares[0]
    assert detector.shape_reason(ood.head_shape(head)) is None
    noise = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    detector.shape_limits = None  # noise is no head either; here the feature test must say so by itself
    features = ood.extract_features(w.model, noise[None], w.preprocess)
    assert "feature distance" in ood.check(load_image(noise), noise, detector, features)


def test_an_augmented_fit_adds_one_copy_of_each_slice_drawn_with_the_training_recipe(tiny_weights_dir):
    from conftest import synthetic_slice

    from tumor_xai.augment import AugmentConfig

    w = load_weights(tiny_weights_dir)
    rng = np.random.default_rng(0)
    squares = np.stack([synthetic_slice(i % 4, rng, 64) for i in range(40)])
    recipe = ood.training_recipe({"training": {"augment": {**AugmentConfig().to_dict(), "noise": 0.06}}})
    assert recipe == AugmentConfig(noise=0.06) and ood.training_recipe({}) is None
    copies = ood.augmented_copies(squares, recipe, seed=3)
    assert copies.dtype == np.uint8 and copies.shape == squares.shape and (copies != squares).any()
    np.testing.assert_array_equal(copies, ood.augmented_copies(squares, recipe, seed=3))  # seeded, reproducible
    labels, train, val = torch.arange(40) % 4, np.arange(32), np.arange(32, 40)
    _, plain = ood.fit_model(w.model, squares, labels, train, val, w.preprocess)
    _, meta = ood.fit_model(w.model, squares, labels, train, val, w.preprocess, augment=recipe, seed=3)
    assert (meta["num_train"], meta["num_val"], meta["augmented_copies"]) == (64, 16, True)
    assert (plain["num_train"], plain["augmented_copies"]) == (32, False)


# --------------------------------------------------------------------------- CT refused by its bone ring


def _head(size: int, skull: float, skull_width: float, layer: float, rng: np.random.Generator) -> np.ndarray:
    """An axial head: a textured brain (grey ~100), inside a dark layer of ``layer`` (share of the
    radius, grey 15: MRI's signal-free bone), inside a ring of ``skull`` brightness and ``skull_width``."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    r = np.hypot(yy, xx * 1.15) / (0.42 * size)
    img = np.clip(rng.normal(100, 18, (size, size)), 40, 160)
    img = np.where(r > 1 - skull_width - layer, 15.0, img)
    img = np.where(r > 1 - skull_width, skull, img)
    img = np.where(r > 1, 0.0, img)
    return cv2.GaussianBlur(img.astype(np.float32), (3, 3), 0).clip(0, 255).astype(np.uint8)


def test_the_bone_ring_tells_a_head_ct_from_an_mri_slice():
    rng = np.random.default_rng(0)
    ct = _head(224, skull=255, skull_width=0.09, layer=0.0, rng=rng)  # thick bright bone, brain right inside
    mri = _head(224, skull=230, skull_width=0.04, layer=0.05, rng=rng)  # bright scalp fat, then dark bone
    assert "looks like a CT slice" in ood.skull_ring_reason(ct)
    ring = ood.skull_ring(ct)
    assert ring["bright"] > 0.95 and 0.07 < ring["thick"] < 0.12 and ring["dark_layer"] > 0.8
    assert ood.skull_ring_reason(mri) is None and ood.skull_ring(mri)["dark_layer"] < 0.3
    # A head without a bright rim (T2, skull-stripped, the synthetic slices) is no CT either, nor is an empty square.
    from conftest import synthetic_slice

    assert ood.skull_ring_reason(synthetic_slice(1, rng, 224)) is None
    assert ood.skull_ring(np.zeros((64, 64), np.uint8)) is None
    # The check runs on every image, with or without fitted statistics.
    assert "CT slice" in ood.check(load_image(ct), ct, None, None)


def test_kaggle_ct_slices_are_refused_and_its_mri_slices_pass(full_data):
    """The Kaggle set holds a few head CT slices among its MRI (by eye: benchmarks/testing_ct_slices.txt)."""
    lines = (REPO_ROOT / "benchmarks" / "testing_ct_slices.txt").read_text().splitlines()
    listed = [line for line in lines if line and not line.startswith("#")]
    assert len(listed) == 35
    for name in listed[::7]:
        path = full_data / "Testing" / name
        square = quantize(fit_square(load_image(path).gray, 224)[0])
        assert ood.skull_ring_reason(square) is not None, name
    for path in sorted((full_data / "Testing" / "glioma").glob("*.jpg"))[:40]:
        assert ood.skull_ring_reason(quantize(fit_square(load_image(path).gray, 224)[0])) is None, path.name


def test_a_scalp_ring_apart_from_the_brain_is_one_head_but_two_heads_are_not():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:224, :224] - 112
    r = np.hypot(yy, xx * 1.2)
    ring = (r > 88) & (r < 96)  # bright scalp fat, dark bone between it and the brain
    scalp = np.where(ring, 200, _disc(224, 0.35, rng)).astype(np.uint8)
    assert ood.head_shape(scalp)["single_region"] > 0.99
    twins = np.zeros((224, 224), np.uint8)
    twins[:, :112] = _disc(224, 0.2, rng)[:, 56:168]
    twins[:, 112:] = _disc(224, 0.2, rng)[:, 56:168]
    assert ood.head_shape(twins)["single_region"] < 0.6
