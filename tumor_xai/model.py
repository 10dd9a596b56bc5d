"""Model construction: torchvision ResNets adapted to one-channel MRI slices."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock

__all__ = ["ARCHITECTURES", "build_model", "features_and_logits", "check_input_size"]


class TinyResNet(models.ResNet):
    """A torchvision ResNet with one BasicBlock per stage and narrow widths (about 20 k parameters).

    Same module names and forward as the real ones (``conv1`` ... ``layer4``, ``avgpool``, ``fc``),
    so every code path (training, Grad-CAM, OOD features) runs on it in milliseconds: for tests and
    smoke runs, not for accuracy. The first stage is 8 channels wide: with 4, oneDNN's channels-last
    convolution backward in torch 2.14.1 corrupts the CPU heap (the process aborts after a few steps).
    """

    def __init__(self, weights: None = None, widths: tuple[int, ...] = (8, 8, 16, 32), num_classes: int = 1000):
        nn.Module.__init__(self)  # ResNet.__init__ would build the 64..512-channel stages first
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], 1)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)


# Name -> (constructor, ImageNet weights or None).
ARCHITECTURES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "resnet_tiny": (TinyResNet, None),
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
    if pretrained == "imagenet" and weights_enum is None:
        raise ValueError(f"there are no ImageNet weights for {arch}; leave out --pretrained")
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


def features_and_logits(
    model: nn.Module, x: torch.Tensor, tap: Callable[[int, torch.Tensor], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass returning the last block's activation map ``(N, C, h, w)`` and the logits.

    For a ResNet's global-average-pool + linear head, Grad-CAM on the last block needs nothing more:
    the gradient of a logit with respect to that map is the class's fc weight divided by h * w.
    ``tap(stage, map)`` sees each stage's output map (stage 1-4) as it is computed: the
    out-of-distribution test reads its statistics from the same pass.
    """
    x = model.conv1(x)
    x = model.bn1(x)
    x = model.relu(x)
    x = model.maxpool(x)
    for stage, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=1):
        x = layer(x)
        if tap is not None:
            tap(stage, x)
    fmap = x
    logits = model.fc(torch.flatten(model.avgpool(fmap), 1))
    return fmap, logits
