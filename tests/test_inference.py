"""The one batched forward and the decision rules read from the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tumor_xai import inference
from tumor_xai.checkpoint import Decision, WeightsError, load_weights
from tumor_xai.model import build_model, features_and_logits
from tumor_xai.preprocess import PreprocessConfig

CFG = PreprocessConfig(input_size=64)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet_tiny", 4).eval()


@pytest.fixture(scope="module")
def squares() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (7, 64, 64), dtype=np.uint8)


def test_outputs_are_the_models_own(model, squares):
    out = inference.forward(model, squares, CFG, batch_size=3, keep_maps=True)
    with torch.no_grad():
        fmap, logits = features_and_logits(model, inference.to_input(squares, CFG))
    assert out.logits.shape == (7, 4) and out.features.shape == (7, model.fc.in_features)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.fmap, fmap, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features, fmap.mean((2, 3)), atol=1e-6, rtol=0)
    with torch.no_grad():  # the pooled features are exactly what the fc layer sees
        torch.testing.assert_close(model.fc(out.features), out.logits, atol=1e-5, rtol=0)


def test_input_layouts_batch_sizes_and_channels_last_agree(model, squares):
    ref = inference.forward(model, squares, CFG, batch_size=7)
    for args, kwargs in [
        ((torch.from_numpy(squares)[:, None], CFG, 2), {}),  # training's device-resident (N, 1, S, S) tensor
        ((squares, CFG, 1), {"channels_last": True}),
    ]:
        other = inference.forward(model, *args, **kwargs)
        torch.testing.assert_close(other.logits, ref.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(other.features, ref.features, atol=1e-5, rtol=0)
    assert ref.fmap is None


def test_forward_leaves_the_model_in_eval_mode_and_needs_images(model, squares):
    model.train()
    inference.forward(model, squares[:1], CFG)
    assert not model.training
    with pytest.raises(ValueError, match="no images"):
        inference.forward(model, squares[:0], CFG)


def test_class_activation_map_is_the_relu_of_the_weighted_channels():
    fmap, w, t = torch.randn(3, 8, 4, 4), torch.randn(4, 8), torch.tensor([0, 2, 3])
    signed = inference.class_activation_map(fmap, w, t, relu=False)
    for i in range(3):
        torch.testing.assert_close(signed[i], (w[t[i]][:, None, None] * fmap[i]).sum(0), atol=1e-5, rtol=0)
    assert torch.equal(inference.class_activation_map(fmap, w, t), signed.clamp_min(0))


# ------------------------------------------------------------------------------------ decision rules

NAMES = ["glioma", "meningioma", "notumor", "pituitary"]


def test_decision_reads_temperature_threshold_and_negative_class():
    d = Decision.from_metadata(
        {"class_names": NAMES, "calibration": {"temperature": 2}, "screening": {"threshold": 0.25}}
    )
    assert (d.temperature, d.threshold, d.negative_class, d.negative_index) == (2.0, 0.25, "notumor", 2)
    probs = d.probabilities(torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(probs, torch.softmax(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 1))
    p = dict(zip(NAMES, probs[0].tolist(), strict=True))
    assert d.tumor_probability(p) == pytest.approx(1 - p["notumor"])
    assert d.screening_positive(0.25) is True and d.screening_positive(0.2) is False
    bare = Decision.from_metadata({"class_names": ["a", "b"]})
    assert (bare.temperature, bare.threshold, bare.negative_class) == (1.0, None, None)
    assert bare.tumor_probability({"a": 0.5, "b": 0.5}) is None and bare.screening_positive(None) is None


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"calibration": {"temperature": 0}}, "temperature 0 must be a positive"),
        ({"calibration": {"temperature": float("nan")}}, "temperature nan must be a positive"),
        ({"calibration": {"temperature": float("inf")}}, "must be finite"),
        ({"calibration": {"temperature": "1"}}, "must be a positive number"),
        ({"screening": {"threshold": 1.5}}, r"threshold 1.5 must be in \[0, 1\]"),
        ({"screening": {"threshold": None, "negative_class": "healthy"}}, "'healthy' is not one of the classes"),
        ({"class_names": ["a", "b"], "screening": {"threshold": 0.5}}, "needs a 'notumor' class"),
    ],
)
def test_decision_rejects_bad_metadata(meta, match):
    with pytest.raises(ValueError, match=match):
        Decision.from_metadata({"class_names": NAMES, **meta})


def test_loading_weights_with_a_bad_temperature_says_which_folder(tmp_path):
    from conftest import make_weights

    folder = make_weights(tmp_path / "w", calibration={"temperature": -1.0})
    with pytest.raises(WeightsError, match=r"temperature -1.0 must be a positive number.*\(.*w\)"):
        load_weights(folder)
