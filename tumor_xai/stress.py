"""Stress tests: plausible acquisition and export changes applied to a decoded slice.

Each corruption takes the decoded grayscale image (H x W, float in [0, 1]) and returns one of the
same shape and range. They are applied BEFORE :func:`~tumor_xai.preprocess.fit_square` and the
shared normalisation, i.e. to what a user could actually upload, so the per-image percentile stretch
gets its chance to undo intensity changes, as it would in the app.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

__all__ = [
    "CORRUPTIONS",
    "Corruption",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_gamma",
    "corrupt",
    "corrupt_squares",
    "down_up_sample",
    "gaussian_noise",
    "rotate",
]

# (gray, seed) -> gray; the seed makes random corruptions reproducible per image and is ignored otherwise.
Corruption = Callable[[np.ndarray, int], np.ndarray]


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)


def adjust_contrast(gray: np.ndarray, factor: float) -> np.ndarray:
    """Scale deviations from the image mean by ``factor`` (below 1 flattens, above 1 sharpens)."""
    mean = float(gray.mean())
    return _clip(mean + (gray.astype(np.float32) - mean) * factor)


def adjust_gamma(gray: np.ndarray, gamma: float) -> np.ndarray:
    """``gray ** gamma``: below 1 brightens the mid-tones, above 1 darkens them."""
    return _clip(np.power(gray.astype(np.float32), gamma))


def adjust_brightness(gray: np.ndarray, delta: float) -> np.ndarray:
    """Add ``delta`` to every pixel (clipped to [0, 1]; the black background lifts too when positive)."""
    return _clip(gray.astype(np.float32) + delta)


def down_up_sample(gray: np.ndarray, factor: int) -> np.ndarray:
    """Shrink by ``factor`` (area averaging) and enlarge back (bilinear): a low-resolution export."""
    h, w = gray.shape
    small = cv2.resize(
        gray.astype(np.float32), (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA
    )
    return _clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR))


def gaussian_noise(gray: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Add i.i.d. Gaussian noise of standard deviation ``sigma`` drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return _clip(gray.astype(np.float32) + rng.normal(0.0, sigma, gray.shape).astype(np.float32))


def rotate(gray: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the image centre by ``degrees`` (counter-clockwise), bilinear, black corners."""
    h, w = gray.shape
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)
    out = cv2.warpAffine(
        gray.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0
    )
    return _clip(out)


CORRUPTIONS: dict[str, Corruption] = {
    "contrast_x0.7": lambda g, s: adjust_contrast(g, 0.7),
    "contrast_x1.5": lambda g, s: adjust_contrast(g, 1.5),
    "gamma_0.7": lambda g, s: adjust_gamma(g, 0.7),
    "gamma_1.4": lambda g, s: adjust_gamma(g, 1.4),
    "brightness_+0.1": lambda g, s: adjust_brightness(g, 0.1),
    "brightness_-0.1": lambda g, s: adjust_brightness(g, -0.1),
    "downup_2x": lambda g, s: down_up_sample(g, 2),
    "downup_4x": lambda g, s: down_up_sample(g, 4),
    "noise_0.05": lambda g, s: gaussian_noise(g, 0.05, seed=s),
    "rotate_+10": lambda g, s: rotate(g, 10.0),
    "rotate_-10": lambda g, s: rotate(g, -10.0),
}


def corrupt(name: str, gray: np.ndarray, seed: int = 0) -> np.ndarray:
    """Apply the corruption called ``name`` (a key of :data:`CORRUPTIONS`)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[name](gray, seed)


def corrupt_squares(squares: np.ndarray, name: str) -> np.ndarray:
    """uint8 squares ``(N, S, S)`` after the named corruption, image ``i`` drawn with seed ``i``: the
    validation stress tests of the gate (``benchmarks/compare_validation.py``) and of
    :mod:`tumor_xai.retrain_head`'s choice, which must see the same corrupted images."""
    from tumor_xai.preprocess import quantize

    return np.stack([quantize(corrupt(name, sq.astype(np.float32) / 255.0, seed=i)) for i, sq in enumerate(squares)])
