"""The public entry point: ``Predictor.from_pretrained().predict(image, explain=True)``.

One forward pass gives the calibrated probabilities, the pooled features for the out-of-distribution
test and, for the default explanation (Grad-CAM on the last block), the heatmap too. Other
explanation methods run through pytorch-grad-cam on a private copy of the model, one call at a time
(see :mod:`tumor_xai.explain`), so the hook-free path stays fully concurrent.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tumor_xai import explain as xai
from tumor_xai import inference
from tumor_xai.checkpoint import LoadedWeights, WeightsError, load_weights
from tumor_xai.decode import DecodedImage, ImageSource, load_image
from tumor_xai.inputs import InvalidImageError
from tumor_xai.ood import OodDetector, cheap_checks, feature_vector, head_shape, header_check, layout_statistics
from tumor_xai.ood import check as ood_check
from tumor_xai.preprocess import to_square_u8
from tumor_xai.volume import ScanSource, Volume, read_volume

if TYPE_CHECKING:
    from tumor_xai.scan import ScanPrediction

__all__ = ["Prediction", "Predictor"]

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """What the model says about one slice."""

    probabilities: dict[str, float | None]  # every value None out of distribution
    label: str | None  # None out of distribution
    tumor_probability: float | None = None
    screening_positive: bool | None = None
    in_distribution: bool = True
    ood_reason: str | None = None
    heatmap: np.ndarray | None = None  # float32 in [0, 1], same H x W as the decoded input
    overlay: object | None = None  # PIL.Image, same size as the input
    method: str | None = None
    target: str | None = None
    image: DecodedImage | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, object]:
        """The answer as one flat record: what the API returns and each batch CSV row holds, in this order.

        Keys: ``label``, ``p_<class>`` in the weights' class order, ``tumor_probability``,
        ``screening_positive``, ``in_distribution``, ``ood_reason``, ``method``, ``target``. Out of
        distribution every verdict (class, probabilities, tumour probability, flag, heatmap target) is None.
        """
        return {
            "label": self.label,
            **{f"p_{name}": None if p is None else float(p) for name, p in self.probabilities.items()},
            "tumor_probability": self.tumor_probability,
            "screening_positive": self.screening_positive,
            "in_distribution": bool(self.in_distribution),
            "ood_reason": self.ood_reason,
            "method": self.method,
            "target": self.target,
        }


class Predictor:
    """A loaded model plus everything stored with it (classes, preprocessing, calibration, OOD statistics).

    Safe to share between threads: the default path touches no mutable state, and the library
    explanation methods serialise on a lock around a private model copy.
    """

    def __init__(self, weights: LoadedWeights):
        self.weights = weights
        self.model = weights.model.eval()
        self.class_names = weights.class_names
        self.preprocess = weights.preprocess
        self.decision = weights.decision  # temperature, screening threshold, negative class (validated)
        try:
            self.ood = OodDetector.from_weights(weights.extras, weights.metadata)
        except ValueError as exc:
            raise WeightsError(f"{exc} ({weights.path})") from exc
        if self.ood is None:
            logger.warning("weights in %s carry no OOD statistics: only the cheap input checks run", weights.path)
        self._cam_model: nn.Module | None = None
        self._cam_model_lock = threading.Lock()

    @property
    def temperature(self) -> float:
        return self.decision.temperature

    @property
    def threshold(self) -> float | None:
        return self.decision.threshold

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> Predictor:
        """Load the repository's ``weights/`` (default) or the weights folder at ``path``."""
        return cls(load_weights(path))

    def check_options(
        self,
        method: str,
        target: str | None = None,
        layer: str | None = None,
        colormap: str = xai.DEFAULT_COLORMAP,
        alpha: float = xai.DEFAULT_ALPHA,
    ) -> None:
        """Raise ``ValueError`` listing the valid choices if an explanation option is unknown."""
        xai.check_method(method)
        xai.resolve_layer(self.model, layer)
        xai.check_colormap(colormap)
        if target is not None and target not in self.class_names:
            raise ValueError(f"unknown target class {target!r}; choose one of {', '.join(self.class_names)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (heatmap opacity) must be in [0, 1], got {alpha}")

    def _library_model(self) -> nn.Module:
        # The library's hooks go on this copy, never on self.model, which concurrent requests share.
        with self._cam_model_lock:
            if self._cam_model is None:
                self._cam_model = copy.deepcopy(self.model).eval()
            return self._cam_model

    def predict(
        self,
        image: ImageSource | DecodedImage,
        explain: bool = False,
        method: str = xai.DEFAULT_METHOD,
        target: str | None = None,
        layer: str | None = None,
        colormap: str = xai.DEFAULT_COLORMAP,
        alpha: float = xai.DEFAULT_ALPHA,
    ) -> Prediction:
        """Classify one slice; with ``explain``, also a heatmap of ``target`` (default: the predicted class).

        ``image`` is a path, bytes, PIL image, numpy array or an already decoded image; a bad file
        raises :class:`tumor_xai.decode.InvalidImageError`, a bad option ``ValueError``. An image the
        out-of-distribution check refuses gets no verdict: no class, probabilities, tumour probability,
        screening flag or heatmap, only ``in_distribution=False`` and the reason.
        """
        if explain:
            self.check_options(method, target, layer, colormap, alpha)
        decoded = image if isinstance(image, DecodedImage) else load_image(image)
        square, geometry = to_square_u8(decoded.gray, self.preprocess)
        squares = square[None]
        fast = explain and xai.is_fast_path(self.model, method, layer)
        stats = layout_statistics if self.ood is not None else None
        out = inference.forward(self.model, squares, self.preprocess, keep_maps=fast, stage_stats=stats)
        probs = self.decision.probabilities(out.logits)[0].numpy()
        label_idx = int(np.argmax(probs))
        target_idx = label_idx if target is None else self.class_names.index(target)

        features = feature_vector(out) if self.ood is not None else None
        reason = ood_check(decoded, squares[0], self.ood, features)
        if reason is not None:  # the model's numbers for such an image mean nothing: none leave here
            none = dict.fromkeys(self.class_names)
            return Prediction(none, None, in_distribution=False, ood_reason=reason, image=decoded)

        probabilities = {c: float(p) for c, p in zip(self.class_names, probs, strict=False)}
        pred = Prediction(probabilities=probabilities, label=self.class_names[label_idx], image=decoded)
        pred.tumor_probability = self.decision.tumor_probability(probabilities)
        pred.screening_positive = self.decision.screening_positive(pred.tumor_probability)

        if explain:
            size = self.preprocess.input_size
            if fast:
                with torch.inference_mode():
                    cam = inference.class_activation_map(out.fmap, self.model.fc.weight, torch.tensor([target_idx]))
                heat = xai.drawn_heatmaps(cam.numpy(), size)[0]
            else:
                x = inference.to_input(squares, self.preprocess)
                heat = xai.explain_batch(
                    self._library_model(), x, torch.tensor([target_idx]), method, layer or xai.DEFAULT_LAYER
                )[0]
            pred.heatmap = np.clip(geometry.to_original(heat), 0.0, 1.0).astype(np.float32)
            pred.overlay = xai.overlay(decoded.gray, pred.heatmap, colormap, alpha)
            pred.method, pred.target = method, self.class_names[target_idx]
        return pred

    def predict_batch(self, images: list[ImageSource | DecodedImage], **kwargs) -> list[Prediction]:
        """:meth:`predict` for each image in turn (same keyword arguments)."""
        return [self.predict(image, **kwargs) for image in images]

    def predict_volume(
        self,
        volume: Volume | ScanSource,
        plane: str = "axial",
        top_k: int = 5,
        *,
        batch_size: int = 8,
        progress: Callable[[float, str], None] | None = None,
        refuse_out_of_distribution: bool = True,
    ) -> ScanPrediction:
        """Classify every slice of a scan in batches; the ``top_k`` most suspicious ones lead the summary.

        ``volume`` is a :class:`~tumor_xai.volume.Volume` or what :func:`~tumor_xai.volume.read_volume`
        reads (a NIfTI path, DICOM files, a folder or a zip; ``plane`` then picks the slices). Each slice
        keeps its Grad-CAM (its predicted class) from the same forward pass. Slices with too little head
        or flagged out of distribution are marked and left out of the summary. A scan whose header says it
        is not a brain MRI, or whose slices are mostly out of distribution, raises InvalidImageError (the
        second only with ``refuse_out_of_distribution``). ``progress(fraction, text)`` hears how far it got.
        """
        from tumor_xai.scan import MIN_HEAD_AREA, ScanPrediction

        report = progress or (lambda fraction, text: None)
        if not isinstance(volume, Volume):
            report(0.0, "reading the scan")
            volume = read_volume(volume, plane)
        if (reason := header_check(volume.slice_image(0))) is not None:
            raise InvalidImageError(f"Not assessed: {reason}.")
        n = len(volume)
        probabilities, cams, excluded = [], [], []
        geometry = None
        for start in range(0, n, batch_size):
            report(start / n, f"slices {start + 1}-{min(n, start + batch_size)} of {n}")
            batch = [to_square_u8(s, self.preprocess) for s in volume.slices[start : start + batch_size]]
            squares = np.stack([sq for sq, _ in batch])
            geometry = batch[0][1]
            stats = layout_statistics if self.ood is not None else None
            out = inference.forward(self.model, squares, self.preprocess, batch_size, keep_maps=True, stage_stats=stats)
            probs = self.decision.probabilities(out.logits)
            with torch.inference_mode():
                cam = inference.class_activation_map(out.fmap, self.model.fc.weight, probs.argmax(dim=1))
            probabilities.append(probs.numpy())
            cams.append(cam.numpy())
            distances = self.ood.distance(feature_vector(out)).tolist() if self.ood is not None else None
            for j, square in enumerate(squares):
                distance = None if distances is None else distances[j]
                excluded.append(self._slice_reason(volume.slice_image(start + j), square, distance, MIN_HEAD_AREA))
        report(1.0, "summarising")
        probs = np.concatenate(probabilities)
        negative = self.decision.negative_index
        tumor = None if negative is None else 1.0 - probs[:, negative]
        _refuse_if_mostly_flagged(excluded, refuse_out_of_distribution)
        counted = [i for i, e in enumerate(excluded) if e is None]
        rank = tumor if tumor is not None else probs.max(axis=1)
        top = sorted(counted, key=lambda i: -rank[i])[: max(0, top_k)]
        return ScanPrediction(
            volume=volume,
            class_names=list(self.class_names),
            probabilities=probs,
            tumor_probability=tumor,
            threshold=self.threshold,
            excluded=excluded,
            cams=np.concatenate(cams),
            geometry=geometry,
            input_size=self.preprocess.input_size,
            top=top,
            negative_class=self.decision.negative_class,
        )

    def _slice_reason(
        self, image: DecodedImage, square: np.ndarray, distance: float | None, min_head: float
    ) -> str | None:
        """Why a scan's slice does not count (too little head, or out of distribution), or None."""
        stats = head_shape(square)
        if stats["head_area"] < min_head:
            return f"too little head ({stats['head_area']:.0%} of the slice)"
        reason = cheap_checks(image)
        if reason is None and self.ood is not None:
            reason = self.ood.shape_reason(stats) or self.ood.reason(distance)
        return None if reason is None else f"out of distribution: {reason}"


def _refuse_if_mostly_flagged(excluded: list[str | None], refuse: bool) -> None:
    with_head = [e for e in excluded if e is None or not e.startswith("too little head")]
    if not with_head:
        raise InvalidImageError("Not assessed: no slice of this scan shows enough of a head to read.")
    flagged = sum(e is not None for e in with_head)
    if refuse and flagged > 0.5 * len(with_head):
        raise InvalidImageError(
            f"Not assessed: {flagged} of the {len(with_head)} slices that show a head do not look like the brain "
            "MRI slices the model was trained on, so this scan is not read as a brain MRI."
        )
