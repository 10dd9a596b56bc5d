"""The one preprocessing path: training, evaluation, prediction and heatmaps all go through it.

A decoded slice (grayscale, any size) is padded to a square with black (the MRI background), resized
to the model's input size, optionally stretched per image so that its 1st-99th intensity percentiles
span [0, 1], and normalised with the mean and std stored in the weights. :class:`Geometry` records
the padding so a heatmap computed at input size maps back onto the original pixels exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

__all__ = [
    "PREPROCESSING_VERSION",
    "Geometry",
    "PreprocessConfig",
    "fit_square",
    "normalize",
    "normalize_quantized",
    "prepare",
    "quantize",
    "stretch_intensity",
    "to_square_u8",
]

# Bump when the pixels the model sees for a given file change; stored in every weights file.
PREPROCESSING_VERSION = 1


@dataclass(frozen=True)
class PreprocessConfig:
    """What the model expects; travels with the weights."""

    input_size: int = 224
    mean: float = 0.5
    std: float = 0.25
    intensity: str = "percentile"  # "percentile" (per-image 1st-99th stretch) or "none"
    version: int = PREPROCESSING_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        return cls(**{k: d[k] for k in ("input_size", "mean", "std", "intensity", "version") if k in d})


@dataclass(frozen=True)
class Geometry:
    """How an original H x W image was placed in the square model input."""

    height: int
    width: int
    side: int  # side of the padded square, in original pixels
    top: int
    left: int

    def to_original(self, square_map: np.ndarray) -> np.ndarray:
        """Map an array over the model's input square back to the original image's H x W."""
        full = cv2.resize(square_map.astype(np.float32), (self.side, self.side), interpolation=cv2.INTER_LINEAR)
        return full[self.top : self.top + self.height, self.left : self.left + self.width]


def fit_square(gray: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    """Pad ``gray`` (H x W, float in [0, 1]) to a centred square and resize it to ``size``."""
    h, w = gray.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if (h, w) != (side, side):
        square = np.zeros((side, side), dtype=np.float32)
        square[top : top + h, left : left + w] = gray
    else:
        square = gray.astype(np.float32, copy=False)
    if side != size:
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        square = cv2.resize(square, (size, size), interpolation=interp)
    return np.clip(square, 0.0, 1.0), Geometry(h, w, side, top, left)


def to_square_u8(gray: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, Geometry]:
    """A decoded slice (H x W in [0, 1]) -> the uint8 model square ``(S, S)`` and its geometry.

    The one decode-side step every caller shares (training's decoding, evaluation, the predictor,
    the scan reader, the benchmarks): :func:`fit_square` at ``cfg.input_size``, then :func:`quantize`
    as training holds its images, so one slice gives the same numbers on every path.
    """
    square, geometry = fit_square(gray, cfg.input_size)
    return quantize(square), geometry


def stretch_intensity(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-image contrast stretch of a batch ``(N, 1, H, W)`` in [0, 1]; a no-op for mode "none".

    Stretching the 1st-99th percentile to [0, 1] makes the model blind to the global brightness and
    contrast of a scanner's export, which otherwise differ between the dataset's source collections.
    """
    if mode == "none":
        return x
    if mode != "percentile":
        raise ValueError(f"unknown intensity mode {mode!r}")
    flat = x.flatten(1).float()
    # kthvalue is much cheaper than quantile on CPU and exact enough here.
    n = flat.shape[1]
    lo = flat.kthvalue(max(1, int(0.01 * n)), dim=1).values
    hi = flat.kthvalue(max(1, int(0.99 * n)), dim=1).values
    scale = (hi - lo).clamp_min(1e-3)
    out = (flat - lo[:, None]) / scale[:, None]
    return out.clamp(0.0, 1.0).view_as(x).to(x.dtype)


def normalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Stretch then standardise a batch ``(N, 1, H, W)`` of [0, 1] intensities for the model."""
    return (stretch_intensity(x, cfg.intensity) - cfg.mean) / cfg.std


def prepare(gray: np.ndarray, cfg: PreprocessConfig) -> tuple[torch.Tensor, Geometry]:
    """A decoded slice -> the model's input tensor ``(1, 1, S, S)`` and its geometry."""
    # Quantised exactly as training and evaluation store their decoded images (uint8), so a file gives
    # the same probabilities in the app as in the evaluation.
    square, geometry = to_square_u8(gray, cfg)
    return normalize_quantized(torch.from_numpy(square)[None, None], cfg), geometry


def normalize_quantized(squares: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 squares ``(N, 1, S, S)`` (what training holds and evaluation decodes) -> the model's input."""
    return normalize(squares.float().div_(255.0), cfg)


def quantize(square: np.ndarray) -> np.ndarray:
    """A [0, 1] square as the uint8 array training keeps resident (and evaluation decodes to)."""
    return np.round(square * 255.0).astype(np.uint8)
