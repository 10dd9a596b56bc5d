"""tumor-xai: an explainable brain-MRI tumour classifier (research demo, not a diagnostic device).

The public names below load on first use (PEP 562), so ``python -m tumor_xai.<module>`` does not import
that module before running it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and editors see
    from tumor_xai.checkpoint import WeightsError, load_weights, save_weights
    from tumor_xai.decode import InvalidImageError, load_image
    from tumor_xai.model import build_model
    from tumor_xai.predictor import Prediction, Predictor
    from tumor_xai.scan import ScanPrediction
    from tumor_xai.volume import Volume, read_mask, read_volume

__version__ = "0.1.0"

_EXPORTS = {
    "InvalidImageError": "tumor_xai.decode",
    "Prediction": "tumor_xai.predictor",
    "Predictor": "tumor_xai.predictor",
    "ScanPrediction": "tumor_xai.scan",
    "Volume": "tumor_xai.volume",
    "WeightsError": "tumor_xai.checkpoint",
    "build_model": "tumor_xai.model",
    "load_image": "tumor_xai.decode",
    "load_weights": "tumor_xai.checkpoint",
    "read_mask": "tumor_xai.volume",
    "read_volume": "tumor_xai.volume",
    "save_weights": "tumor_xai.checkpoint",
}

__all__ = [
    "InvalidImageError",
    "Prediction",
    "Predictor",
    "ScanPrediction",
    "Volume",
    "WeightsError",
    "__version__",
    "build_model",
    "load_image",
    "load_weights",
    "read_mask",
    "read_volume",
    "save_weights",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tumor_xai' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
