"""Model construction for each architecture and the one preprocessing path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tumor_xai.model import build_model, check_input_size, features_and_logits
from tumor_xai.preprocess import PreprocessConfig, fit_square, prepare


@pytest.mark.parametrize(
    "arch,channels",
    [
        ("resnet_tiny", 32),
        pytest.param("resnet18", 512, marks=pytest.mark.slow),
        pytest.param("resnet34", 512, marks=pytest.mark.slow),
        pytest.param("resnet50", 2048, marks=pytest.mark.slow),
    ],
)
def test_output_shapes(arch, channels):
    model = build_model(arch, 4).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        fmap, logits = features_and_logits(model, x)
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert logits.shape == (2, 4) and fmap.shape == (2, channels, 2, 2)


def test_unknown_arch_and_weights_are_refused():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'.*resnet18"):
        build_model("vgg", 4)
    with pytest.raises(ValueError, match="unknown pretrained"):
        build_model("resnet18", 4, pretrained="chest")


def test_pretrained_without_internet_fails_clearly(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="Could not download ImageNet weights.*leaving out --pretrained"):
        build_model("resnet18", 4, pretrained="imagenet")


@pytest.mark.parametrize("size", [0, 31, 100, 225])
def test_bad_input_sizes(size):
    with pytest.raises(ValueError, match="multiple of 32"):
        check_input_size(size)


def test_fit_square_pads_and_geometry_round_trips():
    gray = np.zeros((60, 120), np.float32)
    gray[10:20, 100:110] = 1.0
    square, geom = fit_square(gray, 64)
    assert square.shape == (64, 64)
    assert (geom.side, geom.top, geom.left) == (120, 30, 0)
    back = geom.to_original(square)
    assert back.shape == gray.shape
    peak = np.unravel_index(np.argmax(back), back.shape)
    assert 8 <= peak[0] <= 21 and 98 <= peak[1] <= 111


def test_prepare_is_contrast_invariant_with_percentile_stretch():
    rng = np.random.default_rng(0)
    gray = rng.uniform(0.1, 0.6, (64, 64)).astype(np.float32)
    cfg = PreprocessConfig(input_size=64)
    a, _ = prepare(gray, cfg)
    b, _ = prepare(np.clip(gray * 1.5, 0, 1), cfg)
    assert a.shape == (1, 1, 64, 64)
    assert torch.allclose(a, b, atol=0.05)  # equal up to uint8 quantisation
    flat, _ = prepare(np.full((64, 64), 0.5, np.float32), cfg)
    assert torch.isfinite(flat).all()


def test_an_average_and_max_pooled_classifier_starts_with_the_same_answers_and_round_trips(tmp_path):
    from tumor_xai.checkpoint import load_weights, save_weights
    from tumor_xai.model import AvgMaxPool, combine_models, pooling_of, set_pooling

    torch.manual_seed(0)
    model = build_model("resnet_tiny", 4).eval()
    x = torch.randn(2, 1, 64, 64)
    before = model(x)
    set_pooling(model, "avgmax")
    assert isinstance(model.avgpool, AvgMaxPool) and model.fc.in_features == 64
    torch.testing.assert_close(model(x), before)  # the max half starts at zero
    fmap, logits = features_and_logits(model, x)
    torch.testing.assert_close(logits, before)
    with torch.no_grad():
        model.fc.weight[:, 32:] = 0.1
    meta = {
        "arch": "resnet_tiny",
        "class_names": list("abcd"),
        "preprocessing": PreprocessConfig(input_size=64).to_dict(),
    }
    loaded = load_weights(save_weights(model, tmp_path / "w", meta))
    assert loaded.metadata["pooling"] == "avgmax" and pooling_of(loaded.model) == "avgmax"
    torch.testing.assert_close(loaded.model(x), model(x))
    with pytest.raises(ValueError, match="cannot be turned back"):
        set_pooling(model, "avg")
    with pytest.raises(ValueError, match="cannot be combined"):
        combine_models([model, model])
    with pytest.raises(ValueError, match="unknown pooling"):
        build_model("resnet_tiny", 4, pooling="gem")
