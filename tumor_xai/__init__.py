"""tumor-xai: an explainable brain-MRI tumour classifier (research demo, not a diagnostic device)."""

__version__ = "0.1.0"

from tumor_xai.checkpoint import WeightsError, load_weights, save_weights  # noqa: E402
from tumor_xai.decode import InvalidImageError, load_image  # noqa: E402
from tumor_xai.model import build_model  # noqa: E402
from tumor_xai.predictor import Prediction, Predictor  # noqa: E402

__all__ = [
    "__version__",
    "InvalidImageError",
    "Prediction",
    "Predictor",
    "WeightsError",
    "build_model",
    "load_image",
    "load_weights",
    "save_weights",
]
