"""Classification, screening and calibration metrics as one JSON-able dict.

"Tumour" means any class other than ``notumor``: the screening question the app answers with
``P(tumour) = 1 - P(notumor)``. Sensitivity and specificity are reported both for the argmax
decision and for the stored screening threshold.
"""

from __future__ import annotations

import numpy as np

from tumor_xai.checkpoint import NEGATIVE_CLASS

__all__ = [
    "ECE_BINS",
    "classification_metrics",
    "expected_calibration_error",
    "negative_log_likelihood",
    "reliability_bins",
    "roc_auc_ovr",
    "sensitivity_specificity",
]


ECE_BINS = 15


def _rate(num: int, den: int) -> float | None:
    """``num / den`` or ``None`` when there is nothing to count (JSON null, not NaN)."""
    return num / den if den else None


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Top-class confidence vs accuracy in ``n_bins`` equal-width bins ``(lo, hi]`` over [0, 1].

    Empty bins get ``None`` for confidence and accuracy and a count of 0.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin b holds edges[b] < conf <= edges[b + 1]; conf is at least 1/K > 0, so nothing falls below bin 0.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    out: dict[str, list] = {"edges": edges.tolist(), "count": [], "confidence": [], "accuracy": []}
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        out["count"].append(n)
        out["confidence"].append(float(conf[m].mean()) if n else None)
        out["accuracy"].append(float(correct[m].mean()) if n else None)
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between top-class confidence and accuracy over equal-width bins."""
    bins = reliability_bins(probs, labels, n_bins)
    total = sum(bins["count"])
    return float(
        sum(
            n / total * abs(a - c)
            for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=False)
            if n
        )
    )


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean ``-log p(true class)``; probabilities are floored at ``eps`` so one zero cannot make it infinite."""
    probs = np.asarray(probs, dtype=np.float64)
    p = probs[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.maximum(p, eps))))


def roc_auc_ovr(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """One-vs-rest ROC-AUC per class and their unweighted mean over the classes it is defined for.

    A class with no positives or no negatives in ``labels`` has no AUC (``None``) and is left out
    of the mean; ``macro`` is ``None`` when no class has one.
    """
    from sklearn.metrics import roc_auc_score  # scikit-learn loads when scoring, not with the package

    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    per_class: dict[str, float | None] = {}
    for k, name in enumerate(class_names):
        y = labels == k
        per_class[name] = float(roc_auc_score(y, probs[:, k])) if 0 < y.sum() < len(y) else None
    defined = [v for v in per_class.values() if v is not None]
    return {"macro": float(np.mean(defined)) if defined else None, "per_class": per_class}


def sensitivity_specificity(flagged: np.ndarray, is_tumor: np.ndarray) -> dict[str, float | int | None]:
    """Sensitivity (flagged tumour slices / tumour slices) and specificity (unflagged no-tumour / no-tumour)."""
    flagged, is_tumor = np.asarray(flagged, dtype=bool), np.asarray(is_tumor, dtype=bool)
    tp, fn = int(np.sum(flagged & is_tumor)), int(np.sum(~flagged & is_tumor))
    tn, fp = int(np.sum(~flagged & ~is_tumor)), int(np.sum(flagged & ~is_tumor))
    return {
        "sensitivity": _rate(tp, tp + fn),
        "specificity": _rate(tn, tn + fp),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    threshold: float | None = None,
    negative_class: str | None = NEGATIVE_CLASS,
) -> dict:
    """Every figure the project reports for one set of calibrated probabilities ``(N, K)``.

    Keys: ``n``, ``accuracy``, ``per_class`` (precision, recall, F1, support), ``macro_f1``,
    ``confusion_matrix`` (rows = true class, columns = predicted, in ``class_names`` order),
    ``tumor`` (sensitivity/specificity at argmax and, when ``threshold`` is given, at
    ``1 - P(negative_class) >= threshold``; absent without that class), ``roc_auc``
    (one-vs-rest, per class and macro), ``ece`` (15 equal-width bins, top-class confidence), ``nll``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[1] != len(class_names) or len(probs) != len(labels):
        raise ValueError(
            f"expected probs (N, {len(class_names)}) and labels (N,), got {probs.shape} and {labels.shape}"
        )
    if len(labels) == 0:
        raise ValueError("no samples to score")
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    k = len(class_names)
    pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=list(range(k)), zero_division=0
    )
    out: dict = {
        "n": int(len(labels)),
        "accuracy": float(np.mean(pred == labels)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "macro_f1": float(np.mean(f1)),
        "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(k))).tolist(),
    }
    if negative_class in class_names:
        no = class_names.index(negative_class)
        is_tumor = labels != no
        tumor_prob = 1.0 - probs[:, no]
        out["tumor"] = {"argmax": sensitivity_specificity(pred != no, is_tumor)}
        if threshold is not None:
            at = sensitivity_specificity(tumor_prob >= threshold, is_tumor)
            out["tumor"]["threshold"] = {"threshold": float(threshold), **at}
    out["roc_auc"] = roc_auc_ovr(probs, labels, class_names)
    out["ece"] = expected_calibration_error(probs, labels)
    out["nll"] = negative_log_likelihood(probs, labels)
    return out
