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


def _scores(acc: int, stress: int, **sens) -> dict:
    """Gate scores of a model with ``acc`` and ``stress`` right of 500 validation images."""
    external = {k: {"tumour_sensitivity_argmax": v} for k, v in sens.items()}
    return {"val_n": 500, "val_acc": acc / 500, "val_stress_min": stress / 500, "external": external}


def test_gate_trades_one_validation_image_for_tumours_found_on_every_other_collection():
    from compare_validation import gate

    ref = _scores(490, 485, br35h=0.5, tcia=0.8)
    assert gate(ref, _scores(490, 485, br35h=0.5, tcia=0.8))[0]  # as good as the shipped weights
    assert gate(ref, _scores(489, 484, br35h=0.9, tcia=0.9))[0]  # one image each, for more tumours found
    assert not gate(ref, _scores(488, 485, br35h=0.9, tcia=0.9))[0]  # two images of accuracy
    assert not gate(ref, _scores(489, 483, br35h=0.9, tcia=0.9))[0]  # two images under the worst stress test
    passes, why = gate(ref, _scores(489, 485, br35h=0.9, tcia=0.8))
    assert not passes and "every" in why  # no gain on one of the sets
    no_sets = {k: v for k, v in ref.items() if k != "external"}
    assert not gate(no_sets, _scores(489, 485))[0]  # without the sets the old gate stands
