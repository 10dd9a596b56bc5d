"""Is this input a brain-MRI slice like the training data? Four checks, each with a reason a person can read.

1. **DICOM header** (:func:`header_check`): a Modality other than MR (CT, ultrasound, radiographs,
   nuclear medicine, segmentations, dose maps ...) or a BodyPartExamined that names a part other
   than the head. Secondary captures (OT, SC) and unknown codes say nothing and pass; the image
   checks still run. Only the closed-set codes :mod:`tumor_xai.dicom` puts in ``info`` are read.
2. **Cheap checks** (:func:`cheap_checks`): colour pictures, blank images, extreme aspect ratios,
   tiny images.
3. **Bone ring** (:func:`skull_ring`, model-free, fixed by reasoning, not fitted): a head CT shown in a
   brain window has the skull as its brightest structure, a thick ring with the brain directly inside
   it in a narrow grey band; in MRI cortical bone gives no signal, so the skull is a dark layer between
   the scalp (bright fat) and the brain. Along rays from the head's centre to its outline, a CT slice
   shows a bright, thick band at the rim with nothing much darker than the brain inside it. The Kaggle
   dataset itself holds a few such CT slices among its MRI (they are refused too).
4. **Head shape** (:func:`head_shape`, model-free): on the square the model sees, the largest bright
   connected region must look like a head on a dark background: large enough, one region rather than
   many (a bright scalp ring around the brain, apart from it across the dark skull, counts as one with
   what it encloses), an outline close to its fitted ellipse, and MRI-like texture inside (grey-level entropy;
   phantoms and drawings have a handful of levels). Each limit is a low percentile of the Training
   split's own values (0.1 % by default), so about 0.1 % of real slices fall under each.
5. **Feature layout** (:func:`layout_statistics`, from the classifier's own forward pass): where in
   the square each first-stage feature fires, the mean of every layer1 channel over a 3 x 3 grid
   (576 numbers for a ResNet18), scored by the Mahalanobis distance to the nearest class mean under
   one shared, Ledoit-Wolf-shrunk covariance (Lee et al., NeurIPS 2018). A brain slice puts the skull
   ring, the cortex and the ventricles in much the same places; a spine CT, an abdominal or shoulder
   MR or an ultrasound sector puts other textures there. Deeper features serve worse: the last
   block keeps what separates the four tumour classes (an abdomen lands near the no-tumour class),
   and training with noise, blur and down-up sampling made every stage's channel statistics tolerant
   of acquisitions they have not seen. The threshold is a high percentile (:data:`PERCENTILE`, 99.8) of
   the distances of the held-out validation carve-out and its augmented copies; the model card has what
   it flags at 99.5 and 99.8 (``benchmarks/ood.py``).

The statistics are fitted at training time (:func:`fit_model`) and stored beside the weights
(``extras["ood.*"]``, ``metadata["ood"]``). ``python -m tumor_xai.ood --data DIR --weights DIR``
refits them for an existing weights folder; ``benchmarks/ood.py`` measures the flag on the official
Testing split, on a set of real non-brain medical images and, when given, on folders of head CT and
of brain MRI from other collections.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tumor_xai import inference
from tumor_xai.augment import AugmentConfig, augment
from tumor_xai.decode import DecodedImage
from tumor_xai.preprocess import PreprocessConfig

__all__ = [
    "HEAD_BODY_PARTS",
    "MAX_ASPECT_RATIO",
    "MAX_COLORFULNESS",
    "MIN_INTENSITY_RANGE",
    "MIN_SIDE",
    "PERCENTILE",
    "OodDetector",
    "augmented_copies",
    "cheap_checks",
    "check",
    "extract_features",
    "feature_vector",
    "fit",
    "fit_model",
    "head_shape",
    "header_check",
    "layout_statistics",
    "skull_ring",
    "skull_ring_reason",
    "training_recipe",
]

logger = logging.getLogger(__name__)

PERCENTILE = 99.8  # the feature threshold: this percentile of the validation carve-out's distances

# Thresholds of the cheap checks. On the 1311 official Testing slices, colourfulness (mean RGB
# max-min, in [0, 1]) peaks at 0.022 (JPEG chroma noise) and the 1st-99th percentile intensity range
# never falls below 0.33; the dataset's slices are square.
MAX_COLORFULNESS = 0.06
MIN_INTENSITY_RANGE = 0.05
MAX_ASPECT_RATIO = 2.0
MIN_SIDE = 32

# DICOM codes (as ``tumor_xai.dicom`` writes them into ``DecodedImage.info``) that fit a brain MRI.
# OT and SC (secondary captures) say nothing about what was scanned; "other" is an unrecognised code.
NEUTRAL_MODALITIES = frozenset({"MR", "OT", "SC", "other"})
HEAD_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "HEADNECK", "SELLA", "IAC", "other"})
_MODALITY_NAMES = {
    "CT": "a CT image",
    "US": "an ultrasound image",
    "CR": "a radiograph",
    "DX": "a radiograph",
    "MG": "a mammogram",
    "NM": "a nuclear-medicine image",
    "PT": "a PET image",
    "XA": "an X-ray angiogram",
    "RF": "a fluoroscopy image",
    "SEG": "a segmentation",
    "RTDOSE": "a radiotherapy dose map",
    "RTIMAGE": "a radiotherapy portal image",
}

METHOD = "mahalanobis-layout"
FEATURES = "layer1 channel means on a 3 x 3 grid"
LAYOUT_STAGE = 1  # layer1
LAYOUT_GRID = 3
# Statistics of earlier releases: the pooled last block, then every stage's channel spreads with it.
OLDER_METHODS = frozenset({"mahalanobis", "mahalanobis-layer-statistics"})
COVARIANCES = ("class", "single")
EXTRA_MEANS = "ood.means"
EXTRA_PRECISION = "ood.precision"

# Head-shape statistics: name -> what a low value means, for the reason.
SHAPE_STATS = {
    "head_area": "the bright region (the head) covers only {v:.0%} of the image; training slices: at least {t:.0%}",
    "single_region": "the bright pixels are spread over several regions (the largest holds {v:.0%}; "
    "training slices: at least {t:.0%})",
    "ellipse_fit": "the bright region is not head-shaped (overlap with its fitted ellipse {v:.2f}; "
    "training slices: at least {t:.2f})",
    "texture": "the bright region has too few grey levels for an MRI slice (entropy {v:.1f} bits; "
    "training slices: at least {t:.1f}): a drawing, phantom or mask?",
}


def header_check(image: DecodedImage) -> str | None:
    """A reason from the DICOM header (modality, body part) why ``image`` is no brain MRI, or ``None``."""
    modality = image.info.get("Modality")
    if modality is not None and modality not in NEUTRAL_MODALITIES:
        what = _MODALITY_NAMES.get(modality, f"a {modality} image")
        return f"the DICOM header says this is {what} (Modality {modality}); the model reads brain MRI slices"
    part = image.info.get("BodyPartExamined")
    if part is not None and part not in HEAD_BODY_PARTS:
        return f"the DICOM header says the body part is {part}; the model reads brain MRI slices"
    return None


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


# The bone-ring test (:func:`skull_ring`). Fixed by what CT and MRI show, in units of the head (its radius
# along each ray, its brightest 0.5 %), not fitted to any image set; a slice is CT-like when its median
# ray meets all three.
RING_RAYS = 90
RING_DEPTH = 0.3  # rays are read from the outline inwards, over the outer 30 % of the radius
RING_BRIGHT = 0.9  # the band is the brightest structure: >= 90 % of the head's 99.5th percentile
RING_THICK = 0.05  # and thick: >= 5 % of the radius (a skull; MRI's scalp fat is a thin line before dark bone)
RING_NO_DARK_LAYER = 0.6  # and no darker layer than 60 % of the brain's level lies between it and the brain
_RING_T = np.linspace(0.0, RING_DEPTH, 61)


def _filled(region: np.ndarray) -> np.ndarray:
    """The uint8 mask ``region`` with everything inside its outermost outline filled in."""
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(region)
    cv2.drawContours(filled, [max(contours, key=cv2.contourArea)], -1, 1, thickness=-1)
    return filled


def _head_region(square: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple] | None:
    """(foreground, largest region, that region filled) as uint8 masks of ``square``, and the foreground's
    connected components (labels, stats) they come from; None when empty."""
    blurred = cv2.GaussianBlur(square, (5, 5), 0)
    mask = (blurred > 0.1 * float(np.percentile(blurred, 99))).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    largest = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    return mask, largest, _filled(largest), (labels, stats)


def skull_ring(square: np.ndarray) -> dict[str, float] | None:
    """The bone-ring statistics of the uint8 square ``(S, S)`` the model sees; None when there is no head.

    Each of :data:`RING_RAYS` rays runs from the head's centroid to its outline and is read over its outer
    :data:`RING_DEPTH` (inwards), in units of the head's 99.5th-percentile intensity. Per ray: ``bright``,
    the peak within the outer half of that depth; ``thick``, the width (share of the radius) of the run
    around the peak above the midpoint between peak and brain; ``dark_layer``, the darkest point inside
    the peak over the brain's level (the median of the ray's inner sixth). Returned: each one's median over
    the rays.
    """
    region = _head_region(square)
    if region is None or region[2].sum() < 0.02 * square.size:
        return None
    filled = region[2]
    ys, xs = np.nonzero(filled)
    cy, cx = float(ys.mean()), float(xs.mean())
    angles = np.linspace(0.0, 2 * np.pi, RING_RAYS, endpoint=False)
    dy, dx = np.sin(angles)[:, None], np.cos(angles)[:, None]
    steps = np.arange(0.0, 1.5 * square.shape[0], 0.5)[None, :]
    inside = cv2.remap(filled, (cx + steps * dx).astype(np.float32), (cy + steps * dy).astype(np.float32),
                       cv2.INTER_NEAREST, borderValue=0)  # fmt: skip
    last = inside.shape[1] - 1 - np.argmax(inside[:, ::-1] > 0, axis=1)
    radius = np.where(inside.any(axis=1), steps[0, last], 0.0)[:, None]
    r = radius * (1.0 - _RING_T[None, :])
    top = max(float(np.percentile(square[filled > 0], 99.5)), 1.0)
    rays = cv2.remap(square.astype(np.float32), (cx + r * dx).astype(np.float32), (cy + r * dy).astype(np.float32),
                     cv2.INTER_LINEAR) / top  # fmt: skip
    outer = _RING_T <= RING_DEPTH / 2
    peak_at = np.argmax(rays[:, outer], axis=1)
    peak = rays[np.arange(len(rays)), peak_at]
    brain = np.median(rays[:, _RING_T >= RING_DEPTH * 5 / 6], axis=1)
    level = ((peak + brain) / 2)[:, None]
    idx = np.arange(len(_RING_T))[None, :]
    below = rays < level
    # the run above ``level`` around the peak: from the last dip before it to the first dip after it
    start = np.where(below & (idx < peak_at[:, None]), idx, -1).max(axis=1) + 1
    stop = np.where(below & (idx > peak_at[:, None]), idx, len(_RING_T)).min(axis=1) - 1
    thick = _RING_T[stop] - _RING_T[start]
    darkest = np.where(idx >= peak_at[:, None], rays, np.inf).min(axis=1)
    dark_layer = darkest / np.maximum(brain, 1e-3)
    return {
        "bright": float(np.median(peak)),
        "thick": float(np.median(thick)),
        "dark_layer": float(np.median(dark_layer)),
    }


def skull_ring_reason(square: np.ndarray) -> str | None:
    """Why the uint8 model square ``square`` looks like a head CT rather than an MRI slice, or ``None``."""
    ring = skull_ring(square)
    if ring is None:
        return None
    if ring["bright"] >= RING_BRIGHT and ring["thick"] >= RING_THICK and ring["dark_layer"] >= RING_NO_DARK_LAYER:
        return (
            "this looks like a CT slice, not an MRI slice: the brightest structure is a thick ring around the head "
            "(bone, as CT shows it) with the brain directly inside it, while in MRI the skull is dark"
        )
    return None


ENCLOSING_CANDIDATES = 3


def _enclosed_share(mask: np.ndarray, labels: np.ndarray, stats: np.ndarray, filled: np.ndarray) -> float:
    """The largest share of ``mask``'s pixels inside the outline of one of its few largest regions
    (``filled``: the largest one's, already drawn)."""
    best = float((mask & filled).sum() / mask.sum())
    for i in 1 + np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][1:ENCLOSING_CANDIDATES]:
        best = max(best, float((mask & _filled((labels == i).astype(np.uint8))).sum() / mask.sum()))
    return best


def head_shape(square: np.ndarray) -> dict[str, float]:
    """Model-free statistics of the uint8 square ``(S, S)`` the model sees; low values are unlike a head.

    The foreground is what is brighter than a tenth of the 99th percentile (after a light blur);
    ``head_area`` is the filled area of its largest connected region over the square's, and
    ``single_region`` the largest share of all foreground that one of the :data:`ENCLOSING_CANDIDATES`
    largest regions holds inside its outline (in MRI the scalp's fat is a bright ring, apart from the brain
    across the dark bone: the ring and the brain it encloses are one head); ``ellipse_fit`` the overlap (IoU) of the
    filled region with its fitted ellipse; ``texture`` the entropy (bits) of a 64-bin grey-level
    histogram inside the region.
    """
    region = _head_region(square)
    if region is None:
        return dict.fromkeys(SHAPE_STATS, 0.0)
    mask, largest, filled, (labels, stats) = region
    contours, _ = cv2.findContours(filled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=cv2.contourArea)
    ellipse_fit = 0.0
    if len(outline) >= 5:
        ellipse = np.zeros_like(largest)
        cv2.ellipse(ellipse, cv2.fitEllipse(outline), 1, thickness=-1)
        ellipse_fit = float((ellipse & filled).sum() / max(int((ellipse | filled).sum()), 1))
    hist = np.bincount(square[filled > 0] // 4, minlength=64).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return {
        "head_area": float(filled.sum() / square.size),
        "single_region": _enclosed_share(mask, labels, stats, filled),
        "ellipse_fit": ellipse_fit,
        "texture": float(-(p * np.log2(p)).sum()),
    }


def layout_statistics(stage: int, fmap: torch.Tensor) -> torch.Tensor | None:
    """The OOD features of one stage's map ``(N, C, h, w)``: for layer1, each channel's mean over a
    3 x 3 grid of the square, ``(N, C * 9)``; the other stages give none. Pass it as
    :func:`tumor_xai.inference.forward`'s ``stage_stats``."""
    if stage != LAYOUT_STAGE:
        return None
    return F.adaptive_avg_pool2d(fmap.float(), LAYOUT_GRID).flatten(1)


def feature_vector(out: inference.Forward) -> torch.Tensor:
    """The OOD feature vector ``(N, D)`` of a :func:`tumor_xai.inference.forward` run with
    ``stage_stats=layout_statistics``."""
    if out.stage_stats is None:
        raise ValueError("the forward pass ran without stage_stats=layout_statistics")
    return out.stage_stats


def extract_features(model: nn.Module, images, cfg: PreprocessConfig, batch_size: int = 64) -> torch.Tensor:
    """:func:`feature_vector` ``(N, D)`` of uint8 squares ``(N, S, S)`` or ``(N, 1, S, S)`` (array or tensor)."""
    return feature_vector(inference.forward(model, images, cfg, batch_size, stage_stats=layout_statistics))


def _squared_distances(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of each row of ``features`` to its nearest mean."""
    diff = features[:, None, :] - means[None, :, :]  # (N, K, C)
    return torch.einsum("nkc,cd,nkd->nk", diff, precision, diff).min(dim=1).values


def _shrunk_precision(centred: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The inverse of the Ledoit-Wolf-shrunk covariance of ``centred`` rows, and the shrinkage."""
    from sklearn.covariance import ledoit_wolf_shrinkage  # fitting only; keeps scikit-learn out of app start-up

    shrinkage = float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True))
    cov = centred.T @ centred / len(centred)
    target = torch.trace(cov) / cov.shape[0]
    cov = (1.0 - shrinkage) * cov + shrinkage * target * torch.eye(cov.shape[0], dtype=cov.dtype)
    precision = torch.linalg.inv(cov)
    return (precision + precision.T) / 2, shrinkage  # exact symmetry after inversion


def fit(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    covariance: str = "class",
    percentile: float = PERCENTILE,
    *,
    shape_stats: list[dict[str, float]] | None = None,
    shape_percentile: float = 0.1,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit the Mahalanobis statistics (and the head-shape limits); returns (``extras``, JSON-able ``metadata["ood"]``).

    ``covariance="class"`` uses one mean per class and their shared covariance; ``"single"`` one
    Gaussian over all training features. The threshold is the ``percentile`` of the validation
    slices' distances. ``shape_stats`` (:func:`head_shape` of the training images) set each shape
    limit at their ``shape_percentile``; without them no shape check is stored.
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
    precision, shrinkage = _shrunk_precision(centred)
    val = _squared_distances(val_features.detach().double().cpu(), means, precision).clamp_min(0).sqrt()
    threshold = float(np.percentile(val.numpy(), percentile))
    train = _squared_distances(x, means, precision).clamp_min(0).sqrt()
    meta = {
        "method": METHOD,
        "covariance": covariance,
        "feature": FEATURES,
        "dimensions": int(x.shape[1]),
        "shrinkage": shrinkage,
        "percentile": percentile,
        "threshold": threshold,
        "num_train": len(x),
        "num_val": len(val),
        "val_distance_median": float(val.median()),
        "train_distance_median": float(train.median()),
        "shape": None,
    }
    if shape_stats:
        meta["shape"] = {
            "percentile": shape_percentile,
            "n": len(shape_stats),
            "limits": {k: float(np.percentile([s[k] for s in shape_stats], shape_percentile)) for k in SHAPE_STATS},
        }
    extras = {EXTRA_MEANS: means.float(), EXTRA_PRECISION: precision.float()}
    logger.info("OOD fit: %s covariance, shrinkage %.3f, threshold %.2f", covariance, shrinkage, threshold)
    return extras, meta


def fit_model(
    model: nn.Module,
    images,
    labels,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: PreprocessConfig,
    batch_size: int = 64,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    **kwargs,
) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`fit` from a model and its Training squares (uint8 ``(N, S, S)`` or ``(N, 1, S, S)``, array or
    tensor on any device): feature statistics of the training and validation indices, head shapes of all.
    Without a validation carve-out the threshold comes from the training images (and says so in the log).

    With ``augment`` (the recipe the network was trained with), every image also enters once as an
    augmented copy, drawn with ``seed``: the statistics then describe what training taught the network to
    read (other framings, contrasts, resolutions, noise), not only the Training split's own look, so brain
    MRI from another collection is not refused for looking unlike that one collection. The threshold is
    the percentile over the validation slices and their copies."""
    feats = extract_features(model, images, cfg, batch_size)
    y = torch.as_tensor(labels).cpu()
    if len(val_idx) == 0:
        logger.warning("no validation carve-out: the OOD threshold is a percentile of training distances")
        val_idx = train_idx
    squares = np.asarray(torch.as_tensor(images).reshape(len(images), *images.shape[-2:]).cpu())
    shapes = [head_shape(sq) for sq in squares]
    train_x, train_y, val_x = feats[train_idx], y[train_idx], feats[val_idx]
    if augment is not None:
        copies = extract_features(model, augmented_copies(squares, augment, seed), cfg, batch_size)
        train_x, train_y = torch.cat([train_x, copies[train_idx]]), torch.cat([train_y, train_y])
        val_x = torch.cat([val_x, copies[val_idx]])
    extras, meta = fit(train_x, train_y, val_x, shape_stats=shapes, **kwargs)
    meta["augmented_copies"] = augment is not None
    return extras, meta


def augmented_copies(squares: np.ndarray, recipe: AugmentConfig, seed: int = 0, chunk: int = 256) -> np.ndarray:
    """One augmented uint8 copy ``(N, S, S)`` of each uint8 square, drawn with ``recipe`` and ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = np.empty_like(squares)
    for start in range(0, len(squares), chunk):
        batch = torch.from_numpy(squares[start : start + chunk]).unsqueeze(1)
        out[start : start + chunk] = augment(batch, recipe, g).mul_(255.0).round_().clamp_(0, 255).byte()[:, 0].numpy()
    return out


def training_recipe(metadata: dict) -> AugmentConfig | None:
    """The augmentation the weights were trained with (their ``training.augment``), or ``None``."""
    recipe = (metadata.get("training") or {}).get("augment")
    if not recipe:
        return None
    known = {f.name for f in fields(AugmentConfig)}
    return AugmentConfig(**{k: float(v) for k, v in recipe.items() if k in known})


@dataclass
class OodDetector:
    """The fitted statistics; build it with :meth:`from_weights`, ask it with :func:`check`."""

    means: torch.Tensor  # (K, D)
    precision: torch.Tensor  # (D, D)
    threshold: float
    shape_limits: dict[str, float] | None = None

    @classmethod
    def from_weights(cls, extras: dict[str, torch.Tensor], metadata: dict) -> OodDetector | None:
        """The detector stored with a weights folder, or ``None`` when the folder has no (current) OOD statistics."""
        ood = metadata.get("ood")
        if not ood:
            return None
        if ood.get("method") in OLDER_METHODS:
            logger.warning(
                "the weights' OOD statistics are of an older kind and are not used; refit them with "
                "`python -m tumor_xai.ood --data DIR --weights DIR`"
            )
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
        limits = (ood.get("shape") or {}).get("limits")
        return cls(extras[EXTRA_MEANS].double(), extras[EXTRA_PRECISION].double(), float(ood["threshold"]), limits)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance ``(N,)`` of feature statistics ``(N, D)`` to the nearest training class."""
        return _squared_distances(features.detach().double(), self.means, self.precision).clamp_min(0).sqrt()

    def reason(self, distance: float) -> str | None:
        """Why a slice at ``distance`` is out of distribution, or ``None`` when it is within the threshold."""
        if distance <= self.threshold:
            return None
        return (
            f"the image does not look like the brain MRI slices the model was trained on "
            f"(feature distance {distance:.1f} > threshold {self.threshold:.1f})"
        )

    def shape_reason(self, stats: dict[str, float]) -> str | None:
        """Why the :func:`head_shape` ``stats`` are unlike a head on a dark background, or ``None``."""
        for name, limit in (self.shape_limits or {}).items():
            if stats[name] < limit:
                return SHAPE_STATS[name].format(v=stats[name], t=limit)
        return None


def check(
    image: DecodedImage, square: np.ndarray, detector: OodDetector | None, features: torch.Tensor | None
) -> str | None:
    """Why ``image`` is not a brain MRI slice like the training data, or ``None``: the header, the cheap
    checks, the bone ring of ``square`` (its uint8 model-input square), then (with a fitted detector) its
    head shape and the distance of ``features`` (its :func:`feature_vector`, ``(D,)`` or ``(1, D)``);
    first reason wins."""
    reason = header_check(image) or cheap_checks(image) or skull_ring_reason(square)
    if reason is not None or detector is None:
        return reason
    reason = detector.shape_reason(head_shape(square))
    if reason is not None:
        return reason
    return detector.reason(detector.distance(features.reshape(1, -1))[0].item())


@dataclass
class CarveOut:
    """The decoded Training split and the train / validation indices the weights were fitted with."""

    images: np.ndarray  # uint8 (N, S, S)
    labels: torch.Tensor
    train_idx: np.ndarray
    val_idx: np.ndarray
    fraction: float
    seed: int
    from_weights: bool  # whether fraction and seed came from the weights' training config


def carve_out(weights, data: Path) -> CarveOut:
    """Decode ``data``'s Training split and split it as the weights' training did (else a seeded 10 %)."""
    from tumor_xai.data import carve_out_seed, decode_samples, discover, split_train_val

    dataset = discover(data, splits=("Training",))
    training = weights.metadata.get("training") or {}
    fraction = float(training.get("val_fraction", 0.1))
    seed = carve_out_seed(training)
    split = decode_samples(dataset.splits["Training"], weights.preprocess, skip_unreadable=True)
    train_idx, val_idx = split_train_val(split.labels, split.thumbs, fraction, seed)
    return CarveOut(
        split.images, torch.from_numpy(split.labels), train_idx, val_idx, fraction, seed, "val_fraction" in training
    )


def refit_statistics(
    weights, c: CarveOut, batch_size: int = 64, model: nn.Module | None = None, augmented: bool = True, **kwargs
) -> tuple[dict[str, torch.Tensor], dict]:
    """The OOD statistics of ``weights``' network (or ``model``, a refit of it) fitted on its carve-out ``c``,
    with one copy of each slice augmented as the weights were trained (``augmented``); returns all of the
    weights' extras, the OOD ones replaced, and the ``ood`` metadata. ``kwargs`` go to :func:`fit`."""
    fitted, meta = fit_model(
        weights.model if model is None else model, c.images, c.labels, c.train_idx, c.val_idx, weights.preprocess,
        batch_size, augment=training_recipe(weights.metadata) if augmented else None,
        seed=int((weights.metadata.get("training") or {}).get("seed", 0)), **kwargs,
    )  # fmt: skip
    kept = {k: v for k, v in weights.extras.items() if not k.startswith("ood.")}
    return {**kept, **fitted}, meta


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
    c = carve_out(weights, args.data)
    if len(c.val_idx) == 0:
        print("error: the validation carve-out is empty; pass a fraction above 0", file=sys.stderr)
        return 2
    source = "the weights' training config" if c.from_weights else "the default"
    print(f"validation carve-out: {len(c.val_idx)} images ({c.fraction:.0%}, seed {c.seed}, from {source})")
    extras, meta = refit_statistics(
        weights,
        c,
        args.batch_size,
        augmented=not args.no_augment,
        covariance=args.covariance,
        percentile=args.percentile,
    )
    metadata = {
        k: v
        for k, v in weights.metadata.items()
        if k not in ("format_version", "num_classes", "weights_sha256", "storage_dtype")
    }
    metadata["ood"] = meta
    half = weights.metadata.get("storage_dtype") == "float16"
    save_weights(weights.model, weights.path, metadata, extras=extras, half=half)
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
    parser.add_argument("--percentile", type=float, default=PERCENTILE, help="validation percentile used as threshold")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="fit on the Training split as it is, without an augmented copy of each slice (drawn with the "
        "weights' training recipe)",
    )
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
