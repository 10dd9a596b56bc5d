"""Temperature scaling and the screening threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tumor_xai.calibration import (
    MIN_TEMPERATURE,
    choose_threshold,
    fit_confidence_temperature,
    fit_decision,
    fit_temperature,
    mean_confidence,
    temperature_nll,
    threshold_at_specificity,
)


def _overconfident(n: int = 2000, k: int = 4, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); the 'model' reports scale * z, i.e. it is over-confident by ``scale``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=g).squeeze(1)
    return z * scale, labels


def test_temperature_undoes_overconfidence_and_lowers_nll():
    logits, labels = _overconfident(scale=3.0)
    t = fit_temperature(logits, labels)
    assert t > 1.0
    assert t == pytest.approx(3.0, rel=0.15)  # labels were drawn at temperature 3
    assert temperature_nll(logits, labels, t) < temperature_nll(logits, labels, 1.0) - 0.1
    # It is the minimum: nudging T either way does not help.
    for other in (t * 0.9, t * 1.1):
        assert temperature_nll(logits, labels, t) <= temperature_nll(logits, labels, other)


def test_underconfident_logits_get_a_temperature_below_one():
    logits, labels = _overconfident(scale=0.5, seed=1)
    assert fit_temperature(logits, labels) < 1.0


def test_confidence_temperature_matches_accuracy_and_undoes_overconfidence():
    logits, labels = _overconfident(scale=3.0)
    t = fit_confidence_temperature(logits, labels)
    accuracy = float((logits.argmax(1) == labels).float().mean())
    assert mean_confidence(logits, t) == pytest.approx(accuracy, abs=1e-6)
    assert t == pytest.approx(3.0, rel=0.15)  # a calibrated model's confidence matches its accuracy: T = 3 again


def _underconfident_with_confident_errors() -> tuple[torch.Tensor, torch.Tensor]:
    """600 slices, all but 8 read right with a modest margin whose true temperature is 0.3, and 8 read wrong with
    a margin 5 times larger: the shape of a classifier refitted on lesion-pasted twins."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(600, 4, generator=g) * 0.3
    labels = torch.randint(0, 4, (600,), generator=g)
    z[torch.arange(600), labels] += 2.0 + torch.rand(600, generator=g)
    wrong = torch.arange(8)
    z[wrong, (labels[wrong] + 1) % 4] += 10.0
    return z, labels


def test_a_few_confident_errors_warm_the_nll_temperature_but_not_the_confidence_one():
    from tumor_xai.metrics import expected_calibration_error

    logits, labels = _underconfident_with_confident_errors()
    by_nll, by_confidence = fit_temperature(logits, labels), fit_confidence_temperature(logits, labels)
    assert by_confidence < by_nll

    def ece(t: float) -> float:
        return expected_calibration_error(torch.softmax(logits / t, 1).numpy(), labels.numpy())

    assert ece(by_confidence) < 0.015 < ece(by_nll)


def test_confidence_temperature_stops_at_the_bound_on_a_set_read_entirely_right(caplog):
    logits = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    with caplog.at_level("WARNING"):
        assert fit_confidence_temperature(logits, torch.tensor([0, 1])) == MIN_TEMPERATURE
    assert "search bound" in caplog.text
    with pytest.raises(ValueError, match="empty"):
        fit_confidence_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_fit_decision_records_the_criterion_and_the_nll_temperature_beside_it():
    logits, labels = _underconfident_with_confident_errors()
    cal = fit_decision(logits, labels, None, 0.995)["calibration"]
    assert cal["temperature"] == pytest.approx(fit_confidence_temperature(logits, labels))
    assert cal["nll_temperature"] == pytest.approx(fit_temperature(logits, labels)) and "confidence" in cal["criterion"]


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), "expected logits"),
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), "empty"),
        (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), "NaN"),
        (torch.zeros(2, 4), torch.tensor([0, 4]), "labels must lie"),
    ],
)
def test_fit_temperature_rejects_bad_input(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, labels)


def test_threshold_keeps_exactly_the_target_sensitivity():
    rng = np.random.default_rng(0)
    pos = rng.permutation(np.linspace(0.01, 0.99, 200))  # 200 distinct tumour scores
    neg = rng.uniform(0, 1, 300)
    prob = np.concatenate([pos, neg])
    is_tumor = np.concatenate([np.ones(200, bool), np.zeros(300, bool)])
    t = choose_threshold(prob, is_tumor, 0.995, ceiling=1.0)
    # ceil(0.995 * 200) = 199 tumour slices must be flagged: the threshold is the 199th highest score.
    assert t == pytest.approx(np.sort(pos)[::-1][198])
    assert np.sum(pos >= t) == 199
    # The highest such threshold: anything above it flags only 198.
    assert np.sum(pos >= np.nextafter(t, 1.0)) == 198


def test_threshold_small_hand_made_case():
    prob = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    is_tumor = np.array([1, 1, 1, 0, 0, 0])
    assert choose_threshold(prob, is_tumor, 1.0) == pytest.approx(0.3)
    assert choose_threshold(prob, is_tumor, 0.6, ceiling=1.0) == pytest.approx(0.8)  # ceil(1.8) = 2 of 3
    assert choose_threshold(prob, is_tumor, 0.5, ceiling=1.0) == pytest.approx(0.8)


def test_threshold_never_exceeds_the_ceiling_so_the_flag_covers_the_label():
    prob = np.array([0.99, 0.98, 0.97, 0.2, 0.1])
    is_tumor = np.array([1, 1, 1, 0, 0])
    assert choose_threshold(prob, is_tumor, 0.6) == pytest.approx(0.5)  # 0.98 by the rule, capped
    assert choose_threshold(prob, is_tumor, 0.6, ceiling=0.9) == pytest.approx(0.9)
    # any probability vector whose argmax is a tumour class has P(tumour) = 1 - P(notumor) > 0.5
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), 2000)
    tumour_label = p.argmax(1) != 2
    assert np.all(1 - p[tumour_label, 2] > 0.5)


def test_threshold_ties_flag_every_tied_slice():
    prob = np.array([0.9, 0.5, 0.5, 0.5, 0.5])
    is_tumor = np.array([1, 1, 1, 1, 0])
    t = choose_threshold(prob, is_tumor, 0.5)  # needs 2 of 4; the 2nd highest is tied with two more
    assert t == pytest.approx(0.5)
    assert np.sum((prob >= t) & (is_tumor == 1)) == 4  # sensitivity reached exceeds the target
    assert np.sum((prob >= t) & (is_tumor == 0)) == 1  # the tied no-tumour slice is flagged too


def test_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="without any tumour slices"):
        choose_threshold(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="differ in length"):
        choose_threshold(np.array([0.1, 0.2]), np.array([1]))
    with pytest.raises(ValueError, match="sensitivity must be"):
        choose_threshold(np.array([0.1]), np.array([1]), sensitivity=0.0)


def test_specificity_budget_flags_at_most_its_share_of_no_tumour_slices():
    rng = np.random.default_rng(0)
    prob = np.concatenate([rng.uniform(0.0, 0.2, 200), rng.uniform(0.9, 1.0, 100)])
    is_tumor = np.r_[np.zeros(200, bool), np.ones(100, bool)]
    t = threshold_at_specificity(prob, is_tumor, 0.98)
    assert ((prob[:200] >= t).sum()) == 4  # floor(0.02 * 200): exactly the budget, not one more
    assert np.sort(prob[:200])[-5] < t <= np.sort(prob[:200])[-4]
    assert threshold_at_specificity(prob, is_tumor, 1.0) > prob[:200].max()
    with pytest.raises(ValueError, match="no-tumour"):
        threshold_at_specificity(prob[200:], is_tumor[200:], 0.98)


def test_fit_decision_lowers_the_threshold_only_to_spend_the_specificity_budget():
    # Class 1 is notumor. Tumours: 48 clear, 2 read as notumor (logit gap -1). No-tumour slices: 92 clear,
    # 5 less sure (gap -2), 3 read as tumour. The ordering, not the fitted temperature, decides the test.
    logits = torch.tensor(
        [[4.0, 0.0]] * 48 + [[0.0, 1.0]] * 2 + [[0.0, 6.0]] * 92 + [[0.0, 2.0]] * 5 + [[1.0, 0.0]] * 3
    )
    labels = torch.tensor([0] * 50 + [1] * 100)
    plain = fit_decision(logits, labels, 1, 0.95)["screening"]
    assert plain["threshold"] == 0.5 and "target_specificity" not in plain  # 48 of 50 tumours: capped at 0.5
    spent = fit_decision(logits, labels, 1, 0.95, 0.95)["screening"]
    # 5 false positives allowed: the 3 read as tumour and none of the 5 tied ones, so the 2 misread tumours count.
    assert spent["threshold"] < 0.5 and "specificity" in spent["rule"]
    assert spent["validation_specificity"] == 0.97 and spent["validation_sensitivity"] == 1.0
    # A budget the ceiling already keeps leaves the threshold at the ceiling.
    assert fit_decision(logits, labels, 1, 0.95, 1.0)["screening"]["threshold"] == 0.5
