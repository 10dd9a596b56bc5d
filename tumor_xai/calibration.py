"""Post-hoc calibration: one temperature for the softmax and one screening threshold.

Both are fitted on the validation split by the trainer and stored in the weights' metadata
(``calibration.temperature``, ``screening.threshold``), so every consumer divides the logits by the
same temperature and flags "tumour present" at the same probability.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "choose_threshold",
    "fit_decision",
    "fit_confidence_temperature",
    "fit_temperature",
    "mean_confidence",
    "temperature_nll",
    "threshold_at_specificity",
]

logger = logging.getLogger(__name__)

# A temperature outside this range means the logits carry no usable scale (e.g. a perfectly
# separated validation set, where the NLL keeps falling as T -> 0); we stop at the bound and say so.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
CRITERION = "mean top-class confidence equals accuracy"


def temperature_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def _checked(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` as float64 ``(N, K)`` and ``labels`` as int64 ``(N,)`` on the CPU, or a ValueError saying why not."""
    logits = torch.as_tensor(logits).detach().cpu().double()
    labels = torch.as_tensor(labels).detach().cpu().long()
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise ValueError(f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on an empty set")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}]")
    return logits, labels


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T > 0`` that minimises the NLL of ``softmax(logits / T)`` (Guo et al., 2017).

    ``logits`` is ``(N, K)`` and ``labels`` ``(N,)``. The NLL is convex in ``1 / T``, so a bounded
    scalar search over ``log T`` in ``[log MIN_TEMPERATURE, log MAX_TEMPERATURE]`` finds the global
    minimum without the step-size tuning LBFGS needs; it is done in float64 for a stable answer.
    A result at a bound is logged as a warning (the validation set cannot pin the temperature down).
    """
    from scipy.optimize import minimize_scalar  # SciPy loads when a temperature is fitted, not with the package

    logits, labels = _checked(logits, labels)

    def objective(log_t: float) -> float:
        return temperature_nll(logits, labels, math.exp(log_t))

    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    result = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    temperature = float(math.exp(result.x))
    if min(abs(result.x - lo), abs(result.x - hi)) < 1e-3:
        logger.warning("temperature %.3g sits at the search bound: the validation set cannot pin it down", temperature)
    logger.info(
        "temperature %.4f: NLL %.4f -> %.4f on %d samples",
        temperature,
        objective(0.0),
        float(result.fun),
        len(labels),
    )
    return temperature


def mean_confidence(logits: torch.Tensor, temperature: float) -> float:
    """Mean top-class probability of ``softmax(logits / temperature)``; it falls as the temperature rises."""
    return float(torch.softmax(torch.as_tensor(logits).double() / temperature, dim=1).max(dim=1).values.mean())


def fit_confidence_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature at which the mean top-class confidence on this set equals its accuracy.

    This is the temperature the shipped weights use. A calibrated model's confidence matches its accuracy on
    average, and temperature scaling has one parameter, so this single condition fixes it. NLL (:func:`fit_temperature`)
    fixes it too, but on a validation carve-out of a few hundred slices with a handful of errors, those few errors
    set the NLL's temperature: one confidently wrong slice costs more than a hundred correct ones gain from
    sharpening. A classifier whose correct answers are underconfident (a classifier refitted on lesion-pasted twins,
    for one) then keeps a temperature that is too warm: ECE 3.7 % on validation at NLL's temperature, 1.0 % at this
    one. Mean confidence falls monotonically with the temperature (each slice's top-class probability does), so
    the root is unique; it is found by Brent's method on ``log T`` within
    ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``. A set the model gets entirely right has no finite root: the lower bound
    is returned with a warning, as :func:`fit_temperature` does when the NLL keeps falling.
    """
    logits, labels = _checked(logits, labels)
    accuracy = float((logits.argmax(dim=1) == labels).double().mean())
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)

    def gap(log_t: float) -> float:
        return mean_confidence(logits, math.exp(log_t)) - accuracy

    if gap(lo) <= 0.0 or gap(hi) >= 0.0:
        temperature = MIN_TEMPERATURE if gap(lo) <= 0.0 else MAX_TEMPERATURE
        logger.warning("temperature %.3g sits at the search bound: the validation set cannot pin it down", temperature)
        return temperature
    from scipy.optimize import brentq

    temperature = float(math.exp(brentq(gap, lo, hi, xtol=1e-9)))
    logger.info(
        "temperature %.4f: mean confidence %.4f -> %.4f = accuracy on %d samples",
        temperature,
        mean_confidence(logits, 1.0),
        mean_confidence(logits, temperature),
        len(labels),
    )
    return temperature


def choose_threshold(
    tumor_prob: np.ndarray, is_tumor: np.ndarray, sensitivity: float = 0.995, ceiling: float = 0.5
) -> float:
    """The highest threshold on ``P(tumour) = 1 - P(notumor)`` that keeps ``sensitivity`` on this set,
    but never above ``ceiling``.

    The ceiling (default 0.5) keeps the screening flag at least as sensitive as the predicted label:
    whenever a tumour class is the argmax, ``P(notumor) < 0.5`` and so ``P(tumour) > 0.5``. Without
    it, a strong model on a few hundred validation slices gets a threshold set by its two or three
    least confident tumour slices (0.96 here once), which flags *fewer* test tumours than the label.

    A slice is flagged when ``tumor_prob >= threshold``. With ``n`` tumour slices, at least
    ``k = ceil(sensitivity * n)`` must be flagged, so the threshold is the k-th highest tumour-slice
    probability. Ties: every slice whose probability equals the threshold is flagged, so when
    several tumour slices share that value the sensitivity reached can exceed the target, and
    no-tumour slices at exactly that value are flagged too (they count as false positives).
    """
    prob = np.asarray(tumor_prob, dtype=np.float64).ravel()
    positive = np.asarray(is_tumor).astype(bool).ravel()
    if prob.shape != positive.shape:
        raise ValueError(f"tumor_prob and is_tumor differ in length ({prob.size} vs {positive.size})")
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    if not np.isfinite(prob).all():
        raise ValueError("tumor_prob contains NaN or infinite values")
    scores = np.sort(prob[positive])[::-1]
    if scores.size == 0:
        raise ValueError("cannot choose a threshold without any tumour slices")
    # The small slack keeps 0.995 * 200 = 199.00000000000003 from demanding 200 slices.
    k = max(1, math.ceil(sensitivity * scores.size - 1e-9))
    threshold = min(float(scores[k - 1]), ceiling)
    logger.info(
        "threshold %.6f flags %d/%d tumour slices (target sensitivity %.3f)",
        threshold,
        int(np.sum(scores >= threshold)),
        scores.size,
        sensitivity,
    )
    return threshold


def threshold_at_specificity(tumor_prob: np.ndarray, is_tumor: np.ndarray, specificity: float) -> float:
    """The lowest threshold on ``P(tumour)`` that flags at most ``1 - specificity`` of this set's no-tumour
    slices (``floor((1 - specificity) * n)`` of them; ties at the boundary are left unflagged).

    Validation tumours come from the training collections and are found at any threshold, so the
    sensitivity rule alone says nothing about tumours that look like the no-tumour collection. A
    screening flag should spend its false-positive budget on them: this is the threshold that spends
    exactly that budget on the validation no-tumour slices.
    """
    prob = np.asarray(tumor_prob, dtype=np.float64).ravel()
    negative = ~np.asarray(is_tumor).astype(bool).ravel()
    if prob.shape != negative.shape:
        raise ValueError(f"tumor_prob and is_tumor differ in length ({prob.size} vs {negative.size})")
    if not 0.0 < specificity <= 1.0:
        raise ValueError(f"specificity must be in (0, 1], got {specificity}")
    scores = np.sort(prob[negative])[::-1]
    if scores.size == 0:
        raise ValueError("cannot choose a threshold at a specificity without any no-tumour slices")
    allowed = math.floor((1.0 - specificity) * scores.size + 1e-9)
    if allowed >= scores.size:
        return 0.0
    # The next float32 above the last unflagged slice's probability: the app compares float32 probabilities.
    return float(min(1.0, np.nextafter(np.float32(scores[allowed]), np.float32(np.inf))))


def fit_decision(
    logits: torch.Tensor,
    labels: torch.Tensor,
    negative: int | None,
    sensitivity: float,
    specificity: float | None = None,
) -> dict:
    """The weights' decision metadata fitted on validation logits: ``calibration`` (the temperature of
    :func:`fit_confidence_temperature`, with NLL's beside it for reference),
    ``screening`` (only with a negative class) and ``validation`` (accuracy and size).

    The screening threshold on ``1 - P(negative)`` is the highest that keeps ``sensitivity`` on the tumours
    (:func:`choose_threshold`); with ``specificity``, it is lowered to the lowest that still keeps that
    specificity on the no-tumour slices (:func:`threshold_at_specificity`), if that is lower."""
    from tumor_xai.checkpoint import NEGATIVE_CLASS

    temperature = fit_confidence_temperature(logits, labels)
    probs = torch.softmax(logits / temperature, dim=1).numpy()
    meta: dict = {
        "calibration": {
            "temperature": float(temperature),
            "fitted_on": "validation carve-out",
            "n": len(labels),
            "criterion": CRITERION,
            "nll_temperature": float(fit_temperature(logits, labels)),
        }
    }
    if negative is not None:
        tumor_prob, is_tumor = 1.0 - probs[:, negative], labels.numpy() != negative
        threshold = choose_threshold(tumor_prob, is_tumor, sensitivity)
        rule = f"the highest threshold (at most 0.5) keeping {sensitivity:g} tumour sensitivity"
        if specificity is not None and (~is_tumor).any():
            spent = threshold_at_specificity(tumor_prob, is_tumor, specificity)
            if spent < threshold:
                threshold = spent
                rule = (
                    f"the lowest threshold keeping {specificity:g} no-tumour specificity (it keeps the sensitivity too)"
                )
        meta["screening"] = {
            "threshold": float(threshold),
            "negative_class": NEGATIVE_CLASS,
            "target_sensitivity": sensitivity,
            "chosen_on": "validation carve-out",
            "rule": rule,
            "definition": "tumour probability = 1 - P(notumor); positive when >= threshold",
        }
        if specificity is not None:
            meta["screening"]["target_specificity"] = specificity
            flagged = tumor_prob >= threshold
            meta["screening"]["validation_specificity"] = float((~flagged[~is_tumor]).mean())
            meta["screening"]["validation_sensitivity"] = float(flagged[is_tumor].mean())
    meta["validation"] = {"accuracy": float((logits.argmax(1) == labels).float().mean()), "n": len(labels)}
    return meta


def refit(
    weights_dir, data, sensitivity: float = 0.995, specificity: float | None = 0.98, batch_size: int = 64
) -> dict:
    """Fit the temperature and the screening threshold of a weights folder again on its validation
    carve-out (decoded from ``data``'s Training split) and store them in its ``model.json``."""
    from tumor_xai import inference
    from tumor_xai.checkpoint import load_weights, update_metadata
    from tumor_xai.ood import carve_out

    weights = load_weights(weights_dir)
    c = carve_out(weights, data)
    if len(c.val_idx) == 0:
        raise ValueError("the validation carve-out is empty: nothing to calibrate on")
    logits = inference.forward(weights.model, c.images[c.val_idx], weights.preprocess, batch_size).logits
    fitted = fit_decision(logits, c.labels[c.val_idx], weights.decision.negative_index, sensitivity, specificity)
    metrics = dict(weights.metadata.get("metrics") or {}, validation=fitted.pop("validation"))
    update_metadata(weights.path, metrics=metrics, **fitted)
    return fitted


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m tumor_xai.calibration",
        description="Refit the temperature and the screening threshold of a weights folder on its validation carve-out.",
    )
    p.add_argument("--data", required=True, help="the Kaggle-layout dataset the weights trained on (Training/)")
    p.add_argument("--weights", required=True, help="weights folder to update in place")
    p.add_argument("--screening-sensitivity", type=float, default=0.995)
    p.add_argument(
        "--screening-specificity",
        type=float,
        default=0.98,
        help="lower the threshold until this share of validation no-tumour slices is left unflagged (0: off)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tumor_xai.checkpoint import WeightsError
    from tumor_xai.data import DataError

    try:
        fitted = refit(args.weights, args.data, args.screening_sensitivity, args.screening_specificity or None)
    except (WeightsError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scr = fitted.get("screening") or {}
    print(
        f"{args.weights}: temperature {fitted['calibration']['temperature']:.4f}, screening threshold "
        f"{scr.get('threshold', float('nan')):.4f} ({scr.get('rule', 'no no-tumour class')})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
