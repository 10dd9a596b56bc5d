"""The one batched forward pass: uint8 squares in, logits and pooled features out.

Every path that runs the model on decoded images goes through here: the
:class:`~tumor_xai.predictor.Predictor`, training's validation and localisation monitor, the
evaluation, the OOD feature fit and the benchmarks. The input is what
:func:`tumor_xai.preprocess.fit_square` produces, quantised to uint8 as training holds it and
evaluation decodes it (:func:`~tumor_xai.preprocess.quantize`), so one file gives the same numbers on
every path. Like timm's ``forward_features`` / ``forward_head`` split, the last block's map is
available too, for the class activation map (the default heatmap) without a second pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tumor_xai.model import features_and_logits, unwrap
from tumor_xai.preprocess import PreprocessConfig, normalize_quantized

__all__ = ["Forward", "class_activation_map", "forward", "forward_batches", "pooled_features", "to_input"]


@dataclass
class Forward:
    """The outputs of :func:`forward`, float32 on the CPU, one row per input square."""

    logits: torch.Tensor  # (N, classes)
    features: torch.Tensor  # (N, C) or (N, 2C): the pooled last block, the vector fc sees
    fmap: torch.Tensor | None = None  # (N, C, h, w): the last block's map, when asked for
    stage_stats: torch.Tensor | None = None  # (N, D): what ``stage_stats`` read from the stage maps, when asked for


def to_input(squares: np.ndarray | torch.Tensor, cfg: PreprocessConfig, channels_last: bool = False) -> torch.Tensor:
    """uint8 squares ``(N, S, S)`` or ``(N, 1, S, S)`` (array or tensor) -> the model's input ``(N, 1, S, S)``."""
    t = torch.from_numpy(np.ascontiguousarray(squares)) if isinstance(squares, np.ndarray) else squares
    x = normalize_quantized(t[:, None] if t.ndim == 3 else t, cfg)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def pooled_features(model: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """The penultimate features, float32: the model's pool of the last block's map, ``(N, C)`` for the
    global average, ``(N, 2C)`` for :class:`~tumor_xai.model.AvgMaxPool`."""
    return torch.flatten(model.avgpool(fmap.float()), 1)


def forward_batches(
    model: nn.Module,
    squares: np.ndarray | torch.Tensor,
    cfg: PreprocessConfig,
    batch_size: int = 64,
    *,
    bf16: bool = False,
    channels_last: bool = False,
    tap: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Eval-mode passes over ``squares`` in batches: yields ``(slice, layer4 map, logits)`` on the model's device.

    The caller chooses the grad mode (training's monitors run it under ``no_grad``); :func:`forward`
    collects the outputs. ``bf16`` autocasts on the model's device type, as training does; ``tap``
    sees each stage's map (see :func:`tumor_xai.model.features_and_logits`).
    """
    module = unwrap(model)
    module.eval()
    device = next(module.parameters()).device
    for start in range(0, len(squares), batch_size):
        sl = slice(start, min(len(squares), start + batch_size))
        x = to_input(squares[sl], cfg, channels_last).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            fmap, logits = features_and_logits(module, x, tap)
        yield sl, fmap, logits


def forward(
    model: nn.Module,
    squares: np.ndarray | torch.Tensor,
    cfg: PreprocessConfig,
    batch_size: int = 64,
    *,
    bf16: bool = False,
    channels_last: bool = False,
    keep_maps: bool = False,
    stage_stats: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> Forward:
    """Logits and pooled features of uint8 squares; with ``keep_maps`` also the last block's maps, with
    ``stage_stats`` what it returns for each stage's map (``(N, D_i)`` or ``None``), concatenated."""
    logits, features, maps, stats = [], [], [], []
    taps: list[torch.Tensor] = []
    module = unwrap(model)

    def tap(stage: int, fmap: torch.Tensor) -> None:
        if (row := stage_stats(stage, fmap)) is not None:
            taps.append(row.float())

    with torch.inference_mode():
        for _, fmap, out in forward_batches(
            model, squares, cfg, batch_size, bf16=bf16, channels_last=channels_last, tap=tap if stage_stats else None
        ):
            logits.append(out.float().cpu())
            features.append(pooled_features(module, fmap).cpu())
            if keep_maps:
                maps.append(fmap.float().cpu())
            if stage_stats is not None:
                stats.append(torch.cat(taps, dim=1).cpu())
                taps.clear()
    if not logits:
        raise ValueError("no images to run the model on")
    return Forward(
        torch.cat(logits),
        torch.cat(features),
        torch.cat(maps) if keep_maps else None,
        torch.cat(stats) if stage_stats else None,
    )


def class_activation_map(
    fmap: torch.Tensor, fc_weight: torch.Tensor, targets: torch.Tensor, relu: bool = True
) -> torch.Tensor:
    """``ReLU(sum_k w[t, k] A_k)`` as float32 ``(N, h, w)``, one map per ``targets[i]``.

    For a ResNet's global-average-pool + linear head this is Grad-CAM on the last block: the
    gradient of logit ``t`` with respect to the map ``A`` is ``w[t, k] / (h * w)`` at every cell, so
    no backward pass or hook is needed. ``relu=False`` keeps the signed map (the training losses).
    A classifier on average and max pool (``fc_weight`` twice as wide as the map has channels,
    :class:`~tumor_xai.model.AvgMaxPool`) gives Grad-CAM the channel weights ``w_avg + w_max``: the max
    passes the gradient ``w_max[t, k]`` to one cell, so its mean over the cells is ``w_max / (h * w)``.
    """
    weights = fc_weight.float()
    channels = fmap.shape[1]
    if weights.shape[1] == 2 * channels:
        weights = weights[:, :channels] + weights[:, channels:]
    weights = weights[targets.long()]  # (N, K)
    cam = torch.einsum("nkhw,nk->nhw", fmap.float(), weights)
    return cam.clamp_min(0.0) if relu else cam
