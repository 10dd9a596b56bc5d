"""The public entry point: ``Predictor.from_pretrained().predict(image)``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tumor_xai.checkpoint import LoadedWeights, load_weights
from tumor_xai.decode import DecodedImage, ImageSource, load_image
from tumor_xai.model import features_and_logits
from tumor_xai.preprocess import prepare

__all__ = ["NO_TUMOR_CLASS", "Prediction", "Predictor"]

logger = logging.getLogger(__name__)

NO_TUMOR_CLASS = "notumor"


@dataclass
class Prediction:
    """What the model says about one slice."""

    probabilities: dict[str, float]
    label: str
    tumor_probability: float | None = None
    screening_positive: bool | None = None
    in_distribution: bool = True
    ood_reason: str | None = None
    heatmap: np.ndarray | None = None  # float32 in [0, 1], same H x W as the decoded input
    overlay: object | None = None  # PIL.Image, same size as the input
    method: str | None = None
    target: str | None = None
    image: DecodedImage | None = field(default=None, repr=False)


class Predictor:
    """A loaded model plus everything stored with it (classes, preprocessing, calibration)."""

    def __init__(self, weights: LoadedWeights):
        self.weights = weights
        self.model = weights.model
        self.class_names = weights.class_names
        self.preprocess = weights.preprocess
        meta = weights.metadata
        self.temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
        self.threshold = meta.get("screening", {}).get("threshold")

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "Predictor":
        """Load the repository's ``weights/`` (default) or the weights folder at ``path``."""
        return cls(load_weights(path))

    def predict(self, image: ImageSource | DecodedImage, explain: bool = False) -> Prediction:
        decoded = image if isinstance(image, DecodedImage) else load_image(image)
        x, geometry = prepare(decoded.gray, self.preprocess)
        with torch.inference_mode():
            fmap, logits = features_and_logits(self.model, x)
        probs = torch.softmax(logits.float() / self.temperature, dim=1)[0].numpy()
        probabilities = {c: float(p) for c, p in zip(self.class_names, probs)}
        label = self.class_names[int(np.argmax(probs))]
        pred = Prediction(probabilities=probabilities, label=label, image=decoded)
        if NO_TUMOR_CLASS in probabilities:
            pred.tumor_probability = 1.0 - probabilities[NO_TUMOR_CLASS]
            if self.threshold is not None:
                pred.screening_positive = pred.tumor_probability >= float(self.threshold)
        return pred
