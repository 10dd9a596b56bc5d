"""Model construction: torchvision ResNets adapted to one-channel MRI slices."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchvision import models

__all__ = ["ARCHITECTURES", "build_model", "features_and_logits", "check_input_size"]

logger = logging.getLogger(__name__)

ARCHITECTURES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
}


# The ResNets downsample by 32; a multiple of 32 keeps every heatmap cell aligned with the pixels.
INPUT_STRIDE = 32


def check_input_size(size: int) -> None:
    """Raise ``ValueError`` unless ``size`` is a square input side the models can take exactly."""
    if size < INPUT_STRIDE or size % INPUT_STRIDE:
        raise ValueError(f"image size {size} is not supported: use a multiple of {INPUT_STRIDE} (e.g. 128, 224)")


def build_model(
    arch: str = "resnet18", num_classes: int = 4, in_chans: int = 1, pretrained: str | None = None
) -> nn.Module:
    """A torchvision ResNet with ``in_chans`` input channels and ``num_classes`` outputs.

    ``pretrained="imagenet"`` downloads torchvision's ImageNet weights (internet needed) and folds
    the RGB stem into one channel by summing it; the default trains from scratch.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if pretrained not in (None, "imagenet"):
        raise ValueError(f"unknown pretrained weights {pretrained!r}; the only choice is 'imagenet'")
    ctor, weights_enum = ARCHITECTURES[arch]
    weights = None
    if pretrained == "imagenet":
        try:
            weights_enum.get_state_dict(progress=False)
        except Exception as exc:  # network errors come in many types (URLError, HTTPError, OSError, ...)
            raise RuntimeError(
                f"Could not download ImageNet weights for {arch} ({exc}). Connect to the internet, or train "
                "from scratch by leaving out --pretrained."
            ) from exc
        weights = weights_enum
    model = ctor(weights=weights)
    if in_chans != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        if weights is not None:
            with torch.no_grad():
                folded = old.weight.sum(dim=1, keepdim=True)
                model.conv1.weight.copy_(folded.repeat(1, in_chans, 1, 1) / in_chans)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass returning the last block's activation map ``(N, C, h, w)`` and the logits.

    For a ResNet's global-average-pool + linear head, Grad-CAM on the last block needs nothing more:
    the gradient of a logit with respect to that map is the class's fc weight divided by h * w.
    """
    x = model.conv1(x)
    x = model.bn1(x)
    x = model.relu(x)
    x = model.maxpool(x)
    x = model.layer1(x)
    x = model.layer2(x)
    x = model.layer3(x)
    fmap = model.layer4(x)
    logits = model.fc(torch.flatten(model.avgpool(fmap), 1))
    return fmap, logits
