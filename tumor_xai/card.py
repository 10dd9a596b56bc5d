"""The README's results section and the model card's figures, generated from the weights' ``model.json``.

    python -m tumor_xai.card                  # rewrite both from weights/model.json
    python -m tumor_xai.card --check          # exit 1 if either is out of date (a test runs this)

``model.json`` carries what training and ``python -m tumor_xai.evaluate --record`` measured (accuracy,
calibration, stress tests, heatmap localisation, the evaluation's command line, the training cost),
so the published figures cannot drift from the weights they describe. Only the text between the
markers ``<!-- section:results -->`` (README) and ``<!-- card:figures -->`` (model card) is generated;
the prose around them is written by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from tumor_xai.augment import AugmentConfig
from tumor_xai.checkpoint import DEFAULT_WEIGHTS_DIR
from tumor_xai.explain import DEFAULT_LAYER, DEFAULT_METHOD

__all__ = ["BARS", "bar_rows", "model_card_figures", "readme_results", "render", "replace_section"]

REPO = DEFAULT_WEIGHTS_DIR.parent
DEFAULT_HEATMAP = (DEFAULT_METHOD, DEFAULT_LAYER)  # the app's default heatmap, whose bars the card reads
# The project's bars for the shipped weights: (label, where to read it, target, at least?).
BARS = [
    ("accuracy (official Testing)", ("official", "accuracy"), 0.990, True),
    ("accuracy (duplicate-free subset)", ("deduplicated", "accuracy"), 0.988, True),
    ("tumour sensitivity at the argmax", ("official", "tumor_sensitivity_argmax"), 0.998, True),
    ("no-tumour recall", ("official", "notumor_recall"), 0.99, True),
    ("lowest class recall", ("official", "min_recall"), 0.99, True),
    ("expected calibration error", ("official", "ece"), 0.015, False),
    ("lowest stress-test accuracy", ("stress", "min"), 0.97, True),
    ("default heatmap: pointing game", ("heatmap", "pointing"), 0.70, True),
    ("default heatmap: heat inside the tumour", ("heatmap", "mass_in_mask"), 0.25, True),
]


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f} %"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _figures(meta: dict) -> dict:
    """The numbers the bars read, gathered from ``meta['metrics']`` (missing ones are None)."""
    m = meta.get("metrics") or {}
    official = dict(m.get("official") or {})
    recall = official.get("recall") or {}
    official["notumor_recall"] = recall.get("notumor")
    official["min_recall"] = min(recall.values()) if recall else None
    stress = m.get("stress") or {}
    heat = next(
        (r for r in (m.get("localization") or {}).get("results", []) if (r["method"], r["layer"]) == DEFAULT_HEATMAP),
        {},
    )
    return {
        "official": official,
        "deduplicated": m.get("deduplicated") or {},
        "stress": {"min": min(stress.values()) if stress else None},
        "heatmap": heat,
    }


def bar_rows(meta: dict) -> list[tuple[str, str, str, bool | None]]:
    """``(bar, target, value, met)`` for each of :data:`BARS` (met is None when the figure is missing)."""
    figures, rows = _figures(meta), []
    for label, (group, key), target, at_least in BARS:
        value = figures[group].get(key)
        met = None if value is None else (value >= target if at_least else value <= target)
        rows.append((label, ("≥ " if at_least else "≤ ") + _pct(target, 1), _pct(value), met))
    return rows


def _aug_overrides(training: dict) -> dict[str, float]:
    """The augmentation strengths a run set away from its recipe (``--aug-set``)."""
    try:
        preset = asdict(AugmentConfig.preset(training.get("aug", "basic")))
    except ValueError:
        return {}
    return {k: v for k, v in (training.get("augment") or {}).items() if k in preset and preset[k] != v}


def _recipe(t: dict, cost: dict | None = None) -> str:
    """One run's recipe in words: its length, augmentation, guidance and cost."""
    recipe = [
        f"`--aug {t.get('aug', 'basic')}`" + "".join(f" `--aug-set {k}={v:g}`" for k, v in _aug_overrides(t).items())
    ]
    if t.get("cam_loss_weight"):
        recipe.append(f"CAM-in-mask loss (weight {t['cam_loss_weight']:g})")
    if t.get("lesion_paste"):
        recipe.append(f"lesion paste (`--lesion-paste {t['lesion_paste']:g}`)")
    if t.get("pooling") == "avgmax":
        recipe.append("a classifier on each channel's average and maximum (`--pooling avgmax`)")
    if t.get("time_budget"):
        size = f", 128-160 px then {t.get('image_size', 224)} px" if t.get("low_res_size") else ""
        device = {"cuda": "one GPU", "cpu": "CPU"}.get(t.get("device"), t.get("device", "?"))
        length = f"{t['time_budget'] / 60:.0f} min of training{size} on {device}"
    elif t.get("init"):
        length = f"fine-tuned for {t.get('epochs')} epochs from an earlier checkpoint"
    else:
        length = f"{t.get('epochs')} epochs"
    text = f"{length} with " + ", ".join(recipe)
    if cost and cost.get("hours"):
        text += f"; about {cost['hours']:.1f} h in all on {cost.get('hardware', t.get('device', '?'))}"
    return text


def _training_line(meta: dict) -> str:
    line = _network_line(meta)
    head = meta.get("head_retraining")
    if head:
        pooled = (
            " average and max pooled (each channel's mean and maximum side by side, so that a small lesion is not "
            "outvoted by the rest of the slice)"
            if meta.get("pooling") == "avgmax"
            else ""
        )
        line += (
            f" Its classifier (the last linear layer) was then refitted on the frozen network's{pooled} features of the "
            f"training slices and their lesion-pasted twins ({head.get('n_features')} vectors from "
            f"{head.get('passes')} augmented passes; `python -m tumor_xai.retrain_head`, pull towards the "
            f"previous classifier {head.get('chosen_anchor'):g}, chosen on the validation carve-out)."
        )
    return line


def _network_line(meta: dict) -> str:
    size = meta["preprocessing"]["input_size"]
    ensemble = meta.get("ensemble") or {}
    members = ensemble.get("members")
    if members:
        runs = "; ".join(
            f"({i}) {_recipe(m.get('training') or {}, m.get('training_cost'))}" for i, m in enumerate(members, 1)
        )
        if "mix" in ensemble:
            shares = " / ".join(f"{100 * w:.0f} %" for w in ensemble["mix"])
            return (
                f"one {meta['arch']} at {size} px whose weights are the mean of {len(members)} networks' "
                f"({shares}; `python -m tumor_xai.ensemble --combine weights`), trained from scratch on this "
                f"dataset: {runs}."
            )
        return (
            f"an ensemble of {len(members)} {meta['arch']} networks at {size} px run as one (logits averaged, "
            f"`python -m tumor_xai.ensemble`), each trained from scratch on this dataset: {runs}."
        )
    t = meta.get("training") or {}
    cost = (meta.get("metrics") or {}).get("training_cost")
    return f"{meta['arch']} at {size} px, trained from scratch on this dataset; {_recipe(t, cost)}."


def readme_results(meta: dict) -> str:
    """The README's results section (between its markers)."""
    m = meta.get("metrics") or {}
    o, d = m.get("official") or {}, m.get("deduplicated") or {}
    heat, stress = _figures(meta)["heatmap"], m.get("stress") or {}
    worst = min(stress, key=stress.get) if stress else None
    lines = [
        "## Results of the shipped model",
        "",
        _training_line(meta),
        f"Figures from `weights/model.json`, written by `{m.get('evaluated_with', 'python -m tumor_xai.evaluate --record')}`;",
        "details in the [model card](weights/MODEL_CARD.md) (regenerate both with `python -m tumor_xai.card`).",
        "",
        f"| | official Testing ({o.get('n', '-')}) | duplicate-free subset ({d.get('n', '-')}) |",
        "|---|---|---|",
        f"| accuracy | {_pct(o.get('accuracy'))} | {_pct(d.get('accuracy'))} |",
        "| tumour sensitivity / specificity (label) | "
        f"{_pct(o.get('tumor_sensitivity_argmax'))} / {_pct(o.get('tumor_specificity_argmax'))} | "
        f"{_pct(d.get('tumor_sensitivity_argmax'))} / {_pct(d.get('tumor_specificity_argmax'))} |",
        f"| tumour sensitivity / specificity (screening flag, t = {meta.get('screening', {}).get('threshold', 0):.2f}) | "
        f"{_pct(o.get('tumor_sensitivity_threshold'))} / {_pct(o.get('tumor_specificity_threshold'))} | "
        f"{_pct(d.get('tumor_sensitivity_threshold'))} / {_pct(d.get('tumor_specificity_threshold'))} |",
        f"| macro ROC-AUC | {_num(o.get('roc_auc_macro'))} | {_num(d.get('roc_auc_macro'))} |",
        f"| expected calibration error (15 bins) | {_pct(o.get('ece'))} | {_pct(d.get('ece'))} |",
        "",
    ]
    if worst:
        lines.append(
            f"Under {len(stress)} stress tests (noise, down-up sampling, contrast, gamma, brightness, rotation) the "
            f"accuracy stays at or above {_pct(stress[worst])} (worst: `{worst}`)."
        )
    if heat:
        n = (m.get("localization") or {}).get("n", "-")
        lines.append(
            f"The default heatmap (Grad-CAM on the last block) peaks on the tumour in {_pct(heat['pointing'], 1)} of "
            f"the {n} masked Testing slices, with {_pct(heat['mass_in_mask'], 1)} of its heat inside the tumour."
        )
    return "\n".join([*lines, "", *_bar_table(meta, "shipped")])


def _bar_table(meta: dict, column: str) -> list[str]:
    rows = [f"| bar | target | {column} | |", "|---|---|---|---|"]
    for label, target, value, met in bar_rows(meta):
        rows.append(f"| {label} | {target} | {value} | {'met' if met else '**missed**' if met is False else '-'} |")
    return rows


def _headline(meta: dict) -> list[str]:
    """Calibration, screening threshold and validation accuracy, one line each."""
    cal, scr = meta.get("calibration") or {}, meta.get("screening") or {}
    val = (meta.get("metrics") or {}).get("validation") or {}
    lines = []
    if cal:
        lines.append(
            f"**Calibration.** Temperature scaling on the validation carve-out ({cal.get('n', '-')} images): "
            f"T = {cal['temperature']:.3f}"
            + (
                f", the temperature at which {cal['criterion']} there (NLL's would be {cal['nll_temperature']:.3f})."
                if cal.get("criterion") and cal.get("nll_temperature") is not None
                else "."
            )
        )
    if scr and scr.get("target_specificity") is not None:
        lines.append(
            f"**Screening threshold.** `P(tumour) >= {scr['threshold']:.3f}`, chosen on the validation carve-out: "
            f"the lowest threshold that still leaves {_pct(scr['target_specificity'], 1)} of its no-tumour slices "
            f"unflagged (there it flags {_pct(scr.get('validation_sensitivity'))} of the tumours and leaves "
            f"{_pct(scr.get('validation_specificity'))} of the no-tumour slices unflagged), never above 0.5 nor above "
            f"the threshold for {_pct(scr.get('target_sensitivity'), 1)} tumour sensitivity. Validation tumours come "
            "from the training collections and are flagged at any threshold, so the flag spends its false-positive "
            "budget on tumours that look like the no-tumour collection."
        )
    elif scr:
        lines.append(
            f"**Screening threshold.** `P(tumour) >= {scr['threshold']:.3f}`, chosen on the validation carve-out "
            f"for {_pct(scr.get('target_sensitivity'), 1)} tumour sensitivity (never above 0.5, so the flag covers "
            "every slice the label calls a tumour)."
        )
    if val:
        lines.append(f"**Validation accuracy** ({val.get('n')} images): {_pct(val.get('accuracy'))}.")
    return lines


def _localization_lines(loc: dict) -> list[str]:
    uniform = loc.get("uniform") or {}
    return [
        "",
        f"Where the heatmap points, true class, on the {loc['n']} Testing slices with expert tumour masks "
        "(pointing game: peak within 8 px of the tumour at 224 px; heat in mask: share of the heatmap inside "
        f"the tumour; a uniform map scores {_pct(uniform.get('pointing'), 1)} and "
        f"{_pct(uniform.get('mass_in_mask'), 1)}):",
        "",
        "| method | layer | pointing game | heat in mask |",
        "|---|---|---|---|",
        *(
            f"| {r['method']} | {r['layer']} | {_pct(r['pointing'])} | {_pct(r['mass_in_mask'])} |"
            for r in loc["results"]
        ),
    ]


# Bars on tumour slices from other collections (issue: the collection shortcut): (set, figure, target).
COLLECTION_BARS = [
    ("br35h-tumour-dev", "tumour_sensitivity_argmax", 0.90),
    ("br35h-tumour-dev", "tumour_sensitivity_flag", 0.95),
    ("br35h-tumour-dev", "pointing", 0.60),
    ("tcia-slices", "tumour_sensitivity_argmax", 0.95),
    ("tcia-slices", "class_accuracy", 0.70),
]
COLLECTION_LABELS = {
    "tumour_sensitivity_argmax": "tumour sensitivity (argmax)",
    "tumour_sensitivity_flag": "tumour sensitivity (screening flag)",
    "class_accuracy": "class accuracy (glioma)",
    "pointing": "default heatmap: pointing game",
}


def _collection_value(sets: dict, name: str, key: str) -> float | None:
    m = sets.get(name) or {}
    return (m.get("heatmap") or {}).get(key) if key == "pointing" else m.get(key)


def collections_lines(meta: dict) -> list[str]:
    """The card's figures on other collections (``evaluate --external``), beside their bars."""
    m = meta.get("metrics") or {}
    sets = m.get("external") or {}
    if not sets:
        return []
    lines = ["", "### Other collections", "", f"Evaluation: `{m.get('external_evaluated_with', '-')}`", ""]
    lines += ["| set | slices | tumour sens. (argmax) | tumour sens. (flag) | class acc. | P(notumor) median / q90 "
              "| pointing | heat in mask |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in sets.items():
        q = s.get("notumor_probability_on_tumours") or {}
        h = s.get("heatmap") or {}
        lines.append(
            f"| {name} | {s.get('n', '-')} | {_pct(s.get('tumour_sensitivity_argmax'), 1)} "
            f"| {_pct(s.get('tumour_sensitivity_flag'), 1)} | {_pct(s.get('class_accuracy'), 1)} "
            f"| {_num(q.get('q50'))} / {_num(q.get('q90'))} | {_pct(h.get('pointing'), 1)} "
            f"| {_pct(h.get('mass_in_mask'), 1)} |"
        )
    lines += ["", "| bar | target | this model | met |", "|---|---|---|---|"]
    for name, key, target in COLLECTION_BARS:
        v = _collection_value(sets, name, key)
        met = "-" if v is None else ("yes" if v >= target else "**no**")
        lines.append(f"| {name}: {COLLECTION_LABELS[key]} | >= {_pct(target, 0)} | {_pct(v, 1)} | {met} |")
    return lines


def model_card_figures(meta: dict) -> str:
    """The model card's figures (between its markers): calibration, evaluation, stress, localisation, bars."""
    m = meta.get("metrics") or {}
    lines = ["## Figures", "", _training_line(meta), "", *_headline(meta)]
    lines += ["", f"Evaluation: `{m.get('evaluated_with', 'python -m tumor_xai.evaluate --record')}`", ""]
    lines += [
        "| set | n | accuracy | macro F1 | tumour sens. (argmax) | tumour spec. (argmax) "
        "| tumour sens. (screening) | tumour spec. (screening) | macro ROC-AUC | ECE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, key in (("Official Testing", "official"), ("Duplicate-free subset", "deduplicated")):
        s = m.get(key) or {}
        if s:
            g = s.get
            lines.append(
                f"| {name} | {g('n', '-')} | {_pct(g('accuracy'))} | {_num(g('macro_f1'))} "
                f"| {_pct(g('tumor_sensitivity_argmax'))} | {_pct(g('tumor_specificity_argmax'))} "
                f"| {_pct(g('tumor_sensitivity_threshold'))} | {_pct(g('tumor_specificity_threshold'))} "
                f"| {_num(g('roc_auc_macro'))} | {_pct(g('ece'))} |"
            )
    recall = (m.get("official") or {}).get("recall") or {}
    if recall:
        lines += ["", "Recall per class (official): " + ", ".join(f"{k} {_pct(v)}" for k, v in recall.items()) + "."]
    stress = m.get("stress") or {}
    if stress:
        lines += ["", "Stress tests (official Testing, applied to the decoded image before preprocessing):", ""]
        lines += ["| corruption | accuracy |", "|---|---|"] + [f"| {k} | {_pct(v)} |" for k, v in stress.items()]
    if m.get("localization"):
        lines += _localization_lines(m["localization"])
    lines += ["", "### Against the project's bars", "", *_bar_table(meta, "this model")]
    lines += collections_lines(meta)
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str, prefix: str = "section") -> str:
    """``text`` with the part between ``<!-- {prefix}:{name} -->`` and its closing marker set to ``body``."""
    start, end = f"<!-- {prefix}:{name} -->", f"<!-- /{prefix}:{name} -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"markers {start} ... {end} not found")
    return text[: i + len(start)] + "\n" + body.rstrip() + "\n" + text[j:]


def render(weights: Path, readme: Path) -> dict[Path, str]:
    """The new text of the README and the model card for the weights in ``weights``."""
    meta = json.loads((weights / "model.json").read_text())
    card = weights / "MODEL_CARD.md"
    return {
        readme: replace_section(readme.read_text(), "results", readme_results(meta)),
        card: replace_section(card.read_text(), "figures", model_card_figures(meta), prefix="card"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tumor_xai.card", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR)
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--check", action="store_true", help="only report whether the files are up to date")
    args = p.parse_args(argv)
    try:
        new = render(args.weights, args.readme)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stale = [path for path, text in new.items() if path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date with {args.weights / 'model.json'}: run python -m tumor_xai.card")
        return 1 if stale else 0
    for path in stale:
        path.write_text(new[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
