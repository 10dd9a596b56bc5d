"""Batch augmentation on whatever device holds the data (GPU or CPU), one code path for both.

The training set lives on the device as uint8 squares; each batch is turned into floats in [0, 1]
and augmented here, so no image is decoded twice and the GPU never waits for a data loader.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "augment"]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; 0 switches a transform off."""

    rotate_deg: float = 15.0
    scale: float = 0.10  # zoom factor drawn from [1 - scale, 1 + scale]
    translate: float = 0.08  # fraction of the side
    hflip: float = 0.5  # probability
    brightness: float = 0.10  # additive shift drawn from [-b, b]
    contrast: float = 0.25  # factor drawn log-uniformly from [1/(1+c), 1+c], around the image mean
    gamma: float = 0.35  # exponent drawn log-uniformly from [1/(1+g), 1+g]

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _log_uniform(n: int, spread: float, g: torch.Generator, device) -> torch.Tensor:
    r = math.log1p(spread)
    return torch.exp(_uniform(n, -r, r, g, device))


def geometric(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random rotation, zoom, translation and horizontal flip of a batch ``(N, C, H, W)``."""
    n, dev = x.shape[0], x.device
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, g, dev) * (math.pi / 180.0)
    zoom = _uniform(n, 1.0 - cfg.scale, 1.0 + cfg.scale, g, dev)
    flip = torch.where(torch.rand(n, generator=g, device=dev) < cfg.hflip, -1.0, 1.0)
    tx = _uniform(n, -cfg.translate, cfg.translate, g, dev) * 2.0
    ty = _uniform(n, -cfg.translate, cfg.translate, g, dev) * 2.0
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def photometric(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and gamma of a batch in [0, 1]; stays in [0, 1]."""
    n, dev = x.shape[0], x.device
    shape = (n, 1, 1, 1)
    if cfg.gamma:
        x = x.clamp_min(1e-6) ** _log_uniform(n, cfg.gamma, g, dev).view(shape)
    if cfg.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _log_uniform(n, cfg.contrast, g, dev).view(shape) + mean
    if cfg.brightness:
        x = x + _uniform(n, -cfg.brightness, cfg.brightness, g, dev).view(shape)
    return x.clamp(0.0, 1.0)


def augment(images_u8: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """uint8 batch ``(N, 1, S, S)`` -> augmented float batch in [0, 1] on the same device."""
    x = images_u8.float().div_(255.0)
    x = geometric(x, cfg, g)
    return photometric(x, cfg, g)
