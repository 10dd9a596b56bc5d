"""Metric computation on small hand-made cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tumor_xai.metrics import (
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    roc_auc_ovr,
)

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _row(top: int, conf: float) -> list[float]:
    rest = (1.0 - conf) / 3
    return [conf if k == top else rest for k in range(4)]


def test_ece_by_hand():
    # Two at confidence 0.9 (one right, one wrong) and two at 0.62 (both right).
    probs = np.array([_row(0, 0.9), _row(1, 0.9), _row(2, 0.62), _row(3, 0.62)])
    labels = np.array([0, 0, 2, 3])
    # bin (0.867, 0.933]: accuracy 0.5 vs confidence 0.9; bin (0.6, 0.667]: accuracy 1 vs 0.62.
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.38)
    bins = reliability_bins(probs, labels)
    assert sum(bins["count"]) == 4 and len(bins["count"]) == 15
    assert bins["accuracy"][13] == pytest.approx(0.5) and bins["confidence"][9] == pytest.approx(0.62)
    assert bins["accuracy"][0] is None  # empty bins are None, not NaN


def test_perfectly_calibrated_bins_have_zero_ece():
    probs = np.array([_row(0, 0.75)] * 4)
    labels = np.array([0, 0, 0, 1])  # 3 of 4 right at confidence 0.75
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)


def test_nll_by_hand():
    probs = np.array([_row(0, 0.5), _row(1, 0.8)])
    labels = np.array([0, 2])
    assert negative_log_likelihood(probs, labels) == pytest.approx(-(math.log(0.5) + math.log(0.2 / 3)) / 2)
    assert math.isfinite(negative_log_likelihood(np.array([[1.0, 0.0, 0.0, 0.0]]), np.array([1])))


def test_classification_metrics_hand_made():
    # true:  glioma glioma meningioma notumor notumor pituitary
    # pred:  glioma notumor meningioma notumor glioma pituitary
    probs = np.array([_row(0, 0.9), _row(2, 0.6), _row(1, 0.8), _row(2, 0.7), _row(0, 0.55), _row(3, 0.95)])
    labels = np.array([0, 0, 1, 2, 2, 3])
    m = classification_metrics(probs, labels, CLASSES, threshold=0.35)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]
    assert m["per_class"]["glioma"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["notumor"]["precision"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)
    # Argmax screening: 4 tumour slices, one called notumor; 2 no-tumour slices, one called glioma.
    arg = m["tumor"]["argmax"]
    assert (arg["sensitivity"], arg["specificity"]) == (pytest.approx(0.75), pytest.approx(0.5))
    # Threshold 0.35 on 1 - P(notumor): the missed glioma has P(tumour) = 0.4 -> flagged; the notumor
    # slice at 0.7 has P(tumour) = 0.3 -> not flagged; the one predicted glioma -> flagged.
    th = m["tumor"]["threshold"]
    assert th["threshold"] == 0.35
    assert (th["sensitivity"], th["specificity"]) == (pytest.approx(1.0), pytest.approx(0.5))
    assert 0 <= m["ece"] <= 1 and m["nll"] > 0
    json.dumps(m)  # JSON-able as is


def test_roc_auc_separable_and_undefined_classes():
    probs = np.array([_row(0, 0.9), _row(0, 0.8), _row(1, 0.7), _row(1, 0.9)])
    labels = np.array([0, 0, 1, 1])  # notumor and pituitary never occur
    auc = roc_auc_ovr(probs, labels, CLASSES)
    assert auc["per_class"]["glioma"] == pytest.approx(1.0)
    assert auc["per_class"]["notumor"] is None and auc["per_class"]["pituitary"] is None
    assert auc["macro"] == pytest.approx(1.0)
    m = classification_metrics(probs, labels, CLASSES)
    assert m["tumor"]["argmax"]["specificity"] is None  # no no-tumour slices to be specific about
    assert "threshold" not in m["tumor"]


def test_classification_metrics_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected probs"):
        classification_metrics(np.zeros((3, 3)), np.zeros(3, int), CLASSES)
