"""On-device batch augmentation: recipes, shapes and ranges, image-mask alignment, lesion erasing, CLI switches."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from tumor_xai.augment import (
    PRESETS,
    AugmentConfig,
    augment,
    augment_pair,
    erase_lesions,
    gaussian_blur,
    head_region,
    histogram_match,
    jpeg_roundtrip,
    paste_lesions,
    photometric,
)
from tumor_xai.train import config_from_args, get_args_parser

STRONG_ONLY = ("frame", "aspect", "curve", "invert", "bias_field", "resolution", "blur", "noise")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _head_batch(n: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 'heads' (a grey disc) with a bright square lesion, and the lesion masks (float 0/1)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2).float()
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        r0, c0 = 8 + i % 3 * 3, 9 + i % 2 * 4
        masks[i, 0, r0 : r0 + 6, c0 : c0 + 6] = 1.0
    images = (disc * 90 + masks * 140).round().to(torch.uint8)
    return images, masks


def test_recipes():
    assert PRESETS["basic"] == AugmentConfig(), "the default recipe must stay today's basic one"
    strong = AugmentConfig.preset("strong")
    assert all(getattr(strong, k) > 0 for k in STRONG_ONLY)
    assert all(getattr(AugmentConfig.preset("none"), f.name) == 0 for f in fields(AugmentConfig))
    assert all(getattr(AugmentConfig(), k) == 0 for k in STRONG_ONLY)
    with pytest.raises(ValueError, match="unknown augmentation recipe 'wild'"):
        AugmentConfig.preset("wild")


def test_overrides_are_checked():
    assert AugmentConfig().with_overrides({"invert": 0.3}).invert == 0.3
    with pytest.raises(ValueError, match=r"unknown augmentation setting\(s\) \['sharpness'\]"):
        AugmentConfig().with_overrides({"sharpness": 1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        AugmentConfig().with_overrides({"noise": -0.1})


@pytest.mark.parametrize("recipe", ["basic", "strong", "collections", "none"])
def test_shapes_dtype_and_range(recipe):
    images, masks = _head_batch()
    cfg = AugmentConfig.preset(recipe)
    x = augment(images, cfg, _gen())
    assert x.shape == images.shape and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    x2, m2 = augment_pair(
        images, torch.cat([masks, masks], 1), cfg, _gen(), erase=torch.ones(len(images), dtype=torch.bool)
    )
    assert x2.shape == images.shape and m2.shape == (len(images), 2, 32, 32)
    assert torch.isfinite(x2).all() and x2.min() >= 0 and x2.max() <= 1 and m2.min() >= 0 and m2.max() <= 1


def test_none_is_identity_and_seeds_reproduce():
    images, _ = _head_batch()
    assert torch.allclose(augment(images, AugmentConfig.preset("none"), _gen()), images.float() / 255, atol=1e-5)
    strong = AugmentConfig.preset("strong")
    assert torch.equal(augment(images, strong, _gen(3)), augment(images, strong, _gen(3)))
    assert not torch.equal(augment(images, strong, _gen(3)), augment(images, strong, _gen(4)))


def test_pair_uses_the_image_stream_of_augment():
    # Without erasing, an image augmented with masks is the same as without: masks change nothing.
    images, masks = _head_batch()
    cfg = AugmentConfig.preset("strong")
    assert torch.allclose(augment_pair(images, masks, cfg, _gen(1))[0], augment(images, cfg, _gen(1)), atol=1e-6)


def test_image_and_mask_share_one_affine():
    images, masks = _head_batch()
    geometry_only = AugmentConfig.preset("none").with_overrides(
        {"rotate_deg": 30, "scale": 0.2, "translate": 0.15, "hflip": 0.5, "frame": 0.3, "aspect": 0.2}
    )
    lesion_only = (masks * 255).to(torch.uint8)
    x, m = augment_pair(lesion_only, masks, geometry_only, _gen(5))
    assert torch.allclose(x, m, atol=1e-5), "the same grid must move the image and its mask"
    assert not torch.allclose(m, masks), "the transform did move things"
    # Under the full strong recipe the bright lesion still sits where the warped mask says.
    x, m = augment_pair(images, masks, AugmentConfig.preset("strong").with_overrides({"invert": 0}), _gen(6))
    for xi, mi in zip(x[:, 0], m[:, 0], strict=False):
        inside, ring = xi[mi > 0.9].mean(), xi[(mi < 0.1) & (head_region(xi[None, None])[0, 0] > 0.9)].mean()
        assert inside > ring


def test_invert_flips_the_head_not_the_frame():
    images, _ = _head_batch(2)
    x = photometric(images.float() / 255, AugmentConfig.preset("none").with_overrides({"invert": 1.0}), _gen())
    centre, corner = x[:, 0, 24, 16], x[:, 0, 0, 0]  # tissue below the lesions
    assert torch.allclose(centre, torch.full_like(centre, 1 - 90 / 255), atol=1e-3)  # dark tissue -> bright
    assert (corner == 0).all()


def test_gaussian_blur_keeps_mean_and_sigma_zero_is_identity():
    x = torch.rand(3, 1, 24, 24, generator=_gen())
    out = gaussian_blur(x, torch.tensor([0.0, 1.0, 2.5]))
    assert torch.allclose(out[0], x[0], atol=1e-5)
    assert out[2].std() < out[1].std() < x[1].std()
    flat = torch.full((1, 1, 16, 16), 0.4)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([2.0])), flat, atol=1e-6)


@pytest.mark.parametrize("name", ["curve", "bias_field", "resolution", "blur", "noise", "gamma", "frame"])
def test_each_strong_transform_changes_some_images(name):
    images, _ = _head_batch(8, size=112)  # blur is in px at 224: visible from about 100 px up
    cfg = AugmentConfig.preset("none").with_overrides(
        {name: AugmentConfig.preset("strong").__getattribute__(name) or 0.5}
    )
    x = augment(images, cfg, _gen(2))
    changed = (x - images.float() / 255).abs().flatten(1).amax(1) > 1e-3
    assert changed.any() and x.min() >= 0 and x.max() <= 1


def test_erase_lesions_fills_with_surrounding_tissue():
    x = torch.zeros(2, 1, 64, 64)
    x[:, :, 8:56, 8:56] = 90 / 255  # tissue
    masks = torch.zeros_like(x)
    masks[:, :, 26:36, 28:38] = 1.0
    x = torch.where(masks > 0, torch.tensor(230 / 255), x)
    out = erase_lesions(x, masks, _gen())
    lesion = masks[:, 0] > 0.5
    assert (out[:, 0][lesion] - 90 / 255).abs().max() < 0.03, "the lesion becomes tissue, not black or bright"
    far = torch.ones_like(lesion)
    far[:, 18:44, 20:46] = False
    assert torch.equal(out[:, 0][far], x[:, 0][far]), "nothing far from the lesion changes"


def _cfg(*extra: str):
    return config_from_args(get_args_parser().parse_args(["--data", "d", "--out", "o", *extra]))


def test_cli_switches_recipe_and_single_strengths():
    assert _cfg().augment == AugmentConfig().to_dict() and _cfg().aug == "basic"
    cfg = _cfg("--aug", "strong", "--aug-set", "invert=0.4", "--aug-set", "bias-field=0")
    assert cfg.aug == "strong" and cfg.augment["invert"] == 0.4 and cfg.augment["bias_field"] == 0
    assert cfg.augment["blur"] == AugmentConfig.preset("strong").blur
    with pytest.raises(ValueError, match="unknown augmentation setting"):
        _cfg("--aug-set", "sharpness=2")
    with pytest.raises(SystemExit):
        _cfg("--aug-set", "invert")


# ------------------------------------------------------------------------------- other collections


def _empty_heads(n: int = 4, size: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.42 * size) ** 2).float()
    return (disc * 0.35).expand(n, 1, size, size).clone()


def test_paste_puts_the_donor_lesion_inside_the_host_head_with_its_mask():
    size = 64
    hosts = _empty_heads(4, size)
    donors = _empty_heads(4, size)
    donor_masks = torch.zeros(4, 1, size, size)
    donor_masks[:, :, 14:22, 14:22] = 1.0
    donors = donors + donor_masks * 0.5  # a bright lesion on a 0.35 brain
    x, m, pasted = paste_lesions(hosts, donors, donor_masks, _gen())
    assert pasted.all() and x.shape == hosts.shape and m.shape == hosts.shape
    head = head_region(hosts) > 0.5
    for i in range(4):
        mask = m[i, 0] > 0.5
        assert 40 <= mask.sum() <= 90  # the 8 x 8 lesion, moved (bilinear edges)
        assert (mask & ~head[i, 0]).sum() <= 0.03 * mask.sum()  # inside the host's head
        # Intensity matched to the host brain (equal means here, times 0.85-1.2): brighter than the brain.
        assert x[i, 0][mask].mean() > hosts[i, 0][mask].mean() + 0.3
    # Away from the lesion and its feathered rim, the host is untouched.
    far = F.max_pool2d(m, 15, stride=1, padding=7) == 0
    assert torch.allclose(x[far], hosts[far])


def test_paste_refuses_a_lesion_that_cannot_fit_inside_the_head():
    hosts = torch.zeros(2, 1, 64, 64)
    hosts[:, :, 28:36, 28:36] = 0.4  # a head far smaller than the lesion
    donor_masks = torch.zeros(2, 1, 64, 64)
    donor_masks[:, :, 10:40, 10:40] = 1.0
    x, m, pasted = paste_lesions(hosts, _empty_heads(2), donor_masks, _gen())
    assert not pasted.any() and torch.equal(x, hosts) and m.sum() == 0


def test_histogram_match_takes_the_reference_look_and_keeps_order_and_frame():
    size = 64
    heads = _empty_heads(2, size)
    ramp = torch.linspace(0.1, 0.5, size).view(1, 1, 1, size)
    x = heads * 0 + (heads > 0) * ramp  # a left-right ramp inside the head
    ref = (heads > 0) * (ramp.flip(-1) * 0.5 + 0.4) ** 2  # another distribution, brighter
    out = histogram_match(x, ref)
    inside = head_region(x) > 0.99
    assert (out[~(head_region(x) > 0)] == x[~(head_region(x) > 0)]).all()  # the black frame stays black
    a, b = out[0, 0][inside[0, 0]], ref[0, 0][inside[0, 0]]
    assert abs(a.mean() - b.mean()) < 0.03 and abs(a.std() - b.std()) < 0.03
    row = out[0, 0, size // 2, 16:48]
    assert (row[1:] >= row[:-1] - 1e-5).all()  # monotone: the anatomy's order survives


def test_jpeg_roundtrip_is_lossy_and_keeps_shape():
    x = torch.rand(3, 1, 32, 32)
    y = jpeg_roundtrip(x, torch.tensor([30.0, 60.0, 95.0]))
    assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1
    errors = [(y[i] - x[i]).abs().mean().item() for i in range(3)]
    assert errors[0] > errors[2] > 0  # lower quality, larger error


def test_collections_parts_draw_nothing_when_off():
    """hist_match and jpeg at 0 leave the basic recipe's random stream (and output) as it was."""
    images, masks = _head_batch()
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    a = augment(images, PRESETS["basic"], _gen(3))
    b = augment(images, PRESETS["basic"], _gen(3), labels=labels)
    assert torch.equal(a, b)
    c = augment(images, PRESETS["basic"].with_overrides({"hist_match": 1.0}), _gen(3), labels=labels)
    assert not torch.equal(a, c)
