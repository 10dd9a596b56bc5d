"""Evaluation on labelled slices from other collections: is a tumour found when it does not look like ours?

Every no-tumour slice of the training data comes from one collection and the tumour slices from
others, so a model can score well on the official Testing split by telling the collections apart.
Tumour slices from elsewhere are the real test. An external set is a folder with an ``index.csv``::

    image,label[,mask]          # paths relative to the folder; label: a class name or "tumour"
    images/y500.jpg,tumour,masks/y500.png

Reported (:func:`evaluate_external`): tumour sensitivity at the argmax (any tumour class) and with
the screening flag, class accuracy where the class is known, the no-tumour probability's distribution
on the tumour slices, and, where a mask is given, the pointing game and heat in mask of the app's
default heatmap for the most likely tumour class. Images go through the same decoding and square
fitting as training and prediction (:func:`tumor_xai.data.decode_samples`).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from tumor_xai.checkpoint import LoadedWeights
from tumor_xai.data import DataError, Sample, decode_samples, read_mask
from tumor_xai.preprocess import fit_square

__all__ = ["TUMOUR_LABEL", "evaluate_external", "read_index", "summary_line"]

logger = logging.getLogger(__name__)

TUMOUR_LABEL = "tumour"  # a tumour of unknown type
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def read_index(folder: str | Path, class_names: list[str] | tuple[str, ...]) -> list[dict]:
    """Rows of ``folder/index.csv`` with resolved paths; :class:`DataError` naming a bad row or file."""
    folder = Path(folder)
    table = folder / "index.csv"
    if not table.is_file():
        raise DataError(f"{folder} has no index.csv (columns image,label[,mask]; label a class or {TUMOUR_LABEL!r})")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise DataError(f"{table} needs the columns image and label (and optionally mask)")
    allowed = set(class_names) | {TUMOUR_LABEL}
    out = []
    for n, row in enumerate(rows, start=2):
        if row["label"] not in allowed:
            raise DataError(f"{table} line {n}: label {row['label']!r} is not one of {sorted(allowed)}")
        image = folder / row["image"]
        mask = folder / row["mask"] if row.get("mask") else None
        for p in (image, mask):
            if p is not None and not p.is_file():
                raise DataError(f"{table} line {n}: {p} does not exist")
        out.append({"image": image, "label": row["label"], "mask": mask})
    return out


def _heatmap_scores(weights: LoadedWeights, squares, masks, targets, batch_size: int) -> dict:
    from tumor_xai.evaluate import _heatmaps, _mean_scores, score_heatmap
    from tumor_xai.explain import DEFAULT_LAYER, DEFAULT_METHOD

    size = weights.preprocess.input_size
    geometries = [fit_square(np.zeros(m.shape, np.float32), size)[1] for m in masks]
    maps = _heatmaps(weights, squares, geometries, targets, DEFAULT_METHOD, DEFAULT_LAYER, batch_size)
    scores = [score_heatmap(h, m) for h, m in zip(maps, masks, strict=True)]
    return {"method": DEFAULT_METHOD, "layer": DEFAULT_LAYER, "n": len(scores), **_mean_scores(scores)}


def evaluate_external(weights: LoadedWeights, folder: str | Path, batch_size: int = 32, workers: int = 4) -> dict:
    """The figures of one external set (see the module docstring) as a JSON-ready dict."""
    from tumor_xai.evaluate import predict_probabilities

    decision = weights.decision
    names = list(decision.class_names)
    rows = read_index(folder, names)
    decoded = decode_samples(
        [Sample(r["image"], 0) for r in rows], weights.preprocess.input_size, skip_unreadable=False, workers=workers
    )
    probs = predict_probabilities(weights, decoded.images, batch_size)
    neg = decision.negative_index
    labels = np.array([r["label"] for r in rows])
    tumour = labels != (names[neg] if neg is not None else None)
    out: dict = {"folder": str(folder), "n": len(rows), "n_tumour": int(tumour.sum())}
    pred = probs.argmax(1)
    known = np.isin(labels, names)
    if known.any():
        truth = np.array([names.index(v) for v in labels[known]])
        out["class_accuracy"] = float((pred[known] == truth).mean())
        out["n_class_known"] = int(known.sum())
        out["predicted_classes"] = {c: int((pred[known] == i).sum()) for i, c in enumerate(names)}
    if neg is not None and tumour.any():
        p_neg = probs[tumour, neg]
        out["tumour_sensitivity_argmax"] = float((pred[tumour] != neg).mean())
        if decision.threshold is not None:
            out["screening_threshold"] = decision.threshold
            out["tumour_sensitivity_flag"] = float(((1.0 - p_neg) >= decision.threshold).mean())
        out["notumor_probability_on_tumours"] = {
            "mean": float(p_neg.mean()),
            **{f"q{int(q * 100)}": float(np.quantile(p_neg, q)) for q in QUANTILES},
            "share_over_0.5": float((p_neg > 0.5).mean()),
            "share_over_0.9": float((p_neg > 0.9).mean()),
        }
    masked = [i for i, r in enumerate(rows) if r["mask"] is not None and tumour[i]]
    if masked:
        masks = [read_mask(rows[i]["mask"]) for i in masked]
        keep = [j for j, m in enumerate(masks) if m.any()]
        idx = np.array([masked[j] for j in keep], dtype=np.int64)
        tumour_probs = probs[idx].copy()
        if neg is not None:
            tumour_probs[:, neg] = -1.0  # explain the most likely TUMOUR class: where was a tumour seen?
        targets = np.array(
            [
                names.index(labels[i]) if labels[i] in names else int(t)
                for i, t in zip(idx, tumour_probs.argmax(1), strict=True)
            ],
            dtype=np.int64,
        )
        out["heatmap"] = _heatmap_scores(weights, decoded.images[idx], [masks[j] for j in keep], targets, batch_size)
    return out


def summary_line(name: str, m: dict) -> str:
    """One line for logs and reports: sensitivity (argmax / flag), class accuracy, pointing."""
    parts = [f"{name}: {m['n']} slices"]
    if "tumour_sensitivity_argmax" in m:
        parts.append(f"tumour sensitivity {100 * m['tumour_sensitivity_argmax']:.1f} % (argmax)")
    if "tumour_sensitivity_flag" in m:
        parts.append(f"{100 * m['tumour_sensitivity_flag']:.1f} % (screening flag)")
    if "class_accuracy" in m:
        parts.append(f"class accuracy {100 * m['class_accuracy']:.1f} %")
    if "heatmap" in m:
        parts.append(
            f"pointing {100 * m['heatmap']['pointing']:.1f} %, heat in mask {100 * m['heatmap']['mass_in_mask']:.1f} %"
        )
    return ", ".join(parts)
