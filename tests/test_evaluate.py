"""Stress corruptions, localisation scoring and the evaluation CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from tumor_xai import evaluate as ev
from tumor_xai import inference
from tumor_xai.checkpoint import load_weights
from tumor_xai.data import decode_samples, discover
from tumor_xai.decode import load_image
from tumor_xai.predictor import Predictor
from tumor_xai.stress import CORRUPTIONS, adjust_contrast, corrupt, gaussian_noise, rotate

# ------------------------------------------------------------------------------------------------ stress


def _gray(h: int = 50, w: int = 70) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (0.2 + 0.6 * (xx / w) * (yy / h)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_keep_shape_and_range(name):
    gray = _gray()
    out = corrupt(name, gray, seed=3)
    assert out.shape == gray.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert not np.allclose(out, gray)  # each one actually changes the image


def test_corruption_details():
    gray = _gray()
    flat = adjust_contrast(gray, 0.7)
    assert flat.mean() == pytest.approx(gray.mean(), abs=1e-5) and flat.std() == pytest.approx(
        0.7 * gray.std(), rel=1e-4
    )
    assert np.array_equal(gaussian_noise(gray, 0.05, seed=1), gaussian_noise(gray, 0.05, seed=1))
    assert not np.array_equal(gaussian_noise(gray, 0.05, seed=1), gaussian_noise(gray, 0.05, seed=2))
    assert (gaussian_noise(gray, 0.05, 0) - gray).std() == pytest.approx(0.05, rel=0.1)
    square = np.zeros((41, 41), np.float32)
    square[20, 30] = 1.0  # a dot right of the centre moves up under a counter-clockwise turn
    turned = rotate(square, 10.0)
    y, x = np.unravel_index(turned.argmax(), turned.shape)
    assert y < 20 and x <= 30
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt("blur", gray)


# ---------------------------------------------------------------------------------------- localisation


def _mask() -> np.ndarray:
    m = np.zeros((224, 224), bool)
    m[100:120, 60:80] = True  # 400 px = 0.797 % of the image
    return m


def test_peak_on_mask_hits_and_far_peak_misses():
    mask = _mask()
    heat = np.zeros((224, 224))
    heat[110, 70] = 1.0
    assert ev.score_heatmap(heat, mask).hit == 1.0
    heat = np.zeros((224, 224))
    heat[110, 86] = 1.0  # 7 px right of the mask's edge: within the 8 px tolerance
    assert ev.score_heatmap(heat, mask).hit == 1.0
    heat = np.zeros((224, 224))
    heat[110, 89] = 1.0  # 10 px away: a miss
    assert ev.score_heatmap(heat, mask).hit == 0.0


def test_mass_fraction_by_hand():
    mask = _mask()
    heat = np.zeros((224, 224))
    heat[100:120, 60:80] = 0.5  # 400 px * 0.5 = 200 inside
    heat[0:10, 0:10] = 1.0  # 100 px * 1.0 = 100 outside
    score = ev.score_heatmap(heat, mask)
    assert score.mass == pytest.approx(200 / 300)
    assert score.hit == 0.0  # the peak (value 1) is in the far corner
    assert score.mass_baseline == pytest.approx(400 / 224**2)


def test_empty_heatmap_scores_the_uniform_baseline():
    mask = _mask()
    score = ev.score_heatmap(np.zeros((224, 224)), mask)
    assert score.empty
    assert score.mass == pytest.approx(score.mass_baseline)
    assert score.hit == pytest.approx(score.hit_baseline)
    # Pixels within 8 px of a 20 x 20 square: a (20+16) x (20+16) square with rounded corners.
    assert 0.02 < score.hit_baseline < 36 * 36 / 224**2
    with pytest.raises(ValueError, match="differs from the mask"):
        ev.score_heatmap(np.zeros((64, 64)), mask)


def test_duplicate_free_drops_testing_images_that_copy_training():
    rng = np.random.default_rng(0)
    train = rng.uniform(0, 255, (5, 32, 32)).astype(np.float32)
    test = rng.uniform(0, 255, (4, 32, 32)).astype(np.float32)
    test[1] = train[3] + 1.0  # a re-encoded copy: 1 grey level away on average
    assert ev.duplicate_free(test, train).tolist() == [True, False, True, True]


# ------------------------------------------------------------------------------ inference path parity


def test_batched_inference_matches_the_predictor(tiny_dataset, tmp_path):
    from conftest import make_weights

    weights = load_weights(make_weights(tmp_path / "w", calibration={"temperature": 1.7}))
    predictor = Predictor(weights)
    samples = discover(tiny_dataset).splits["Testing"][::3]
    split = decode_samples(samples, weights.preprocess.input_size)
    probs = ev.predict_probabilities(weights, split.images, batch_size=4)
    for p, s in zip(probs, samples, strict=False):
        single = predictor.predict(s.path).probabilities
        np.testing.assert_allclose(p, [single[c] for c in weights.class_names], atol=1e-5)
    # Corrupted images go through the same path: corrupt the decoded image, then fit_square.
    noisy = ev.predict_corrupted(weights, samples[:2], "noise_0.05", batch_size=2)
    for i, (p, s) in enumerate(zip(noisy, samples[:2], strict=False)):
        single = predictor.predict(corrupt("noise_0.05", load_image(s.path).gray, seed=i)).probabilities
        np.testing.assert_allclose(p, [single[c] for c in weights.class_names], atol=1e-5)


def test_batched_inference_matches_the_predictor_when_resizing(tiny_dataset, tmp_path):
    from conftest import make_weights

    weights = load_weights(make_weights(tmp_path / "w32", input_size=32))  # 64 px images -> 32 px input
    samples = discover(tiny_dataset).splits["Testing"][::4]
    split = decode_samples(samples, 32)
    probs = ev.predict_probabilities(weights, split.images)
    predictor = Predictor(weights)
    single = [[predictor.predict(s.path).probabilities[c] for c in weights.class_names] for s in samples]
    np.testing.assert_allclose(probs, single, atol=1e-5)


# -------------------------------------------------------------------------------------------------- CLI


def _write_masks(data: Path, out: Path, n_per_class: int = 2) -> Path:
    """Masks for the tiny dataset's tumour Testing images: the class's blob (see conftest.synthetic_slice)."""
    spots = {"glioma": (0.3, 0.3), "meningioma": (0.3, 0.7), "pituitary": (0.7, 0.5)}
    rows = ["image,mask,kaggle_class,tumor_area_fraction"]
    for name, (cy, cx) in spots.items():
        for img in sorted((data / "Testing" / name).glob("*.jpg"))[:n_per_class]:
            rel = img.relative_to(data).with_suffix(".png")
            (out / rel.parent).mkdir(parents=True, exist_ok=True)
            m = np.zeros((64, 64), np.uint8)
            yy, xx = np.mgrid[:64, :64]
            m[(yy - cy * 64) ** 2 + (xx - cx * 64) ** 2 < 9**2] = 255
            Image.fromarray(m).save(out / rel)
            rows.append(f"{img.relative_to(data).as_posix()},{rel.as_posix()},{name},{(m > 0).mean():.5f}")
    rows.append("Testing/glioma/not-in-data.jpg,Testing/glioma/not-in-data.png,glioma,0.01")  # ignored
    (out / "masks.csv").write_text("\n".join(rows) + "\n")
    return out


@pytest.mark.slow
def test_cli_writes_every_file(tiny_dataset, tiny_weights, tmp_path, capsys):
    masks = _write_masks(tiny_dataset, tmp_path / "masks")
    out = tmp_path / "eval"
    argv = [
        "--data",
        str(tiny_dataset),
        "--weights",
        str(tiny_weights),
        "--out",
        str(out),
        "--localization",
        "--masks",
        str(masks),
        "--methods",
        "gradcam,gradcam++",
        "--batch-size",
        "8",
        "--record",
    ]
    assert ev.main(argv) == 0
    for name in (
        "metrics.json",
        "confusion_matrix.json",
        "confusion_matrix.png",
        "reliability.png",
        "roc.png",
        "report.md",
        "config.json",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert {"weights", "data", "class_names", "official", "deduplicated", "stress", "localization"} <= set(m)
    assert m["official"]["n"] == 16
    for key in ("accuracy", "per_class", "macro_f1", "confusion_matrix", "tumor", "roc_auc", "ece", "nll"):
        assert key in m["official"], key
    assert {"argmax", "threshold"} <= set(m["official"]["tumor"])
    assert (
        m["deduplicated"]["removed"] == 16 - m["deduplicated"]["n"]
        and "near_duplicate_pairs" in m["deduplicated"]["method"]
    )
    assert set(m["stress"]) == set(CORRUPTIONS)
    assert all(0 <= s["accuracy"] <= 1 and s["tumor_sensitivity_argmax"] is not None for s in m["stress"].values())
    loc = m["localization"]
    assert loc["n_images"] == 6
    assert [(r["method"], r["layer"]) for r in loc["results"]] == [
        ("gradcam", "layer4"),
        ("gradcam", "layer3"),
        ("gradcam++", "layer4"),
        ("gradcam++", "layer3"),
    ]
    for r in loc["results"]:
        for target in ("true", "predicted"):
            assert 0 <= r[target]["pointing"] <= 1 and 0 <= r[target]["mass_in_mask"] <= 1
    cm = json.loads((out / "confusion_matrix.json").read_text())
    assert np.array(cm["official"]).sum() == 16
    report = (out / "report.md").read_text()
    assert "Duplicate-free subset" in report and "rotate_+10" in report and "gradcam++" in report
    # --record stored the figures in the weights' metadata, and the weights still load.
    recorded = load_weights(tiny_weights).metadata["metrics"]
    assert recorded["official"]["accuracy"] == m["official"]["accuracy"]
    assert recorded["official"]["recall"] == {k: v["recall"] for k, v in m["official"]["per_class"].items()}
    assert recorded["stress"] == {k: v["accuracy"] for k, v in m["stress"].items()}
    assert recorded["localization"]["results"][0] == {
        "method": "gradcam",
        "layer": "layer4",
        **{k: loc["results"][0]["true"][k] for k in ("pointing", "mass_in_mask")},
    }
    assert recorded["evaluated_with"].startswith("python -m tumor_xai.evaluate --data ")
    assert "--localization" in recorded["evaluated_with"] and "--record" in recorded["evaluated_with"]
    assert "accuracy" in capsys.readouterr().out


def test_localization_explains_true_and_predicted_class(tiny_dataset, tiny_weights, tmp_path, monkeypatch):
    """With a stub that lights up the mask only for the true class, 'true' always hits, 'predicted' only when right."""
    masks_dir = _write_masks(tiny_dataset, tmp_path / "masks", n_per_class=1)
    weights = load_weights(tiny_weights)
    dataset = discover(tiny_dataset)
    test = decode_samples(dataset.splits["Testing"], 64)
    masks = ev.load_masks(masks_dir, dataset)
    idx = sorted(masks)
    preds = test.labels.copy()
    preds[idx[0]] = 2  # one masked image misclassified as notumor
    inputs = {i: inference.to_input(test.images[[i]], weights.preprocess)[0] for i in idx}
    calls = []

    def stub(model, x, targets, method="gradcam", layer="layer4"):
        calls.append(len(x))
        out = np.zeros((len(x), 64, 64), np.float32)
        for k, (xk, t) in enumerate(zip(x, targets.tolist(), strict=False)):
            i = next(i for i in idx if torch.equal(inputs[i], xk))
            if t == test.labels[i]:
                out[k] = masks[i]
            else:
                out[k, 0, 0] = 1.0  # far from every mask
        return out

    monkeypatch.setattr("tumor_xai.explain.explain_batch", stub)
    res = ev.localization(weights, dataset, test, preds, masks, ("gradcam",), ("layer4",), batch_size=8)
    row = res["results"][0]
    assert calls == [3, 1]  # three true-class maps, then one predicted-class map for the one mistake
    assert row["true"]["pointing"] == 1.0 and row["true"]["mass_in_mask"] == pytest.approx(1.0)
    assert row["predicted"]["pointing"] == pytest.approx(2 / 3)
    assert res["n_misclassified"] == 1


@pytest.mark.parametrize(
    ("flag", "match"),
    [("--data", "does not exist"), ("--weights", "No weights folder")],
)
def test_cli_bad_paths_exit_2_with_one_message(tiny_dataset, tiny_weights, tmp_path, capsys, flag, match):
    args = {"--data": str(tiny_dataset), "--weights": str(tiny_weights), "--out": str(tmp_path / "o")}
    args[flag] = str(tmp_path / "missing")
    assert ev.main([a for kv in args.items() for a in kv] + ["--no-stress"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and err.startswith("error: ")


def test_cli_rejects_unknown_method_before_running(tiny_dataset, tiny_weights, tmp_path, capsys):
    argv = [
        "--data",
        str(tiny_dataset),
        "--weights",
        str(tiny_weights),
        "--out",
        str(tmp_path / "o"),
        "--localization",
        "--masks",
        str(tmp_path),
        "--methods",
        "gradcam,magic",
    ]
    assert ev.main(argv) == 2
    assert "unknown explanation method 'magic'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- shipped weights

SHIPPED = REPO / "weights"


SAMPLE_EVERY = 12  # the Testing slices re-predicted by the test below: every 12th (110 of 1311; one may differ)


@pytest.mark.slow
def test_shipped_weights_still_give_their_recorded_testing_predictions(full_data):
    """The recorded official accuracy follows from the recorded per-slice predictions, and the weights with
    today's decoding and preprocessing still give those predictions (a sample of them, to keep it quick)."""
    if not (SHIPPED / "model.json").is_file():
        pytest.skip("weights/model.json is absent: the shipped weights have not been trained yet")
    weights = load_weights(SHIPPED)
    official = (weights.metadata.get("metrics") or {}).get("official") or {}
    recorded = official.get("predictions")
    if recorded is None:
        pytest.fail(
            "weights/model.json records no metrics.official.predictions: run "
            "`python -m tumor_xai.evaluate --data DATA --out DIR --record`"
        )
    samples = discover(full_data).splits["Testing"]
    assert len(recorded) == len(samples)
    labels = np.array([s.label for s in samples])
    recorded = np.array([int(c) for c in recorded])
    assert (recorded == labels).mean() == pytest.approx(official["accuracy"], abs=1e-9)
    sample = samples[::SAMPLE_EVERY]
    split = decode_samples(sample, weights.preprocess.input_size)
    model = weights.model.to(memory_format=torch.channels_last)
    logits = inference.forward(model, split.images, weights.preprocess, batch_size=64, channels_last=True).logits
    agree = (logits.argmax(1).numpy() == recorded[::SAMPLE_EVERY]).mean()
    assert agree >= 0.99, f"only {agree:.1%} of the sampled Testing predictions match the recorded ones"
