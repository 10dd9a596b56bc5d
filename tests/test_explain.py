"""Heatmaps: the hook-free Grad-CAM equals the library's, every method yields clean [0, 1] maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tumor_xai import explain as xai
from tumor_xai.model import build_model


def library_cam(method: str, model, layer, x, targets) -> np.ndarray:
    """pytorch-grad-cam's own map (imported here: it loads scikit-learn, which collecting the tests need not)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with getattr(pytorch_grad_cam, method)(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("resnet_tiny", 4).eval()  # one block per stage, 4-32 channels
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
    fast = xai.explain_batch(model, x, targets, method="gradcam", layer="layer4", smooth=0)
    library = library_cam("GradCAM", model, model.layer4[-1], x, targets)
    assert fast.shape == library.shape == (3, 64, 64)
    assert library.max() > 0.99  # a real, non-flat map, so the comparison means something
    np.testing.assert_allclose(fast, library, atol=1e-5)


def test_fast_gradcam_equals_library_gradcam_with_an_average_and_max_pooled_classifier(model, batch):
    """Each channel's maximum passes its gradient to one cell: Grad-CAM's mean gradient is (w_avg + w_max) / hw."""
    import copy

    from tumor_xai.model import set_pooling

    x, targets = batch
    both = set_pooling(copy.deepcopy(model), "avgmax")
    with torch.no_grad():
        both.fc.weight[:, model.fc.in_features :].normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    fast = xai.explain_batch(both, x, targets, method="gradcam", layer="layer4", smooth=0)
    library = library_cam("GradCAM", both, both.layer4[-1], x, targets)
    assert library.max() > 0.99
    np.testing.assert_allclose(fast, library, atol=1e-5)
    plain = xai.explain_batch(model, x, targets, method="gradcam", layer="layer4", smooth=0)
    assert np.abs(fast - plain).max() > 0.05  # the max half's weights changed the map


def test_fast_path_only_for_gradcam_on_the_last_block(model):
    assert xai.is_fast_path(model, "gradcam", "layer4")
    assert xai.is_fast_path(model, "gradcam", "layer4.0")  # the last (only) block, by index
    assert not xai.is_fast_path(model, "gradcam", "layer3")
    assert not xai.is_fast_path(model, "gradcam++", "layer4")


@pytest.mark.parametrize("method", list(xai.METHODS))
def test_every_method_gives_clean_maps(model, batch, method):
    x, targets = batch
    # layer3 (16 channels, a 4 x 4 map here) keeps ScoreCAM, one forward per channel, cheap.
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
    with pytest.raises(ValueError, match="unknown target layer 'fc'.*layer4.0"):
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


def _head_slice(size: int = 96) -> np.ndarray:
    """A mid-grey disc (the head) on a black frame, with a speck of burnt-in text in a corner."""
    yy, xx = np.mgrid[:size, :size]
    gray = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2, 0.5, 0.0).astype(np.float32)
    gray[2:4, 2:6] = 1.0
    return gray


def test_overlay_draws_warm_heat_inside_the_head_only():
    gray = _head_slice()
    heat = np.zeros_like(gray)
    heat[:, 48:] = 1.0  # hot right half, cold left half; the hot half crosses the black frame too
    plain = np.asarray(xai.overlay(gray, heat, alpha=0.0))
    assert plain.shape == (96, 96, 3) and (plain == np.round(gray * 255)[..., None]).all()
    out = np.asarray(xai.overlay(gray, heat, colormap="jet", alpha=1.0, outline=False)).astype(int)
    assert out[48, 70, 0] > out[48, 70, 2] + 100, "jet's hot end is red (RGB order, not OpenCV's BGR)"
    assert (out[48, 20] == 128).all(), "cold heat is not drawn: the slice stays readable"
    assert (out[5, 90] == 0).all() and (out[90, 90] == 0).all(), "no heat on the black frame outside the head"
    assert (out[3, 3] == 255).all(), "burnt-in text is not part of the head"


def test_overlay_outlines_the_hottest_region_in_cyan():
    gray = _head_slice()
    heat = np.zeros_like(gray)
    heat[40:56, 40:56] = 1.0
    out = np.asarray(xai.overlay(gray, heat, alpha=0.6)).astype(int)
    cyan = (out[..., 0] < 60) & (out[..., 1] > 200) & (out[..., 2] > 200)
    ys, xs = np.nonzero(cyan)
    assert len(ys) > 40 and ys.min() >= 38 and ys.max() <= 57 and xs.min() >= 38 and xs.max() <= 57
    assert not cyan[48, 48], "the outline circles the region; its inside shows the heat"


def test_overlay_rejects_bad_options_and_shows_heat_when_no_head_is_found():
    gray, heat = np.zeros((10, 20), np.float32), np.ones((10, 20), np.float32)
    assert np.asarray(xai.overlay(gray, heat, alpha=1.0)).max() > 0, "an all-black image still shows its heatmap"
    with pytest.raises(ValueError, match="opacity"):
        xai.overlay(gray, heat, alpha=1.5)
    with pytest.raises(ValueError, match="differs from the image"):
        xai.overlay(gray, heat[:, :5])


def test_scorecam_matches_the_library_when_every_channel_is_scored(model, batch):
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x, targets = batch[0][:2], batch[1][:2]
    layer = model.layer3[-1]
    lib_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    ours = xai.scorecam(model, x, targets, "layer3", channels=None)
    with ScoreCAM(model=model, target_layers=[layer]) as cam:
        cam.batch_size = 256
        library = cam(input_tensor=x, targets=lib_targets)
        # The library's channel weights on the same activations, through our normalisation: the same numbers.
        acts = cam.activations_and_grads.activations[0].numpy()
        weights = cam.get_cam_weights(x, layer, lib_targets, acts, None)
    expected = xai.normalize_cams(np.maximum((weights[:, :, None, None] * acts).sum(1), 0), x.shape[-1])
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    # The library's own output rescales twice around its resize: the same map to within a few percent.
    assert library.max() > 0.99 and np.abs(ours - library).max() < 0.05
    assert np.corrcoef(ours.ravel(), library.ravel())[0, 1] > 0.99


def test_scorecam_cost_is_bounded(model, batch):
    x, targets = batch
    top = xai.scorecam(model, x[:1], targets[:1], "layer4", channels=16)
    assert top.shape == (1, 64, 64) and np.isfinite(top).all() and 0.0 <= top.min() <= top.max() <= 1.0
    with pytest.raises(xai.ExplanationTimeout, match="scorecam stopped after 0 s.*use gradcam"):
        xai.scorecam(model, x[:1], targets[:1], "layer4", budget_s=0.0)
    assert "scorecam" in xai.SLOW_METHODS and "gradcam" not in xai.SLOW_METHODS


def test_smoothing_turns_the_bilinear_diamond_into_a_round_region():
    # One hot cell of a 7 x 7 map: bilinear upsampling draws a diamond (its 0.6 level is a square turned 45
    # degrees); the smoothed map's 0.6 level is round, and the peak stays in the cell.
    cam = np.zeros((1, 7, 7), np.float32)
    cam[0, 3, 3] = 1.0
    bilinear = xai.normalize_cams(cam, 224)
    smooth = xai.smooth_heatmaps(bilinear, 32)
    assert smooth.shape == (1, 224, 224) and smooth.max() == pytest.approx(1.0) and smooth.min() >= 0
    peak = np.unravel_index(np.argmax(smooth[0]), (224, 224))
    assert abs(peak[0] - 112) <= 2 and abs(peak[1] - 112) <= 2

    def roundness(m: np.ndarray) -> float:
        """The 0.6 level's extent along the diagonal over its extent along the axis: 1 for a disc."""
        hot = m >= 0.6
        axis = hot[112].sum()
        diagonal = sum(hot[112 + d, 112 + d] for d in range(-112, 112)) * np.sqrt(2)
        return diagonal / axis

    assert roundness(bilinear[0]) < 0.85  # pinched along the diagonal: a four-pointed star
    assert 0.95 < roundness(smooth[0]) < 1.05  # round
    assert (xai.smooth_heatmaps(np.zeros((1, 8, 8), np.float32), 2) == 0).all()  # a flat map stays flat
    np.testing.assert_array_equal(xai.smooth_heatmaps(bilinear, 32, sigma_cells=0), bilinear)
    assert [xai.layer_stride(n) for n in ("layer4", "layer4.1", "layer3", "layer1")] == [32, 32, 16, 4]


def test_the_app_draws_the_smoothed_map(model, batch):
    x, targets = batch
    drawn = xai.explain_batch(model, x, targets)
    plain = xai.explain_batch(model, x, targets, smooth=0)
    np.testing.assert_allclose(drawn, xai.smooth_heatmaps(plain, 32), atol=1e-6)
