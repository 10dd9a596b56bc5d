"""Compare weights folders on the validation carve-out they share: the gate before a new model ships.

    python benchmarks/compare_validation.py --data DATA --masks MASKS weights/ runs/candidate [...]

Every folder is scored on the same carve-out (the first folder's ``--split-seed`` or ``--seed`` and its
``--val-fraction``, which ``train --init`` keeps and other training seeds share with ``--split-seed``):
accuracy (also with each near-duplicate group counted once: the carve-out keeps a group on one side,
so one misread slice stored three times costs three images), accuracy under each stress test, and the
approximate pointing game and heat-in-mask of the default heatmap on the masked validation slices. A
folder trained on another carve-out is refused (it has trained on some of these images).

The gate: a candidate ships if it is at least as good as the shipped weights on accuracy and on the
worst stress test; or, with ``--external DIR`` (tumour slices from other collections, an ``index.csv``
as ``python -m tumor_xai.evaluate --external`` reads; repeatable), if it finds more of their tumours
at the argmax on every such set while losing at most one validation image, overall and on the worst
stress test. The exit status says whether the last folder passes against the first (0 yes, 1 no,
2 refused). The external sets only compare candidates: nothing is fitted on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from ablation import validation_scores, validation_split

from tumor_xai import inference
from tumor_xai.checkpoint import LoadedWeights, load_weights
from tumor_xai.data import carve_out_seed
from tumor_xai.evaluate import score_heatmap
from tumor_xai.explain import DEFAULT_LAYER, explain_batch
from tumor_xai.external import evaluate_external
from tumor_xai.train import TrainConfig, load_training_data

ROWS = [
    ("val_acc", "accuracy"),
    ("val_acc_distinct", "accuracy, near-duplicates counted once"),
    ("val_stress_min", "worst stress accuracy"),
    ("val_pointing", "pointing game (masked slices)"),
    ("val_heat_in_mask", "heat in mask"),
]


def heatmap_scores(w: LoadedWeights, data, cfg, heatmaps: list[str]) -> dict[str, dict]:
    """Pointing game and heat-in-mask of each ``method@layer`` (true class) on the masked validation slices.

    Scored exactly as the evaluation scores the Testing masks (:func:`tumor_xai.evaluate.score_heatmap`),
    so the default heatmap can be chosen on validation data and only reported on Testing.
    """
    val_idx, masked = validation_split(w, data, cfg)
    idx = val_idx[masked]
    out = {}
    for spec in heatmaps:
        method, _, layer = spec.partition("@")
        hits, mass = [], []
        for start in range(0, len(idx), 16):
            batch = idx[start : start + 16]
            x = inference.to_input(data.decoded.images[batch], w.preprocess)
            maps = explain_batch(
                w.model, x, torch.from_numpy(data.decoded.labels[batch]), method, layer or DEFAULT_LAYER
            )
            for heat, i in zip(maps, batch, strict=True):
                score = score_heatmap(heat, data.masks.masks[i] > 127)
                hits.append(score.hit)
                mass.append(score.mass)
        out[spec] = {"pointing": float(np.mean(hits)), "mass_in_mask": float(np.mean(mass)), "n": len(idx)}
        print(
            f"{w.path} {spec}: pointing {100 * out[spec]['pointing']:.1f} %, heat in mask "
            f"{100 * out[spec]['mass_in_mask']:.1f} % ({len(idx)} masked validation slices)",
            flush=True,
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--json", type=Path, help="also write the scores here")
    p.add_argument(
        "--heatmaps",
        default="",
        help="also score these METHOD@LAYER heatmaps on the masked validation slices, e.g. gradcam@layer4,gradcam@layer3",
    )
    p.add_argument(
        "--external",
        action="append",
        default=[],
        type=Path,
        help="a folder of tumour slices from another collection (index.csv); repeatable; see the gate above",
    )
    p.add_argument("weights", nargs="+", type=Path, help="weights folders; the first is the reference")
    args = p.parse_args()

    loaded = {str(w): load_weights(w) for w in args.weights}
    ref = next(iter(loaded.values()))
    trained = ref.metadata.get("training", {})
    cfg = TrainConfig(
        data=args.data,
        masks=args.masks,
        image_size=ref.preprocess.input_size,
        seed=carve_out_seed(trained),
        val_fraction=trained.get("val_fraction", TrainConfig.val_fraction),
    )
    for name, w in loaded.items():
        theirs = w.metadata.get("training") or {}
        if carve_out_seed(theirs) != cfg.seed or theirs.get("val_fraction", cfg.val_fraction) != cfg.val_fraction:
            print(
                f"error: {name} kept out another validation carve-out (seed {carve_out_seed(theirs)}) than "
                f"{args.weights[0]} (seed {cfg.seed}): it trained on some of these validation images, so the "
                f"comparison would flatter it; train it with --split-seed {cfg.seed}",
                file=sys.stderr,
            )
            return 2
    data = load_training_data(cfg, fingerprint=False)
    scores = {name: validation_scores(w, data, cfg) for name, w in loaded.items()}
    specs = [h.strip() for h in args.heatmaps.split(",") if h.strip()]
    for name, w in loaded.items():
        if specs:
            scores[name]["heatmaps"] = heatmap_scores(w, data, cfg, specs)
    for name, w in loaded.items():
        for folder in args.external:
            ext = evaluate_external(w, folder)
            scores[name].setdefault("external", {})[folder.name] = {
                k: ext[k] for k in ("n_tumour", "tumour_sensitivity_argmax", "tumour_sensitivity_flag") if k in ext
            }
    names = list(scores)
    print(
        f"validation carve-out of seed {cfg.seed} ({next(iter(scores.values()))['val_n']} images, {cfg.image_size} px)"
    )
    print("| | " + " | ".join(names) + " |\n|---" * 1 + "|---" * len(names) + "|")
    for key, label in ROWS:
        cells = [f"{100 * s[key]:.2f} %" if key in s else "-" for s in scores.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for name in scores[names[0]]["val_stress"]:
        print(f"| {name} | " + " | ".join(f"{100 * s['val_stress'][name]:.2f} %" for s in scores.values()) + " |")
    for folder in args.external:
        for key, label in (("tumour_sensitivity_argmax", "argmax"), ("tumour_sensitivity_flag", "flag")):
            cells = [f"{100 * s['external'][folder.name].get(key, float('nan')):.1f} %" for s in scores.values()]
            print(f"| {folder.name}: tumour sensitivity ({label}) | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(scores, indent=1) + "\n")
    passes, why = gate(scores[names[0]], scores[names[-1]])
    print(f"{names[-1]} {'passes' if passes else 'does not pass'} the gate against {names[0]}: {why}")
    return 0 if passes else 1


def gate(ref: dict, new: dict) -> tuple[bool, str]:
    """Whether ``new`` may replace ``ref`` (see the module docstring), and why in words."""
    one = 1.0 / ref["val_n"] + 1e-9  # one validation image
    if new["val_acc"] >= ref["val_acc"] and new["val_stress_min"] >= ref["val_stress_min"]:
        return True, "at least as good on validation accuracy and the worst stress test"
    sets = sorted(ref.get("external") or {})
    if not sets:
        return False, "worse on validation accuracy or the worst stress test (no other-collection sets given)"
    gains = all(
        new["external"][k]["tumour_sensitivity_argmax"] > ref["external"][k]["tumour_sensitivity_argmax"] for k in sets
    )
    close = new["val_acc"] >= ref["val_acc"] - one and new["val_stress_min"] >= ref["val_stress_min"] - one
    if gains and close:
        return True, f"finds more tumours on {', '.join(sets)} and loses at most one validation image"
    if not gains:
        return False, f"does not find more tumours on every other-collection set ({', '.join(sets)})"
    return False, "finds more tumours elsewhere but loses more than one validation image (accuracy or worst stress)"


if __name__ == "__main__":
    sys.exit(main())
