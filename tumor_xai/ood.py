"""Is this input a brain-MRI slice like the training data? Cheap pixel checks, then a Mahalanobis test.

1. Cheap checks on the decoded image, each with a reason a person can read: colour pictures,
   blank or near-constant images, extreme aspect ratios, tiny images.
2. Mahalanobis distance of the model's pooled penultimate features (global average pool of the last
   block, the vector the fc layer sees) to the training distribution: class-conditional means with
   one shared, Ledoit-Wolf-shrunk covariance (Lee et al., NeurIPS 2018), distance to the nearest
   class. The threshold is a high percentile of the distances of held-out validation slices, so about
   1 % of in-distribution slices are flagged by design. The statistics are fitted at training time
   and stored beside the weights (``extras["ood.*"]``, ``metadata["ood"]``).

``python -m tumor_xai.ood --data DIR --weights DIR`` refits the statistics for an existing weights folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tumor_xai import inference
from tumor_xai.decode import DecodedImage
from tumor_xai.preprocess import PreprocessConfig

__all__ = [
    "MAX_ASPECT_RATIO",
    "MAX_COLORFULNESS",
    "MIN_INTENSITY_RANGE",
    "MIN_SIDE",
    "OodDetector",
    "cheap_checks",
    "extract_features",
    "fit",
    "pooled_features",
]

logger = logging.getLogger(__name__)

# Thresholds of the cheap checks. On the 1311 official Testing slices, colourfulness (mean RGB
# max-min, in [0, 1]) peaks at 0.022 (JPEG chroma noise) and the 1st-99th percentile intensity range
# never falls below 0.33; the dataset's slices are square.
MAX_COLORFULNESS = 0.06
MIN_INTENSITY_RANGE = 0.05
MAX_ASPECT_RATIO = 2.0
MIN_SIDE = 32

METHOD = "mahalanobis"
COVARIANCES = ("class", "single")
EXTRA_MEANS = "ood.means"
EXTRA_PRECISION = "ood.precision"


def cheap_checks(image: DecodedImage) -> str | None:
    """A reason why ``image`` is plainly not an MRI slice like the training data, or ``None``."""
    h, w = image.size
    if min(h, w) < MIN_SIDE:
        return f"the image is only {w} x {h} pixels; an MRI slice export is at least {MIN_SIDE} pixels a side"
    ratio = max(h, w) / min(h, w)
    if ratio > MAX_ASPECT_RATIO:
        return f"the image is {w} x {h} pixels (aspect ratio {ratio:.1f}); MRI slices are close to square"
    if image.colorfulness > MAX_COLORFULNESS:
        return f"this is a colour picture (colourfulness {image.colorfulness:.2f}); MRI slices are greyscale"
    lo, hi = np.percentile(image.gray, [1, 99])
    if hi - lo < MIN_INTENSITY_RANGE:
        return "the image is blank or nearly uniform; there is no slice to classify"
    return None


def pooled_features(fmap: torch.Tensor) -> torch.Tensor:
    """The penultimate features ``(N, C)``: the global average pool of the last block's map."""
    return fmap.float().mean(dim=(2, 3))


def extract_features(model: nn.Module, images: np.ndarray, cfg: PreprocessConfig, batch_size: int = 64) -> torch.Tensor:
    """Pooled features ``(N, C)`` of uint8 squares ``(N, S, S)`` (``data.decode_samples`` output)."""
    return inference.forward(model, images, cfg, batch_size).features


def _squared_distances(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of each row of ``features`` to its nearest mean."""
    diff = features[:, None, :] - means[None, :, :]  # (N, K, C)
    return torch.einsum("nkc,cd,nkd->nk", diff, precision, diff).min(dim=1).values


def fit(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    covariance: str = "class",
    percentile: float = 99.0,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit the Mahalanobis statistics; returns (tensors for ``extras``, JSON-able ``metadata["ood"]``).

    ``covariance="class"`` uses one mean per class and their shared covariance; ``"single"`` one
    Gaussian over all training features. The threshold is the ``percentile`` of the validation
    slices' distances.
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"unknown covariance {covariance!r}; choose one of {', '.join(COVARIANCES)}")
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} training features but {len(train_labels)} labels")
    if len(val_features) == 0:
        raise ValueError("the OOD threshold needs validation features; got none")
    x = train_features.detach().double().cpu()
    y = train_labels.detach().long().cpu()
    if covariance == "class":
        classes = torch.unique(y)
        means = torch.stack([x[y == c].mean(dim=0) for c in classes])
        centred = x - means[torch.searchsorted(classes, y)]
    else:
        means = x.mean(dim=0, keepdim=True)
        centred = x - means
    from sklearn.covariance import ledoit_wolf_shrinkage  # fitting only; keeps scikit-learn out of app start-up

    shrinkage = float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True))
    cov = centred.T @ centred / len(centred)
    target = torch.trace(cov) / cov.shape[0]
    cov = (1.0 - shrinkage) * cov + shrinkage * target * torch.eye(cov.shape[0], dtype=cov.dtype)
    precision = torch.linalg.inv(cov)
    precision = (precision + precision.T) / 2  # exact symmetry after inversion
    val = _squared_distances(val_features.detach().double().cpu(), means, precision).sqrt()
    threshold = float(np.percentile(val.numpy(), percentile))
    train = _squared_distances(x, means, precision).sqrt()
    meta = {
        "method": METHOD,
        "covariance": covariance,
        "feature": "layer4 global average pool",
        "shrinkage": shrinkage,
        "percentile": percentile,
        "threshold": threshold,
        "num_train": len(x),
        "num_val": len(val),
        "val_distance_median": float(val.median()),
        "train_distance_median": float(train.median()),
    }
    extras = {EXTRA_MEANS: means.float(), EXTRA_PRECISION: precision.float()}
    logger.info("OOD fit: %s covariance, shrinkage %.3f, threshold %.2f", covariance, shrinkage, threshold)
    return extras, meta


@dataclass
class OodDetector:
    """The fitted Mahalanobis test; build it with :meth:`from_weights`."""

    means: torch.Tensor  # (K, C)
    precision: torch.Tensor  # (C, C)
    threshold: float

    @classmethod
    def from_weights(cls, extras: dict[str, torch.Tensor], metadata: dict) -> OodDetector | None:
        """The detector stored with a weights folder, or ``None`` when the folder has no OOD statistics."""
        ood = metadata.get("ood")
        if not ood:
            return None
        if ood.get("method") != METHOD:
            raise ValueError(
                f"unsupported OOD method {ood.get('method')!r} in the weights' metadata (expected {METHOD!r})"
            )
        missing = [k for k in (EXTRA_MEANS, EXTRA_PRECISION) if k not in extras]
        if missing or "threshold" not in ood:
            raise ValueError(
                f"the weights' OOD statistics are incomplete (missing {', '.join(missing) or 'threshold'}); "
                "refit them with `python -m tumor_xai.ood --data DIR --weights DIR`"
            )
        return cls(extras[EXTRA_MEANS].double(), extras[EXTRA_PRECISION].double(), float(ood["threshold"]))

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance ``(N,)`` of pooled features ``(N, C)`` to the nearest training class."""
        return _squared_distances(features.detach().double(), self.means, self.precision).clamp_min(0).sqrt()

    def reason(self, distance: float) -> str | None:
        """Why a slice at ``distance`` is out of distribution, or ``None`` when it is within the threshold."""
        if distance <= self.threshold:
            return None
        return (
            f"the image does not look like the brain MRI slices the model was trained on "
            f"(feature distance {distance:.1f} > threshold {self.threshold:.1f})"
        )


@dataclass
class CarveOut:
    """Pooled features of a Training split and the train / validation indices the weights were fitted with."""

    features: torch.Tensor
    labels: torch.Tensor
    train_idx: np.ndarray
    val_idx: np.ndarray
    fraction: float
    seed: int
    from_weights: bool  # whether fraction and seed came from the weights' training config


def carve_out_features(weights, data: Path, batch_size: int = 64) -> CarveOut:
    """Decode ``data``'s Training split and split it as the weights' training did (else a seeded 10 %)."""
    from tumor_xai.data import decode_samples, discover, split_train_val

    dataset = discover(data, splits=("Training",))
    training = weights.metadata.get("training") or {}
    fraction = float(training.get("val_fraction", 0.1))
    seed = int(training.get("seed", 0))
    split = decode_samples(dataset.splits["Training"], weights.preprocess.input_size, skip_unreadable=True)
    train_idx, val_idx = split_train_val(split.labels, split.thumbs, fraction, seed)
    feats = extract_features(weights.model, split.images, weights.preprocess, batch_size)
    return CarveOut(
        feats, torch.from_numpy(split.labels), train_idx, val_idx, fraction, seed, "val_fraction" in training
    )


def _refit(args: argparse.Namespace) -> int:
    # Imported here: only the CLI needs the dataset and checkpoint machinery.
    from tumor_xai.checkpoint import load_weights, save_weights
    from tumor_xai.data import discover

    weights = load_weights(args.weights)
    dataset = discover(args.data, splits=("Training",))
    if dataset.class_names != weights.class_names:
        print(
            f"error: the dataset's classes {dataset.class_names} differ from the weights' {weights.class_names}",
            file=sys.stderr,
        )
        return 2
    print(f"decoding {len(dataset.splits['Training'])} training images at {weights.preprocess.input_size} px ...")
    c = carve_out_features(weights, args.data, args.batch_size)
    if len(c.val_idx) == 0:
        print("error: the validation carve-out is empty; pass a fraction above 0", file=sys.stderr)
        return 2
    source = "the weights' training config" if c.from_weights else "the default"
    print(f"validation carve-out: {len(c.val_idx)} images ({c.fraction:.0%}, seed {c.seed}, from {source})")
    extras, meta = fit(
        c.features[c.train_idx], c.labels[c.train_idx], c.features[c.val_idx], args.covariance, args.percentile
    )
    kept = {k: v for k, v in weights.extras.items() if not k.startswith("ood.")}
    metadata = {
        k: v
        for k, v in weights.metadata.items()
        if k not in ("format_version", "num_classes", "weights_sha256", "storage_dtype")
    }
    metadata["ood"] = meta
    half = weights.metadata.get("storage_dtype") == "float16"
    save_weights(weights.model, weights.path, metadata, extras={**kept, **extras}, half=half)
    print(
        f"OOD threshold {meta['threshold']:.2f} ({args.percentile:g}th percentile of validation distances); wrote {weights.path}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tumor_xai.ood", description="Refit the OOD statistics of a weights folder."
    )
    parser.add_argument(
        "--data", required=True, type=Path, help="Kaggle-layout dataset folder (its Training split is used)"
    )
    parser.add_argument("--weights", required=True, type=Path, help="weights folder to update in place")
    parser.add_argument("--covariance", choices=COVARIANCES, default="class")
    parser.add_argument("--percentile", type=float, default=99.0, help="validation percentile used as threshold")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if not 50.0 <= args.percentile <= 100.0:
        parser.error("--percentile must be between 50 and 100")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tumor_xai.checkpoint import WeightsError
    from tumor_xai.data import DataError

    try:
        return _refit(args)
    except (WeightsError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
