"""Evaluation CLI: official Testing split, its duplicate-free subset, stress tests and heatmap localisation.

    python -m tumor_xai.evaluate --data DIR [--weights DIR] --out DIR [--localization] [--masks DIR]
        [--methods gradcam,...] [--layers layer4,layer3] [--no-stress] [--batch-size N] [--record]

Writes into ``--out``: ``metrics.json``, ``confusion_matrix.json`` and ``.png``, ``reliability.png``,
``roc.png``, ``report.md`` and the run's ``config.json``.

Inference goes through the same path as :class:`tumor_xai.predictor.Predictor`: every image is
decoded once by :func:`tumor_xai.data.decode_samples` (the :func:`~tumor_xai.preprocess.fit_square`
output, stored as uint8), then :func:`~tumor_xai.preprocess.normalize`, the model and the softmax at
the weights' temperature run in batches. Stress corruptions act on the decoded grayscale image
before ``fit_square``, as a corrupted upload would. The duplicate-free subset drops every Testing
image that re-encodes a Training image (:func:`tumor_xai.duplicates.near_duplicate_pairs`).

Localisation (``--localization``) explains, for each method and layer, the TRUE class of every
Testing image that has an expert tumour mask, and also the PREDICTED class (recomputed only for the
misclassified images, the rest are the same maps). Each heatmap is mapped back onto the image's
pixels (:meth:`~tumor_xai.preprocess.Geometry.to_original`, a plain resize for square images) and
scored against the mask: the pointing game (is the heatmap's peak within 8 px, at 224 px, of the
mask?) and the share of heatmap mass inside the mask, each beside what a uniform heatmap would score.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from tumor_xai import inference
from tumor_xai.checkpoint import LoadedWeights, WeightsError, load_weights, update_metadata
from tumor_xai.data import (
    DataError,
    DecodedSplit,
    KaggleDataset,
    Sample,
    decode_samples,
    discover,
    read_mask,
    read_mask_table,
)
from tumor_xai.decode import load_image
from tumor_xai.duplicates import DEFAULT_THRESHOLD, near_duplicate_pairs
from tumor_xai.metrics import classification_metrics, reliability_bins
from tumor_xai.preprocess import Geometry, fit_square, to_square_u8
from tumor_xai.stress import CORRUPTIONS, corrupt

__all__ = [
    "POINTING_TOLERANCE_PX",
    "EvaluateConfig",
    "LocalizationScore",
    "UsageError",
    "duplicate_free",
    "evaluate",
    "load_masks",
    "localization",
    "main",
    "predict_corrupted",
    "predict_probabilities",
    "score_heatmap",
]

logger = logging.getLogger(__name__)

# The pointing game's tolerance, in pixels of a 224 px image (scaled for other mask sizes).
POINTING_TOLERANCE_PX = 8.0
POINTING_REFERENCE_SIZE = 224
DEFAULT_LAYERS = ("layer4", "layer3")
DEDUP_METHOD = (
    "Testing images whose 32x32 thumbnail differs from some Training image's by less than {t} grey levels "
    "on average (tumor_xai.duplicates.near_duplicate_pairs) are removed"
)


@dataclass
class EvaluateConfig:
    """Everything one evaluation run depends on; mirrored by the CLI and saved as ``config.json``."""

    data: Path
    out: Path
    weights: Path | None = None
    localization: bool = False
    masks: Path | None = None
    methods: tuple[str, ...] | None = None  # None: every method in tumor_xai.explain.METHODS
    layers: tuple[str, ...] = DEFAULT_LAYERS
    stress: bool = True
    batch_size: int = 32
    workers: int = 4
    duplicate_threshold: float = DEFAULT_THRESHOLD
    skip_unreadable: bool = False
    record: bool = False
    device: str = "cpu"
    external: tuple[Path, ...] = ()  # labelled folders from other collections (tumor_xai.external)

    def command(self) -> str:
        """The command line that runs this evaluation (what the model card quotes beside its figures)."""
        words = ["python -m tumor_xai.evaluate", f"--data {self.data}", f"--out {self.out}"]
        if self.weights is not None:
            words.append(f"--weights {self.weights}")
        if self.localization:
            words.append("--localization" + (f" --masks {self.masks}" if self.masks else ""))
            if self.methods:
                words.append("--methods " + ",".join(self.methods))
            if tuple(self.layers) != DEFAULT_LAYERS:
                words.append("--layers " + ",".join(self.layers))
        if not self.stress:
            words.append("--no-stress")
        words.extend(f"--external {d}" for d in self.external)
        if self.record:
            words.append("--record")
        return " ".join(words)

    def to_dict(self) -> dict:
        d = asdict(self)

        def plain(v):
            return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, tuple) else v

        return {k: plain(v) for k, v in d.items()}


class UsageError(ValueError):
    """The command line asks for something that cannot be done (unknown method or layer, no masks)."""


# --------------------------------------------------------------------------------------------- inference


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def predict_probabilities(weights: LoadedWeights, squares: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Calibrated class probabilities ``(N, K)`` for fit_square outputs ``(N, S, S)`` uint8, in batches.

    The same forward (:func:`tumor_xai.inference.forward`) and temperature as the Predictor.
    """
    logits = inference.forward(weights.model, squares, weights.preprocess, batch_size).logits
    return weights.decision.probabilities(logits).numpy()


def predict_corrupted(
    weights: LoadedWeights, samples: list[Sample], corruption: str, batch_size: int = 32, workers: int = 4
) -> np.ndarray:
    """Probabilities for ``samples`` after the named corruption: decode -> corrupt -> fit_square -> model.

    The corruption's seed is the sample's index, so a run is reproducible and images get different noise.
    """

    def square(i: int) -> np.ndarray:
        gray = corrupt(corruption, load_image(samples[i].path).gray, seed=i)
        return to_square_u8(gray, weights.preprocess)[0]

    out = []
    with ThreadPoolExecutor(workers) as pool:
        for sl in tqdm(list(_batches(len(samples), batch_size)), desc=corruption, leave=False):
            squares = np.stack(list(pool.map(square, range(sl.start, sl.stop))))
            out.append(predict_probabilities(weights, squares, batch_size))
    return np.concatenate(out)


def duplicate_free(
    test_thumbs: np.ndarray, train_thumbs: np.ndarray, threshold: float = DEFAULT_THRESHOLD
) -> np.ndarray:
    """Boolean mask over the Testing images: True where no Training image is a near-duplicate."""
    keep = np.ones(len(test_thumbs), dtype=bool)
    for i, _, _ in near_duplicate_pairs(test_thumbs, train_thumbs, threshold=threshold):
        keep[i] = False
    return keep


# ------------------------------------------------------------------------------------------ localisation


@dataclass(frozen=True)
class LocalizationScore:
    """How one heatmap sits on one mask, beside what a uniform heatmap would score on that mask."""

    hit: float  # pointing game: share of the heatmap's peak pixels within the tolerance (1 or 0 unless tied)
    mass: float  # share of the heatmap's total inside the mask
    hit_baseline: float  # share of all pixels within the tolerance of the mask
    mass_baseline: float  # share of all pixels inside the mask (the mask's area fraction)
    empty: bool  # the heatmap was all zeros, scored as uniform


def score_heatmap(heatmap: np.ndarray, mask: np.ndarray, tolerance: float | None = None) -> LocalizationScore:
    """Score ``heatmap`` (H x W, >= 0) against a boolean tumour ``mask`` of the same shape.

    Pointing game: the peak hits when it lies within ``tolerance`` px of a mask pixel (Euclidean
    distance transform of the mask; default 8 px scaled to the mask's size relative to 224 px). When
    several pixels share the maximum the hit is the share of them that lie within the tolerance, the
    expected hit of picking one at random, so a flat map scores the uniform baseline rather than
    whatever pixel happens to come first. An all-zero heatmap is scored as uniform and flagged ``empty``.
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if heatmap.shape != mask.shape:
        raise ValueError(f"heatmap shape {heatmap.shape} differs from the mask's {mask.shape}")
    if not mask.any():
        raise ValueError("the mask is empty")
    if tolerance is None:
        tolerance = POINTING_TOLERANCE_PX * max(mask.shape) / POINTING_REFERENCE_SIZE
    # Distance from every pixel to the nearest mask pixel (0 on the mask).
    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    near = dist <= tolerance
    total = heatmap.sum()
    empty = not total > 0
    if empty:
        heatmap = np.ones_like(heatmap)
        total = heatmap.sum()
    peak = heatmap == heatmap.max()
    return LocalizationScore(
        hit=float(near[peak].mean()),
        mass=float(heatmap[mask].sum() / total),
        hit_baseline=float(near.mean()),
        mass_baseline=float(mask.mean()),
        empty=empty,
    )


def load_masks(masks_dir: Path, dataset: KaggleDataset, split: str = "Testing") -> dict[int, np.ndarray]:
    """Boolean masks keyed by the index of their image in ``dataset.splits[split]``, from ``masks.csv``."""
    table = read_mask_table(masks_dir)
    index = {s.path.relative_to(dataset.root).as_posix(): i for i, s in enumerate(dataset.splits[split])}
    return {index[image]: read_mask(path) for image, path in table.items() if image in index}


def _heatmaps(
    weights: LoadedWeights,
    squares: np.ndarray,
    geometries: list[Geometry],
    targets: np.ndarray,
    method: str,
    layer: str,
    batch_size: int,
) -> list[np.ndarray]:
    """Heatmaps of ``targets`` on uint8 ``squares``, each mapped back onto its image's pixels."""
    from tumor_xai.explain import explain_batch  # heavy (pytorch-grad-cam); only needed here

    device = next(weights.model.parameters()).device
    maps: list[np.ndarray] = []
    for sl in tqdm(list(_batches(len(squares), batch_size)), desc=f"{method}@{layer}", leave=False):
        x = inference.to_input(squares[sl], weights.preprocess).to(device)
        heat = explain_batch(weights.model, x, torch.from_numpy(targets[sl]), method=method, layer=layer)
        maps.extend(g.to_original(m) for g, m in zip(geometries[sl], heat, strict=True))
    return maps


def _mean_scores(scores: list[LocalizationScore]) -> dict:
    return {
        "pointing": float(np.mean([s.hit for s in scores])),
        "mass_in_mask": float(np.mean([s.mass for s in scores])),
        "empty_heatmaps": int(sum(s.empty for s in scores)),
    }


def localization(
    weights: LoadedWeights,
    dataset: KaggleDataset,
    test: DecodedSplit,
    predictions: np.ndarray,
    masks: dict[int, np.ndarray],
    methods: tuple[str, ...],
    layers: tuple[str, ...] = DEFAULT_LAYERS,
    batch_size: int = 16,
) -> dict:
    """Pointing game and mass-in-mask for each method and layer, explaining the true and the predicted class.

    ``test`` must hold the Testing split in ``dataset`` order (no skipped files); ``predictions``
    are the argmax classes on it. Images whose mask does not match their own size are an error.
    """
    if len(test.paths) != len(dataset.splits["Testing"]):
        raise DataError("localisation needs every Testing image decoded: fix or remove the unreadable files.")
    idx = np.array(sorted(masks), dtype=np.int64)
    if idx.size == 0:
        raise DataError("None of the Testing images has a mask: check --masks.")
    labels, preds, wanted = test.labels[idx], predictions[idx], [masks[i] for i in idx]
    wrong = np.flatnonzero(preds != labels)  # the predicted class's maps differ only for these
    size = weights.preprocess.input_size
    geometries = [fit_square(np.zeros(m.shape, np.float32), size)[1] for m in wanted]
    baseline = [score_heatmap(np.zeros(m.shape), m) for m in wanted]
    out: dict = {
        "n_images": int(idx.size),
        "n_misclassified": int(wrong.size),
        "pointing_tolerance_px_at_224": POINTING_TOLERANCE_PX,
        "baseline": {
            "pointing": float(np.mean([b.hit_baseline for b in baseline])),
            "mass_in_mask": float(np.mean([b.mass_baseline for b in baseline])),
        },
        "results": [],
    }
    for method in methods:
        for layer in layers:
            start = time.perf_counter()
            maps = _heatmaps(weights, test.images[idx], geometries, labels, method, layer, batch_size)
            true_scores = [score_heatmap(m, mask) for m, mask in zip(maps, wanted, strict=True)]
            pred_scores = list(true_scores)
            wrong_geometries = [geometries[r] for r in wrong]
            wrong_maps = _heatmaps(
                weights, test.images[idx[wrong]], wrong_geometries, preds[wrong], method, layer, batch_size
            )
            for r, m in zip(wrong, wrong_maps, strict=True):
                pred_scores[r] = score_heatmap(m, wanted[r])
            row = {"method": method, "layer": layer, "seconds": round(time.perf_counter() - start, 1)}
            row.update(true=_mean_scores(true_scores), predicted=_mean_scores(pred_scores))
            true = row["true"]
            logger.info(
                "%s@%s: pointing %.3f, mass %.3f (true class)", method, layer, true["pointing"], true["mass_in_mask"]
            )
            out["results"].append(row)
    return out


# ----------------------------------------------------------------------------------------------- figures


def _plot_confusion(cm: np.ndarray, class_names: list[str], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    for (r, c), v in np.ndenumerate(cm):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_reliability(probs: np.ndarray, labels: np.ndarray, ece: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    bins = reliability_bins(probs, labels)
    edges = np.array(bins["edges"])
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    acc = [a if a is not None else 0.0 for a in bins["accuracy"]]
    conf = [c if c is not None else 0.0 for c in bins["confidence"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centers, acc, width=width, edgecolor="black", label="accuracy")
    ax.bar(
        centers,
        np.array(conf) - np.array(acc),
        bottom=acc,
        width=width,
        color="red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("top-class confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (official Testing), ECE {ece:.3f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_roc(probs: np.ndarray, labels: np.ndarray, class_names: list[str], aucs: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for k, name in enumerate(class_names):
        y = labels == k
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {aucs[name]:.4f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("One-vs-rest ROC (official Testing)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ report


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _num(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _report_sets(metrics: dict) -> list[str]:
    w, cls = metrics["weights"], metrics["class_names"]
    sets = [("Official Testing", metrics["official"]), ("Duplicate-free subset", metrics["deduplicated"])]
    lines = [
        "# Evaluation report",
        "",
        f"Weights `{w['path']}` ({w['arch']}, {w['input_size']} px, trained on {w.get('training_device') or 'unknown device'}); "
        f"temperature {w['temperature']:.4f}, screening threshold {_num(w['threshold'])}. Data `{metrics['data']['root']}`.",
        "",
        f"Duplicate-free subset: {metrics['deduplicated']['removed']} of {metrics['official']['n']} Testing images removed "
        f"({metrics['deduplicated']['method']}); {metrics['deduplicated']['n']} kept.",
        "",
        "| set | n | accuracy | macro F1 | tumour sens. (argmax) | tumour spec. (argmax) | tumour sens. (threshold) | tumour spec. (threshold) | macro ROC-AUC | ECE | NLL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in sets:
        t = m.get("tumor", {})
        a, th = t.get("argmax", {}), t.get("threshold", {})
        lines.append(
            f"| {name} | {m['n']} | {_pct(m['accuracy'])} | {_num(m['macro_f1'])} | {_pct(a.get('sensitivity'))} | "
            f"{_pct(a.get('specificity'))} | {_pct(th.get('sensitivity'))} | {_pct(th.get('specificity'))} | "
            f"{_num(m['roc_auc']['macro'])} | {_num(m['ece'])} | {_num(m['nll'])} |"
        )
    lines += [
        "",
        "Per class (precision / recall / F1, support):",
        "",
        "| class | " + " | ".join(n for n, _ in sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    for c in cls:
        cells = []
        for _, m in sets:
            p = m["per_class"][c]
            cells.append(f"{p['precision']:.4f} / {p['recall']:.4f} / {p['f1']:.4f} ({p['support']})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _report_stress(stress: dict, clean: dict) -> list[str]:
    lines = [
        "",
        "Stress tests on the official Testing split (corruption applied to the decoded image before preprocessing):",
        "",
        "| corruption | accuracy | change | tumour sens. (argmax) | tumour sens. (threshold) |",
        "|---|---|---|---|---|",
    ]
    for name, m in stress.items():
        lines.append(
            f"| {name} | {_pct(m['accuracy'])} | {100 * (m['accuracy'] - clean['accuracy']):+.2f} pt | "
            f"{_pct(m['tumor_sensitivity_argmax'])} | {_pct(m['tumor_sensitivity_threshold'])} |"
        )
    return lines


def _report_localization(loc: dict) -> list[str]:
    b = loc["baseline"]
    lines = [
        "",
        f"Heatmap localisation on the {loc['n_images']} Testing images with expert masks "
        f"({loc['n_misclassified']} misclassified). Pointing game: heatmap peak within "
        f"{loc['pointing_tolerance_px_at_224']:g} px of the tumour; mass: share of the heatmap inside the tumour. "
        f"A uniform heatmap scores {_pct(b['pointing'])} and {_pct(b['mass_in_mask'])}.",
        "",
        "| method | layer | pointing (true class) | mass in mask (true class) | pointing (predicted) | mass in mask (predicted) |",
        "|---|---|---|---|---|---|",
    ]
    for r in loc["results"]:
        lines.append(
            f"| {r['method']} | {r['layer']} | {_pct(r['true']['pointing'])} | {_pct(r['true']['mass_in_mask'])} | "
            f"{_pct(r['predicted']['pointing'])} | {_pct(r['predicted']['mass_in_mask'])} |"
        )
    return lines


def _report(metrics: dict) -> str:
    """``report.md``: the classification table, per-class figures, stress tests and localisation."""
    lines = _report_sets(metrics)
    if metrics.get("stress"):
        lines += _report_stress(metrics["stress"], metrics["official"])
    if metrics.get("localization"):
        lines += _report_localization(metrics["localization"])
    if metrics.get("external"):
        from tumor_xai.external import summary_line

        lines += ["", "## Other collections (tumour slices the training data does not look like)", ""]
        lines += [f"- {summary_line(name, m)}" for name, m in metrics["external"].items()]
    lines += [
        "",
        f"Figures: `confusion_matrix.png`, `reliability.png`, `roc.png`. Run time {metrics['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _summary(m: dict) -> dict:
    """The figures worth carrying in the weights' metadata."""
    t = m.get("tumor", {})
    return {
        "n": m["n"],
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "tumor_sensitivity_argmax": t.get("argmax", {}).get("sensitivity"),
        "tumor_specificity_argmax": t.get("argmax", {}).get("specificity"),
        "tumor_sensitivity_threshold": t.get("threshold", {}).get("sensitivity"),
        "tumor_specificity_threshold": t.get("threshold", {}).get("specificity"),
        "roc_auc_macro": m["roc_auc"]["macro"],
        "ece": m["ece"],
        "nll": m["nll"],
    }


# --------------------------------------------------------------------------------------------------- run


def _check_request(config: EvaluateConfig, weights: LoadedWeights) -> tuple[tuple[str, ...], Path | None]:
    """The localisation methods and masks folder, checked before the long inference runs, not after."""
    if not config.localization:
        return (), config.masks
    from tumor_xai.explain import METHODS, check_method, resolve_layer

    try:
        methods = tuple(check_method(m) for m in (config.methods or tuple(METHODS)))
        for layer in config.layers:
            resolve_layer(weights.model, layer)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    masks_dir = config.masks or Path(config.data).parent / "brain-tumor-mri-masks"
    if not Path(masks_dir).is_dir():
        raise UsageError(
            f"Masks folder {masks_dir} does not exist: pass --masks DIR (the brain-tumor-mri-masks folder)."
        )
    return methods, Path(masks_dir)


def _scorer(weights: LoadedWeights):
    """``classification_metrics`` with the weights' class names, screening threshold and negative class."""
    d = weights.decision
    return lambda probs, labels: classification_metrics(
        probs, labels, list(d.class_names), d.threshold, d.negative_class
    )


def _clean_metrics(
    weights: LoadedWeights, dataset: KaggleDataset, config: EvaluateConfig
) -> tuple[DecodedSplit, np.ndarray, dict]:
    """Decode the Testing split, predict it, score it whole and without its near-copies of Training images."""
    names, score = weights.class_names, _scorer(weights)
    n_test, n_train = len(dataset.splits["Testing"]), len(dataset.splits["Training"])
    logger.info("decoding %d Testing and %d Training images", n_test, n_train)
    test = decode_samples(dataset.splits["Testing"], weights.preprocess, config.skip_unreadable, config.workers)
    # Training is decoded only for its duplicate thumbnails, which do not depend on the size.
    train = decode_samples(dataset.splits["Training"], 32, config.skip_unreadable, config.workers)
    probs = predict_probabilities(weights, test.images, config.batch_size)
    keep = duplicate_free(test.thumbs, train.thumbs, config.duplicate_threshold)
    dedup = score(probs[keep], test.labels[keep])
    dedup.update(
        method=DEDUP_METHOD.format(t=config.duplicate_threshold),
        threshold=config.duplicate_threshold,
        removed=int((~keep).sum()),
        removed_per_class={c: int(np.sum(~keep & (test.labels == k))) for k, c in enumerate(names)},
    )
    data = {
        "root": str(dataset.root),
        "testing": n_test,
        "training": n_train,
        "skipped": [[str(p), why] for p, why in test.skipped + train.skipped],
    }
    official = score(probs, test.labels)
    # Each Testing slice's predicted class index, in the split's sorted order: lets a test check a sample of
    # them against the weights and the code of the day without predicting all 1311 again.
    official["predictions"] = "".join(str(int(k)) for k in probs.argmax(axis=1))
    return test, probs, {"data": data, "official": official, "deduplicated": dedup}


def _weights_record(weights: LoadedWeights) -> dict:
    meta, training = weights.metadata, weights.metadata.get("training") or {}
    return {
        "path": str(weights.path),
        "sha256": meta.get("weights_sha256"),
        "arch": meta["arch"],
        "input_size": weights.preprocess.input_size,
        "temperature": weights.decision.temperature,
        "threshold": weights.decision.threshold,
        "training_device": training.get("device") if isinstance(training, dict) else None,
    }


def _stress(weights: LoadedWeights, dataset: KaggleDataset, test: DecodedSplit, config: EvaluateConfig) -> dict:
    """Accuracy and tumour sensitivity under each corruption of the decoded Testing images."""
    decoded, score = set(test.paths), _scorer(weights)
    kept_samples = [s for s in dataset.splits["Testing"] if s.path in decoded]
    out = {}
    for name in CORRUPTIONS:
        m = score(predict_corrupted(weights, kept_samples, name, config.batch_size, config.workers), test.labels)
        t = m.get("tumor", {})
        out[name] = {
            "accuracy": m["accuracy"],
            "tumor_sensitivity_argmax": t.get("argmax", {}).get("sensitivity"),
            "tumor_sensitivity_threshold": t.get("threshold", {}).get("sensitivity"),
            "tumor_specificity_argmax": t.get("argmax", {}).get("specificity"),
            "ece": m["ece"],
        }
        logger.info("stress %s: accuracy %.4f", name, m["accuracy"])
    return out


def _write_files(out: Path, metrics: dict, probs: np.ndarray, labels: np.ndarray) -> None:
    """``metrics.json``, ``confusion_matrix.json``/``.png``, ``reliability.png``, ``roc.png`` and ``report.md``."""
    import matplotlib

    matplotlib.use("Agg")
    names, official, dedup = metrics["class_names"], metrics["official"], metrics["deduplicated"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    confusion = {
        "class_names": names,
        "rows": "true class",
        "columns": "predicted class",
        "official": official["confusion_matrix"],
        "deduplicated": dedup["confusion_matrix"],
    }
    (out / "confusion_matrix.json").write_text(json.dumps(confusion, indent=2) + "\n")
    title = f"Official Testing (n={official['n']})"
    _plot_confusion(np.array(official["confusion_matrix"]), names, title, out / "confusion_matrix.png")
    _plot_reliability(probs, labels, official["ece"], out / "reliability.png")
    _plot_roc(probs, labels, names, official["roc_auc"]["per_class"], out / "roc.png")
    (out / "report.md").write_text(_report(metrics))


def evaluate(config: EvaluateConfig) -> dict:
    """Run the whole evaluation described by ``config``, write its files and return ``metrics.json``'s dict."""
    started = time.perf_counter()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    weights = load_weights(config.weights, device=config.device)
    dataset = discover(config.data)
    if dataset.class_names != weights.class_names:
        raise DataError(
            f"{config.data} has classes {dataset.class_names} but the weights were trained on {weights.class_names}."
        )
    methods, masks_dir = _check_request(config, weights)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    test, probs, clean = _clean_metrics(weights, dataset, config)
    metrics: dict = {"weights": _weights_record(weights), "data": clean.pop("data"), "class_names": weights.class_names}
    metrics.update(clean)  # official, deduplicated
    if config.stress:
        metrics["stress"] = _stress(weights, dataset, test, config)
    if config.localization:
        masks = load_masks(masks_dir, dataset)
        predictions = probs.argmax(axis=1)
        batch_size = min(config.batch_size, 16)
        loc = localization(weights, dataset, test, predictions, masks, methods, config.layers, batch_size)
        loc["masks"] = str(masks_dir)
        loc["targets"] = "true: the image's true class; predicted: the model's argmax class"
        metrics["localization"] = loc
    if config.external:
        from tumor_xai.external import evaluate_external, summary_line

        metrics["external"] = {}
        for folder in config.external:
            m = evaluate_external(weights, folder, config.batch_size, config.workers)
            metrics["external"][Path(folder).name] = m
            logger.info(summary_line(Path(folder).name, m))
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    _write_files(out, metrics, probs, test.labels)
    if config.record:
        recorded = _record(weights.metadata.get("metrics") or {}, metrics)
        update_metadata(weights.path, metrics={**recorded, "evaluated_with": config.command()})
        logger.info("recorded the evaluation's headline figures in %s", weights.path / "model.json")
    return metrics


def _record(recorded: dict, metrics: dict) -> dict:
    """The weights' ``metrics`` with this evaluation's headline figures: what the model card is built from."""
    official, dedup = metrics["official"], metrics["deduplicated"]
    recorded = {k: v for k, v in recorded.items() if k not in ("stress", "localization")}  # never stale
    recorded.update(
        official={
            **_summary(official),
            "recall": {k: v["recall"] for k, v in official["per_class"].items()},
            "predictions": official.get("predictions"),
        },
        deduplicated={**_summary(dedup), "removed": dedup["removed"]},
    )
    if "stress" in metrics:
        recorded["stress"] = {name: s["accuracy"] for name, s in metrics["stress"].items()}
    if "external" in metrics:  # tumour slices from other collections (the model card's "Collections")
        recorded["external"] = {
            name: {k: v for k, v in m.items() if k != "folder"} for name, m in metrics["external"].items()
        }
    if "localization" in metrics:
        loc = metrics["localization"]
        recorded["localization"] = {
            "n": loc["n_images"],
            "uniform": loc["baseline"],
            "results": [
                {"method": r["method"], "layer": r["layer"], **{k: r["true"][k] for k in ("pointing", "mass_in_mask")}}
                for r in loc["results"]
            ],
        }
    return recorded


def _csv(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tumor_xai.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="Kaggle-layout dataset folder (Training/ and Testing/)")
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default: the repository's weights/)")
    p.add_argument("--out", type=Path, required=True, help="output folder for metrics.json, figures and report.md")
    p.add_argument("--localization", action="store_true", help="score heatmaps against the expert tumour masks")
    p.add_argument("--masks", type=Path, default=None, help="masks folder (default: <data>/../brain-tumor-mri-masks)")
    p.add_argument(
        "--methods",
        type=_csv,
        default=None,
        help="comma-separated heatmap methods (default: all seven; scorecam runs one forward pass per channel of the layer, i.e. minutes per 100 images on CPU)",
    )
    p.add_argument(
        "--layers", type=_csv, default=DEFAULT_LAYERS, help="comma-separated target layers (default: layer4,layer3)"
    )
    p.add_argument("--no-stress", dest="stress", action="store_false", help="skip the stress tests")
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--workers", type=_positive, default=4, help="image decoding threads")
    p.add_argument("--duplicate-threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--skip-unreadable", action="store_true", help="leave unreadable images out instead of stopping")
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the model runs (decoding and corruptions stay on the CPU)",
    )
    p.add_argument(
        "--record", action="store_true", help="store the official and duplicate-free figures in the weights' model.json"
    )
    p.add_argument(
        "--external",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="also score a labelled folder from another collection (index.csv: image,label[,mask]; label a class "
        "or 'tumour'): tumour sensitivity, class accuracy, no-tumour probability on tumours, heatmap placement "
        "(repeatable)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = EvaluateConfig(**{**vars(args), "external": tuple(args.external)})
    try:
        metrics = evaluate(config)
    except (DataError, WeightsError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    o, d = metrics["official"], metrics["deduplicated"]
    print(
        f"official Testing: accuracy {o['accuracy']:.4f} (n={o['n']}), macro ROC-AUC {_num(o['roc_auc']['macro'])}, ECE {o['ece']:.4f}"
    )
    print(f"duplicate-free:   accuracy {d['accuracy']:.4f} (n={d['n']}, {d['removed']} removed)")
    if "external" in metrics:
        from tumor_xai.external import summary_line

        for name, m in metrics["external"].items():
            print(summary_line(name, m))
    print(f"wrote {config.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
