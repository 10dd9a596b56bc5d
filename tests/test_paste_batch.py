"""Lesion paste inside a training batch: twins keep the original beside the pasted slice, balanced donors."""

from __future__ import annotations

import torch

from tumor_xai.augment import AugmentConfig
from tumor_xai.preprocess import PreprocessConfig
from tumor_xai.train import RunContext, Split, TrainConfig, draw_donors, make_batch

NOTUMOR, SIZE = 2, 64


def _split(n_notumor: int = 8) -> Split:
    """A disc-shaped head per slice; two masked tumour donors (glioma, then ten pituitaries) and no-tumour hosts."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    head = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (0.42 * SIZE) ** 2).to(torch.uint8) * 90
    labels = torch.tensor([0] + [3] * 10 + [NOTUMOR] * n_notumor)
    n = len(labels)
    images = head.expand(n, 1, SIZE, SIZE).clone()
    masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8)
    masks[:11, :, 26:34, 26:34] = 255
    images[:11] = torch.where(masks[:11] > 0, torch.full_like(images[:11], 200), images[:11])
    has = labels != NOTUMOR
    return Split(images, labels, masks, has, has.nonzero().squeeze(1))


def _ctx(**kw) -> RunContext:
    cfg = TrainConfig(image_size=SIZE, masks="m", lesion_paste=1.0, **kw)
    return RunContext(cfg, PreprocessConfig(input_size=SIZE), torch.device("cpu"), negative=NOTUMOR)


def _batch(ctx: RunContext, data: Split):
    idx = torch.arange(len(data))
    return make_batch(ctx, data, idx, AugmentConfig.preset("none"), torch.Generator().manual_seed(0))


def test_twins_add_the_pasted_slices_and_keep_every_no_tumour_original():
    data = _split()
    replaced = _batch(_ctx(), data)
    assert len(replaced.y) == len(data) and (replaced.y == NOTUMOR).sum() == 0  # every host became a tumour
    twins = _batch(_ctx(paste_twins=True), data)
    assert len(twins.y) == len(data) + 8 and torch.equal(twins.y[: len(data)], data.labels)
    pasted = slice(len(data), None)
    assert (twins.y[pasted] != NOTUMOR).all() and twins.has_mask[pasted].all()
    assert not twins.has_mask[: len(data)][data.labels == NOTUMOR].any()
    assert twins.x.shape[0] == twins.lesion.shape[0] == len(twins.y)
    # The pasted twin shows a bright lesion where its mask now is; its flat original shows none there.
    lesion = twins.lesion[pasted] > 0.5
    assert lesion.flatten(1).any(1).all()
    originals = twins.x[len(data) - 8 : len(data)].float()
    x = twins.x[pasted].float()
    brain = (x > x.amin()) & ~lesion  # inside the head, off the lesion (and its feathered rim)
    assert x[lesion].mean() > x[brain].mean() + 0.5
    assert originals[lesion].std() < 1e-3


def test_balanced_donors_draw_each_tumour_class_equally():
    data = _split()
    gen = torch.Generator().manual_seed(0)
    uniform = data.labels[draw_donors(_ctx(), data, 4000, gen)]
    balanced = data.labels[draw_donors(_ctx(paste_donors="balanced"), data, 4000, gen)]
    assert (uniform == 0).float().mean() < 0.15  # one glioma donor among eleven
    assert abs((balanced == 0).float().mean().item() - 0.5) < 0.05
