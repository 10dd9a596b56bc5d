"""The one preprocessing path: training, evaluation, prediction and heatmaps all go through it.

A decoded slice (grayscale, any size) is padded to a square with black (the MRI background), resized
to the model's input size, optionally stretched per image so that its 1st-99th intensity percentiles
span [0, 1], and normalised with the mean and std stored in the weights. :class:`Geometry` records
the padding so a heatmap computed at input size maps back onto the original pixels exactly.

First, a thin bright frame drawn around the picture (a border line some exports carry) is blanked
(:func:`blank_frame`, preprocessing version 2): in the training data it is a collection cue (133 of
the 1591 no-tumour training slices carry one, 10 of the 4117 tumour slices), which a model can read
as "no tumour" on a tumour slice from that collection, and which made the out-of-distribution check
refuse framed brain MRI from it. Weights record the version their decision and statistics were
fitted under; the blanking applies to every weights file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

__all__ = [
    "PREPROCESSING_VERSION",
    "blank_frame",
    "Geometry",
    "PreprocessConfig",
    "fit_square",
    "normalize",
    "normalize_quantized",
    "prepare",
    "refitted_under_current",
    "quantize",
    "stretch_intensity",
    "to_square_u8",
]

# Bump when the pixels the model sees for a given file change; stored in every weights file.
PREPROCESSING_VERSION = 2
FRAME_DEPTH = 0.03  # a frame lies in the outer 3 % of a side (at least FRAME_MIN_LINES lines)
FRAME_MIN_LINES = 2
FRAME_BRIGHT = 0.5  # a frame line has more than FRAME_SHARE of its pixels brighter than this
FRAME_SHARE = 0.5
FRAME_STEP = 0.5  # and the line inside the frame has under half its bright share (a head reaching the edge grows)


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
        known = {k: d[k] for k in ("input_size", "mean", "std", "intensity", "version") if k in d}
        return cls(**{"version": 1, **known})  # weights without a version predate it: version 1


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


def _frame_lines(lines: np.ndarray) -> int:
    """How many lines from the edge inwards a frame takes, given the outer lines (edge first, one per row):
    through the last mostly bright line, if the line inside it is much less bright; else 0 (the chord of
    a head cut by the picture's edge widens inwards, a frame line ends in a step)."""
    share = (lines > FRAME_BRIGHT).mean(axis=1)
    frame = np.flatnonzero(share[:-1] > FRAME_SHARE)
    if frame.size == 0:
        return 0
    last = int(frame[-1])
    return last + 1 if share[last + 1] < FRAME_STEP * share[last] else 0


def blank_frame(gray: np.ndarray) -> np.ndarray:
    """``gray`` (H x W in [0, 1]) with a thin bright frame around the picture set to black, on each side
    that has one; the input itself when none has (no copy).

    A frame line is an outer row or column (within ``FRAME_DEPTH`` of the side) that is mostly bright,
    with a much less bright line inside it; the lines from the edge through it are blanked.
    """
    h, w = gray.shape
    outer = {"top": gray, "bottom": gray[::-1], "left": gray.T, "right": gray.T[::-1]}  # edge line first
    cuts = {}
    for side, lines in outer.items():
        n = len(lines)
        depth = max(FRAME_MIN_LINES, round(FRAME_DEPTH * n)) + 1
        if n > 2 * depth and (cut := _frame_lines(lines[:depth])):
            cuts[side] = cut
    if not cuts:
        return gray
    out = gray.copy()
    out[: cuts.get("top", 0)] = 0.0
    out[h - cuts.get("bottom", 0) :] = 0.0
    out[:, : cuts.get("left", 0)] = 0.0
    out[:, w - cuts.get("right", 0) :] = 0.0
    return out


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
    the scan reader, the benchmarks): :func:`blank_frame`, :func:`fit_square` at
    ``cfg.input_size``, then :func:`quantize` as training holds its images, so one slice gives the same
    numbers on every path.
    """
    square, geometry = fit_square(blank_frame(gray), cfg.input_size)
    return quantize(square), geometry


def refitted_under_current(preprocessing: dict) -> dict:
    """A weights file's ``preprocessing`` metadata for a decision (temperature, threshold, OOD statistics)
    fitted again by this code: the same settings at this code's :data:`PREPROCESSING_VERSION`."""
    return {**preprocessing, "version": PREPROCESSING_VERSION}


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
