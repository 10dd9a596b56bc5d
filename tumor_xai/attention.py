"""Mask-guided attention: the expert tumour masks as a training signal for WHERE the class evidence sits.

The heatmap the app shows by default is Grad-CAM on the last block, which for a ResNet's
average-pool + linear head is the class activation map ``ReLU(sum_k w[c, k] A_k)``
(:func:`tumor_xai.inference.class_activation_map`). :func:`cam_mask_loss` scores that very map,
for the true class, against a mask:

- ``mass``: ``-log`` of the share of the displayed heat inside the mask, the heat-in-mask figure
  that ``python -m tumor_xai.evaluate --localization`` reports (the map shifted to a zero minimum
  and resized bilinearly, as the app does, here to a quarter of the input side to stay cheap);
- ``kl``: the KL divergence from the mask's distribution over the map's cells to the map's.

Images without a mask contribute nothing. The same loss with the head region as the "mask"
(``--head-loss-weight``) asks the evidence for the other images, no-tumour ones included, to lie in
the head rather than the black frame around it.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tumor_xai.data import DataError, read_mask, read_mask_table
from tumor_xai.inference import class_activation_map
from tumor_xai.preprocess import fit_square, quantize

__all__ = [
    "CAM_LOSSES",
    "TrainingMasks",
    "cam_mask_loss",
    "class_activation_map",
    "heat_in_mask",
    "load_training_masks",
    "pointing_hits",
]

logger = logging.getLogger(__name__)

CAM_LOSSES = ("mass", "kl")
# The pointing game's tolerance as a share of the side (8 px at 224, as in tumor_xai.evaluate).
POINTING_TOLERANCE = 8.0 / 224.0
_EPS = 1e-6


@dataclass
class TrainingMasks:
    """Tumour masks aligned with a decoded split: the same square geometry as the images."""

    masks: np.ndarray  # uint8 (N, S, S), 0-255 (soft at the edges after resizing); zeros where none
    has_mask: np.ndarray  # bool (N,)

    @property
    def count(self) -> int:
        return int(self.has_mask.sum())


def load_training_masks(masks_dir: str | Path, data_root: str | Path, paths: list[Path], size: int) -> TrainingMasks:
    """Masks for the images at ``paths`` (files under ``data_root``), put through ``fit_square`` like them.

    ``masks.csv`` (columns ``image``, ``mask``) names each mask by its image's path under the data
    root. A mask must have its image's height and width; a listed mask that is missing, unreadable,
    empty or of another size raises :class:`DataError` naming it, and so does a table that matches
    none of ``paths``.
    """
    masks_dir, data_root = Path(masks_dir), Path(data_root)
    table = read_mask_table(masks_dir)
    jobs = [(i, table[key]) for i, p in enumerate(paths) if (key := Path(p).relative_to(data_root).as_posix()) in table]
    if not jobs:
        raise DataError(
            f"None of the masks listed in {masks_dir / 'masks.csv'} belongs to an image under {data_root}: check --masks and --data."
        )

    def read(job: tuple[int, Path]) -> np.ndarray:
        i, mask_path = job
        mask = read_mask(mask_path)
        with Image.open(paths[i]) as im:
            width, height = im.size
        if mask.shape != (height, width):
            raise DataError(
                f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {paths[i]} is {width}x{height}."
            )
        if not mask.any():
            raise DataError(f"Mask {mask_path} is empty.")
        return quantize(fit_square(mask.astype(np.float32), size)[0])

    out = np.zeros((len(paths), size, size), dtype=np.uint8)
    has = np.zeros(len(paths), dtype=bool)
    with ThreadPoolExecutor(4) as pool:
        for (i, _), square in zip(jobs, pool.map(read, jobs), strict=False):
            out[i], has[i] = square, True
    logger.info("matched %d masks to %d images", len(jobs), len(paths))
    return TrainingMasks(out, has)


def _displayed(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The map as the app draws it, up to scale: shifted to a zero minimum, resized bilinearly."""
    shifted = cam - cam.flatten(1).min(1).values[:, None, None]
    return F.interpolate(shifted[:, None], size=size, mode="bilinear", align_corners=False)


def heat_in_mask(cam: torch.Tensor, masks: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
    """Share ``(N,)`` of each displayed map's heat inside its mask ``(N, 1, H, W)`` in [0, 1].

    Computed at ``resolution`` px (default: the mask's side), the mask area-averaged to it. An
    all-zero map counts as uniform (its share is the mask's area fraction), as in the evaluation.
    """
    if resolution is not None and resolution != masks.shape[-1]:
        masks = F.adaptive_avg_pool2d(masks.float(), resolution)
    heat = _displayed(cam, masks.shape[-2:])
    area = masks.float().mean((1, 2, 3))
    total = heat.sum((1, 2, 3))
    inside = (heat * masks).sum((1, 2, 3))
    n_px = masks.shape[-1] * masks.shape[-2]
    return (inside + _EPS * area * n_px) / (total + _EPS * n_px)


def cam_mask_loss(
    fmap: torch.Tensor, fc_weight: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, mode: str = "mass"
) -> torch.Tensor:
    """Per-image loss ``(N,)`` that is low when the class activation map of ``targets`` lies in ``masks``.

    ``fmap`` is the last block's map ``(N, K, h, w)``, ``masks`` ``(N, 1, H, W)`` in [0, 1] on the
    model input's pixels. See the module docstring for the two modes.
    """
    if mode not in CAM_LOSSES:
        raise ValueError(f"unknown CAM loss {mode!r}; choose one of {CAM_LOSSES}")
    cam = class_activation_map(fmap, fc_weight, targets, relu=False)
    if mode == "mass":
        resolution = min(masks.shape[-1], 8 * cam.shape[-1])
        return -torch.log(heat_in_mask(cam, masks, resolution).clamp_min(_EPS))
    q = F.adaptive_avg_pool2d(masks.float(), cam.shape[-2:]).flatten(1)
    q = q / q.sum(1, keepdim=True).clamp_min(_EPS)
    log_p = F.log_softmax(cam.flatten(1), dim=1)
    return (q * (torch.log(q.clamp_min(_EPS)) - log_p)).sum(1)


@torch.no_grad()
def pointing_hits(cam: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Approximate pointing game ``(N,)`` bool: the displayed map's peak lies within 8 px (at 224) of the mask.

    A square dilation stands in for the evaluation's Euclidean distance, so this is a cheap monitor
    for training logs; report the figures of ``python -m tumor_xai.evaluate --localization``.
    """
    heat = _displayed(cam, masks.shape[-2:]).flatten(1)
    r = max(1, round(POINTING_TOLERANCE * masks.shape[-1]))
    near = F.max_pool2d((masks.float() > 0.5).float(), 2 * r + 1, stride=1, padding=r).flatten(1)
    return near.gather(1, heat.argmax(1, keepdim=True)).squeeze(1) > 0.5
