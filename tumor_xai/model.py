"""Model construction: torchvision ResNets adapted to one-channel MRI slices."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock

__all__ = [
    "ARCHITECTURES",
    "POOLINGS",
    "AvgMaxPool",
    "average_models",
    "build_model",
    "check_input_size",
    "combine_models",
    "features_and_logits",
    "pooling_of",
    "set_pooling",
    "unwrap",
]


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


class AvgMaxPool(nn.Module):
    """The global average and the global maximum of each channel side by side: ``(N, C, h, w) -> (N, 2C, 1, 1)``.

    A classifier on the average alone weighs how much of the slice looks like each feature, so a small
    lesion in a slice whose look says "no-tumour collection" is outvoted by the rest of the slice; the
    maximum says whether any part of it does. Grad-CAM stays a weighted sum of the channels: the mean
    gradient of a logit over the cells is ``(w_avg + w_max) / (h * w)`` (the maximum passes its gradient
    to one cell), see :func:`tumor_xai.inference.class_activation_map`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], dim=1)


# How the last block's map becomes the classifier's input (metadata key ``pooling``).
POOLINGS = ("avg", "avgmax")


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (``model`` itself when not wrapped)."""
    return model.module if hasattr(model, "module") else model


def pooling_of(model: nn.Module) -> str:
    """The :data:`POOLINGS` name of ``model``'s head."""
    return "avgmax" if isinstance(model.avgpool, AvgMaxPool) else "avg"


def set_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """Give ``model`` (in place) the ``pooling`` head. Going from ``avg`` to ``avgmax`` keeps the classifier's
    answers: its weights become ``[W, 0]`` (the maximum's half starts at zero)."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}")
    current = pooling_of(model)
    if pooling == current:
        return model
    if pooling == "avg":
        raise ValueError("an avgmax classifier cannot be turned back into an avg one")
    old = model.fc
    model.avgpool = AvgMaxPool()
    model.fc = nn.Linear(2 * old.in_features, old.out_features).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        model.fc.weight.copy_(torch.cat([old.weight, torch.zeros_like(old.weight)], dim=1))
        model.fc.bias.copy_(old.bias)
    return model


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
    arch: str = "resnet18",
    num_classes: int = 4,
    in_chans: int = 1,
    pretrained: str | None = None,
    members: int = 1,
    pooling: str = "avg",
) -> nn.Module:
    """A torchvision ResNet with ``in_chans`` input channels and ``num_classes`` outputs.

    ``pretrained="imagenet"`` downloads torchvision's ImageNet weights (internet needed) and folds
    the RGB stem into one channel by summing it; the default trains from scratch. ``members`` > 1 builds
    the shape of :func:`combine_models` of that many such networks (to load an ensemble's weights into).
    ``pooling="avgmax"`` gives it the :class:`AvgMaxPool` head (see :func:`set_pooling`).
    """
    if pooling != "avg":  # set_pooling checks the name
        if members > 1:
            raise ValueError("networks with an avgmax classifier cannot be combined side by side")
        return set_pooling(build_model(arch, num_classes, in_chans, pretrained), pooling)
    if members > 1:
        one = build_model(arch, num_classes, in_chans)
        return combine_models([one] * members)
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


def combine_models(models: list[nn.Module]) -> nn.Module:
    """Several trained ResNets of one architecture as ONE ResNet whose logits are the mean of theirs.

    Every stage runs the members side by side: the stem convolution stacks their filters, the later
    convolutions become grouped convolutions (one group per member, so no member sees another's
    channels), the BatchNorms concatenate, and the final linear layer averages their logits. The result
    has the usual module names (``conv1`` ... ``layer4``, ``fc``), so everything that takes one ResNet
    takes it: the hook-free Grad-CAM of the last block (which is then the Grad-CAM of the averaged
    logit), pytorch-grad-cam's methods, the out-of-distribution features, channels-last inference.
    """
    if not models:
        raise ValueError("combine_models needs at least one model")
    if any(pooling_of(m) != "avg" for m in models):
        raise ValueError("networks with an avgmax classifier cannot be combined side by side (average them instead)")
    n = len(models)
    named = [dict(m.named_modules()) for m in models]
    if any(set(d) != set(named[0]) for d in named):
        raise ValueError("the models to combine have different architectures")
    out = copy.deepcopy(models[0])
    for name, mod in list(out.named_modules()):
        parts = [d[name] for d in named]
        parent, _, leaf = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        if isinstance(mod, nn.Conv2d):
            stem = name == "conv1"  # every member reads the same image
            new = nn.Conv2d(
                mod.in_channels * (1 if stem else n), mod.out_channels * n, mod.kernel_size, mod.stride,
                mod.padding, mod.dilation, groups=mod.groups * (1 if stem else n), bias=mod.bias is not None,
            )  # fmt: skip
            _copy(new, parts, {"weight": 0, "bias": 0})
        elif isinstance(mod, nn.BatchNorm2d):
            new = nn.BatchNorm2d(mod.num_features * n, eps=mod.eps, momentum=mod.momentum)
            _copy(new, parts, {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0})
        elif isinstance(mod, nn.Linear):
            if name != "fc":
                raise ValueError(f"cannot combine the linear layer {name!r}: only the final fc is supported")
            new = nn.Linear(mod.in_features * n, mod.out_features)
            with torch.no_grad():
                new.weight.copy_(torch.cat([p.weight for p in parts], dim=1) / n)
                new.bias.copy_(torch.stack([p.bias for p in parts]).mean(0))
        else:
            if any(True for _ in mod.parameters(recurse=False)):
                raise ValueError(f"cannot combine {name!r} ({type(mod).__name__})")
            continue
        setattr(holder, leaf, new)
    return out


def average_models(models: list[nn.Module], mix: list[float] | None = None) -> nn.Module:
    """One network whose every parameter and BatchNorm statistic is the ``mix``-weighted mean of the models'
    (uniform without ``mix``): a weight-space ensemble (a "model soup"; Wortsman et al., 2022, WiSE-FT
    when one model is a fine-tune of the other). It costs one forward pass, but it only means something
    for models that share a starting point (a fine-tune and the weights it started from, or fine-tunes of
    one base): two networks trained apart from scratch average to noise. Integer buffers (BatchNorm's
    batch counters) are the first model's.
    """
    if not models:
        raise ValueError("average_models needs at least one model")
    mix = [1.0 / len(models)] * len(models) if mix is None else [float(m) for m in mix]
    if len(mix) != len(models) or any(m < 0 for m in mix) or abs(sum(mix) - 1.0) > 1e-6:
        raise ValueError(f"the mix must give each model a share >= 0, summing to 1 (got {mix})")
    states = [m.state_dict() for m in models]
    if any(set(s) != set(states[0]) or any(s[k].shape != states[0][k].shape for k in s) for s in states):
        raise ValueError("the models to average have different architectures")
    out = copy.deepcopy(models[0])
    averaged = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            averaged[key] = sum(w * s[key].float() for w, s in zip(mix, states, strict=True)).to(ref.dtype)
        else:
            averaged[key] = ref
    out.load_state_dict(averaged)
    return out


def _copy(new: nn.Module, parts: list[nn.Module], tensors: dict[str, int]) -> None:
    """Set ``new``'s tensors to the members' tensors concatenated along the given dimension."""
    with torch.no_grad():
        for key, dim in tensors.items():
            if getattr(new, key, None) is not None:
                getattr(new, key).copy_(torch.cat([getattr(p, key) for p in parts], dim=dim))
