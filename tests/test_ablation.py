"""Helpers of benchmarks/ablation.py that the recipe choice and the validation gate rest on."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from ablation import distinct_accuracy  # noqa: E402


def test_distinct_accuracy_counts_a_near_duplicate_group_once():
    rng = np.random.default_rng(0)
    thumbs = rng.uniform(0, 255, size=(5, 32, 32)).astype(np.float32)
    thumbs[1] = thumbs[0] + 1.0  # a slice stored three times, nearly identical
    thumbs[2] = thumbs[0]
    right = np.array([False, False, False, True, True])
    assert right.mean() == 0.4  # three of five wrong, but one image of three
    assert distinct_accuracy(right, thumbs) == 2 / 3
    mixed = np.array([True, False, False, True, True])  # a group half right counts as its mean
    assert distinct_accuracy(mixed, thumbs) == pytest.approx((1 / 3 + 2) / 3)
