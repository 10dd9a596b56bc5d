"""Predictor: calibrated probabilities in the weights' order, heatmaps on the input's own pixels, thread safety."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, EXAMPLES, REPO, make_weights, synthetic_slice
from PIL import Image

from tumor_xai import ood
from tumor_xai.checkpoint import LoadedWeights
from tumor_xai.decode import InvalidImageError, load_image
from tumor_xai.model import TinyResNet, features_and_logits
from tumor_xai.predictor import Predictor
from tumor_xai.preprocess import PreprocessConfig, fit_square, normalize, prepare


@pytest.fixture()
def predictor(tiny_weights) -> Predictor:
    return Predictor.from_pretrained(tiny_weights)


def slice_(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(synthetic_slice(1, rng, max(h, w))).resize((w, h)))


def test_probabilities_follow_the_weights_class_order_and_temperature(tmp_path):
    image = slice_()
    cold = Predictor.from_pretrained(make_weights(tmp_path / "t1", calibration={"temperature": 1.0}))
    hot = Predictor.from_pretrained(make_weights(tmp_path / "t3", calibration={"temperature": 3.0}))
    x, _ = prepare(load_image(image).gray, cold.preprocess)
    with torch.inference_mode():
        _, logits = features_and_logits(cold.model, x)
    for pred, t in ((cold, 1.0), (hot, 3.0)):
        p = pred.predict(image)
        assert list(p.probabilities) == CLASSES
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        expected = torch.softmax(logits / t, dim=1)[0].numpy()
        np.testing.assert_allclose(list(p.probabilities.values()), expected, rtol=1e-5)
        assert p.label == CLASSES[int(expected.argmax())]
        assert p.tumor_probability == pytest.approx(1.0 - p.probabilities["notumor"])


def test_screening_flag_uses_the_stored_threshold(tmp_path):
    image = slice_()
    never = Predictor.from_pretrained(make_weights(tmp_path / "a", screening={"threshold": 1.0})).predict(image)
    always = Predictor.from_pretrained(make_weights(tmp_path / "b", screening={"threshold": 0.0})).predict(image)
    absent = Predictor.from_pretrained(make_weights(tmp_path / "c", screening={})).predict(image)
    assert never.screening_positive is False and always.screening_positive is True
    assert absent.screening_positive is None


@pytest.mark.parametrize("h, w", [(64, 64), (200, 200), (48, 80), (90, 50)])
def test_heatmap_and_overlay_have_the_input_size(predictor, h, w):
    p = predictor.predict(slice_(h, w), explain=True)
    assert p.heatmap.shape == (h, w) and p.heatmap.dtype == np.float32
    assert np.isfinite(p.heatmap).all() and p.heatmap.min() >= 0.0 and p.heatmap.max() <= 1.0
    assert p.overlay.size == (w, h) and p.overlay.mode == "RGB"
    assert p.method == "gradcam" and p.target == p.label


def test_every_input_kind_gives_the_same_answer(predictor, tmp_path):
    array = slice_(60, 70)
    path = tmp_path / "s.png"
    Image.fromarray(array).save(path)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    results = [
        predictor.predict(src, explain=True)
        for src in (array, Image.fromarray(array), path, str(path), buf.getvalue(), load_image(array))
    ]
    for r in results[1:]:
        assert r.probabilities == pytest.approx(results[0].probabilities)
        np.testing.assert_allclose(r.heatmap, results[0].heatmap, atol=1e-6)


def test_target_class_and_options(predictor):
    image = slice_()
    p = predictor.predict(
        image, explain=True, target="pituitary", method="gradcam++", layer="layer3", colormap="viridis", alpha=0.7
    )
    assert p.target == "pituitary" and p.method == "gradcam++" and p.heatmap.shape == (64, 64)
    assert predictor.predict(image).heatmap is None
    with pytest.raises(ValueError, match="unknown target class 'cat'; choose one of glioma, meningioma"):
        predictor.predict(image, explain=True, target="cat")
    with pytest.raises(ValueError, match="unknown explanation method 'gradcam3'; choose one of gradcam"):
        predictor.predict(image, explain=True, method="gradcam3")
    with pytest.raises(ValueError, match="unknown target layer"):
        predictor.predict(image, explain=True, layer="layer9")
    with pytest.raises(InvalidImageError):
        predictor.predict(b"not an image")


def test_concurrent_requests_equal_serial_ones(predictor):
    # (one intra-op thread per request, as conftest sets: 8 threads x intra-op threads would thrash)
    jobs = [
        (slice_(56 + 4 * i, 64, seed=i), m) for i, m in enumerate(["gradcam", "gradcam++", "layercam", "eigencam"] * 2)
    ]
    serial = [predictor.predict(img, explain=True, method=m) for img, m in jobs]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(2):
            futures = [pool.submit(predictor.predict, img, explain=True, method=m) for img, m in jobs * 2]
            for f, s in zip(futures, serial * 2, strict=False):
                r = f.result()
                assert r.probabilities == pytest.approx(s.probabilities, abs=1e-6)
                np.testing.assert_allclose(r.heatmap, s.heatmap, atol=1e-5)
    assert all(not m._forward_hooks for m in predictor.model.modules())


def test_ood_flags_pictures_that_are_not_slices(tiny_weights, tiny_dataset):
    assert ood.main(["--data", str(tiny_dataset), "--weights", str(tiny_weights)]) == 0
    predictor = Predictor.from_pretrained(tiny_weights)
    colour = np.zeros((64, 64, 3), dtype=np.uint8)
    colour[..., 1] = 200
    colour[16:48, 16:48, 0] = 255
    blank = np.zeros((64, 64), dtype=np.uint8)
    for image, reason in ((colour, "colour"), (blank, "blank")):
        p = predictor.predict(image, explain=True)
        assert p.in_distribution is False and reason in p.ood_reason
        # No verdict of any kind: no class, probabilities, tumour probability, flag or heatmap.
        assert p.label is None and list(p.probabilities) == CLASSES and set(p.probabilities.values()) == {None}
        assert p.tumor_probability is None and p.screening_positive is None
        assert p.heatmap is None and p.overlay is None and p.method is None and p.target is None
        record = p.to_dict()
        assert record["in_distribution"] is False and record["ood_reason"] == p.ood_reason
        assert [k for k, v in record.items() if v is not None] == ["in_distribution", "ood_reason"]
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    p = predictor.predict(noise)
    assert p.in_distribution is False and ("head-shaped" in p.ood_reason or "feature distance" in p.ood_reason)
    train_slice = next((tiny_dataset / "Training" / "glioma").iterdir())
    assert predictor.predict(train_slice).in_distribution is True


# --------------------------------------------------------------------------- end to end localisation

SQUARE_CLASSES = ["notumor", "square"]
SQUARE_INPUT = 96  # a 3 x 3 last-block grid: at 64 px (2 x 2) briefly trained cells are too coarse to trust


def _square_image(
    rng: np.random.Generator, h: int, w: int, quadrant: int | None
) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    """Dim noise; positives add a bright square centred (with jitter) in one quadrant of the padded canvas."""
    a = rng.normal(0.25, 0.04, (h, w)).clip(0, 1).astype(np.float32)
    if quadrant is None:
        return a, None
    side, canvas = int(0.22 * min(h, w)), max(h, w)
    top, left = (canvas - h) // 2, (canvas - w) // 2
    cy = canvas * (0.25 + 0.5 * (quadrant // 2)) - top + rng.integers(-canvas // 16, canvas // 16 + 1)
    cx = canvas * (0.25 + 0.5 * (quadrant % 2)) - left + rng.integers(-canvas // 16, canvas // 16 + 1)
    y = int(np.clip(cy - side / 2, 0, h - side))
    x = int(np.clip(cx - side / 2, 0, w - side))
    a[y : y + side, x : x + side] = 0.95
    return a, (y, x, side)


@pytest.fixture(scope="module")
def square_predictor(tmp_path_factory) -> Predictor:
    """A tiny ResNet at 96 px trained for a few seconds to tell 'a bright square somewhere' from 'none'."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # No per-image stretch here: with it, the square's presence changes the whole image's contrast
    # and the model need not look at the square at all. This test is about geometry.
    cfg = PreprocessConfig(input_size=SQUARE_INPUT, intensity="none")
    model = TinyResNet(widths=(16, 32, 64, 128), num_classes=len(SQUARE_CLASSES))
    model.conv1 = torch.nn.Conv2d(1, 16, kernel_size=7, stride=2, padding=3, bias=False)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for step in range(80):
        labels = rng.integers(0, 2, 32)
        shapes = [(64, 64) if step % 2 else ((64, 96) if rng.random() < 0.5 else (96, 64)) for _ in labels]
        quadrants = [int(rng.integers(0, 4)) if lab else None for lab in labels]
        squares = [
            fit_square(_square_image(rng, h, w, q)[0], SQUARE_INPUT)[0]
            for (h, w), q in zip(shapes, quadrants, strict=False)
        ]
        loss = F.cross_entropy(
            model(normalize(torch.from_numpy(np.stack(squares))[:, None], cfg)), torch.from_numpy(labels)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = {"arch": "resnet_tiny", "class_names": SQUARE_CLASSES, "preprocessing": cfg.to_dict()}
    return Predictor(LoadedWeights(model.eval(), meta, {}, tmp_path_factory.mktemp("square-weights")))


@pytest.mark.slow
@pytest.mark.parametrize("h, w", [(64, 64), (128, 128), (64, 96), (96, 64), (100, 60)])
def test_heatmap_peak_sits_on_the_square_wherever_it_is(square_predictor, h, w):
    rng = np.random.default_rng(h * 1000 + w)
    canvas = max(h, w)
    top, left = (canvas - h) // 2, (canvas - w) // 2
    for quadrant in range(4):
        image, (y, x, side) = _square_image(rng, h, w, quadrant)
        p = square_predictor.predict(image, explain=True, target="square")
        assert p.heatmap.shape == (h, w)
        assert p.probabilities["square"] > 0.9
        inside = p.heatmap[y : y + side, x : x + side].mean()
        assert inside > 1.5 * p.heatmap.mean(), (
            f"square at {(y, x, side)} in {h}x{w}: inside {inside:.2f}, overall {p.heatmap.mean():.2f}"
        )
        py, px = np.unravel_index(p.heatmap.argmax(), p.heatmap.shape)
        # The peak, taken back to the padded canvas, falls in the square's quadrant.
        peak_quadrant = 2 * int(py + top >= canvas / 2) + int(px + left >= canvas / 2)
        assert peak_quadrant == quadrant, f"square at {(y, x, side)} in {h}x{w}, peak at {(py, px)}"


# --------------------------------------------------------------------------- the shipped weights

SHIPPED_EXAMPLES = sorted(EXAMPLES.glob("*.jpg"))


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "weights" / "model.json").is_file(), reason="no shipped weights in weights/")
def test_shipped_weights_classify_the_examples_alike_on_every_path():
    """Each committed example: its own class, probabilities summing to 1, the same numbers as the evaluation path."""
    from tumor_xai.data import Sample, decode_samples
    from tumor_xai.evaluate import predict_probabilities

    predictor = Predictor.from_pretrained()
    names = predictor.class_names
    squares = decode_samples([Sample(p, 0) for p in SHIPPED_EXAMPLES], predictor.preprocess.input_size).images
    batched = predict_probabilities(predictor.weights, squares, batch_size=5)
    assert len(SHIPPED_EXAMPLES) >= 8 and {p.stem.rsplit("_", 1)[0] for p in SHIPPED_EXAMPLES} == set(names)
    for path, row in zip(SHIPPED_EXAMPLES, batched, strict=True):
        p = predictor.predict(path, explain=True)
        probs = np.array([p.probabilities[c] for c in names])
        assert p.label == path.stem.rsplit("_", 1)[0] == names[int(row.argmax())]
        assert probs.sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(probs, row, atol=1e-6)
        assert p.heatmap.shape == p.image.gray.shape and 0.0 <= p.heatmap.min() <= p.heatmap.max() <= 1.0
