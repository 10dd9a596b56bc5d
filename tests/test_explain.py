"""Heatmaps: the hook-free Grad-CAM equals the library's, every method yields clean [0, 1] maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from tumor_xai import explain as xai
from tumor_xai.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("resnet18", 4).eval()
    # Give BN non-trivial statistics so the maps are not near-uniform.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 64, 64, generator=g), torch.tensor([0, 2, 3])


def test_fast_gradcam_equals_library_gradcam(model, batch):
    x, targets = batch
    fast = xai.explain_batch(model, x, targets, method="gradcam", layer="layer4")
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        library = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    assert fast.shape == library.shape == (3, 64, 64)
    assert library.max() > 0.99  # a real, non-flat map, so the comparison means something
    np.testing.assert_allclose(fast, library, atol=1e-5)


def test_fast_path_only_for_gradcam_on_the_last_block(model):
    assert xai.is_fast_path(model, "gradcam", "layer4")
    assert xai.is_fast_path(model, "gradcam", "layer4.1")  # resnet18's last block, by index
    assert not xai.is_fast_path(model, "gradcam", "layer4.0")
    assert not xai.is_fast_path(model, "gradcam++", "layer4")


@pytest.mark.parametrize("method", list(xai.METHODS))
def test_every_method_gives_clean_maps(model, batch, method):
    x, targets = batch
    # layer3 (256 channels, a 4 x 4 map here) keeps ScoreCAM, one forward per channel, cheap.
    maps = xai.explain_batch(model, x[:1], targets[:1], method=method, layer="layer3")
    assert maps.shape == (1, 64, 64) and maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_library_methods_leave_no_hooks_behind(model, batch):
    x, targets = batch
    xai.explain_batch(model, x[:1], targets[:1], method="layercam", layer="layer3")
    assert all(not m._forward_hooks for m in model.modules())


def test_other_layers_are_reachable_by_name(model, batch):
    x, targets = batch
    assert xai.resolve_layer(model, "layer4") is model.layer4[-1]
    assert xai.resolve_layer(model, "layer3.0") is model.layer3[0]
    deep = xai.explain_batch(model, x[:1], targets[:1], method="eigencam", layer="layer4")
    mid = xai.explain_batch(model, x[:1], targets[:1], method="eigencam", layer="layer3")
    assert mid.shape == (1, 64, 64) and mid.max() == pytest.approx(1.0, abs=1e-3)
    assert not np.allclose(mid, deep, atol=1e-2)


def test_unknown_names_list_the_valid_ones(model, batch):
    x, targets = batch
    with pytest.raises(ValueError, match="choose one of gradcam, gradcam\\+\\+"):
        xai.explain_batch(model, x, targets, method="gradcam2")
    with pytest.raises(ValueError, match="unknown target layer 'fc'.*layer4.1"):
        xai.resolve_layer(model, "fc")
    with pytest.raises(ValueError, match="unknown colormap 'rainbowz'.*jet"):
        xai.check_colormap("rainbowz")
    with pytest.raises(ValueError, match="3 targets for 2 images"):
        xai.explain_batch(model, x[:2], targets, method="gradcam")


def test_normalize_cams_handles_flat_and_nan_maps():
    cams = np.stack([np.full((2, 2), 3.0), np.array([[np.nan, 1.0], [0.0, 2.0]]), np.zeros((2, 2))]).astype(np.float32)
    out = xai.normalize_cams(cams, 8)
    assert out.shape == (3, 8, 8)
    assert np.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert out[1].max() <= 1.0 and out[1].min() == 0.0


def test_overlay_blends_with_the_given_opacity():
    gray = np.full((10, 20), 0.5, dtype=np.float32)
    heat = np.zeros((10, 20), dtype=np.float32)
    heat[:, 10:] = 1.0
    plain = np.asarray(xai.overlay(gray, heat, alpha=0.0))
    assert plain.shape == (10, 20, 3)
    assert (plain == 128).all()
    full = np.asarray(xai.overlay(gray, heat, colormap="jet", alpha=1.0)).astype(int)
    # jet: hot is red, cold is blue (RGB order, not OpenCV's BGR)
    assert full[0, 15, 0] > full[0, 15, 2] and full[0, 5, 2] > full[0, 5, 0]
    with pytest.raises(ValueError, match="opacity"):
        xai.overlay(gray, heat, alpha=1.5)
    with pytest.raises(ValueError, match="differs from the image"):
        xai.overlay(gray, heat[:, :5])
