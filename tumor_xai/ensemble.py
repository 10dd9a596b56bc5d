"""Several trained weights folders as one: ``python -m tumor_xai.ensemble --data DATA --out DIR A B [...]``.

The members' networks become one ResNet that runs them side by side and averages their logits
(:func:`tumor_xai.model.combine_models`), so the app, the API, the heatmaps and the evaluation take the
ensemble as they take one model. What depends on the outputs is fitted again on the members' shared
validation carve-out, as training fits it: the temperature, the screening threshold and the
out-of-distribution statistics. The members must share the architecture, the classes, the
preprocessing and the carve-out (seed and fraction): a member that trained on the others' validation
images would make that fit, and every validation figure, flatter than the truth.

``--combine weights`` averages the members' parameters instead (:func:`tumor_xai.model.average_models`,
a weight-space ensemble; ``--mix`` gives each member's share, e.g. ``--mix 0.6,0.4``): one network at one
network's cost, which means something only for members that share a starting point, such as a fine-tune
and the weights it started from (WiSE-FT): the share of the fine-tune then trades what it learnt
against what the starting weights knew.

The result is a weights folder like any other (``model.json`` says ``members`` and lists each member's
checksum and training configuration); gate it with ``benchmarks/compare_validation.py`` before it
replaces ``weights/``. It costs one forward pass per member.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from tumor_xai import inference, ood
from tumor_xai.calibration import fit_decision
from tumor_xai.checkpoint import NEGATIVE_CLASS, LoadedWeights, load_weights, save_weights
from tumor_xai.data import carve_out_seed, split_train_val
from tumor_xai.model import average_models, combine_models, pooling_of, set_pooling
from tumor_xai.preprocess import refitted_under_current

logger = logging.getLogger(__name__)

COMBINE = {
    "logits": "mean of the members' logits (one network, grouped convolutions)",
    "weights": "weighted mean of the members' parameters and BatchNorm statistics (one network)",
}


def check_members(members: list[LoadedWeights], combine: str = "logits") -> None:
    """Raise ``ValueError`` (naming the folder and the difference) unless the members can be combined.

    Averaged in weight space (``combine="weights"``), an average-pooled member may join avgmax ones: it
    becomes one without changing its answers (:func:`tumor_xai.model.set_pooling`)."""
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two weights folders")
    ref = members[0].metadata
    for w in members:
        meta = w.metadata
        if meta.get("members", 1) != 1:
            raise ValueError(f"{w.path} is an ensemble already: combine its members instead")
        if combine != "weights" and pooling_of(w.model) != pooling_of(members[0].model):
            raise ValueError(f"{w.path} has another pooling than {members[0].path}: {pooling_of(w.model)!r}")
        for key in ("arch", "class_names", "in_chans", "preprocessing"):
            if _comparable(key, meta.get(key)) != _comparable(key, ref.get(key)):
                raise ValueError(f"{w.path} has another {key} than {members[0].path}: {meta.get(key)!r}")
        mine, theirs = meta.get("training") or {}, ref.get("training") or {}
        if (carve_out_seed(mine), mine.get("val_fraction")) != (carve_out_seed(theirs), theirs.get("val_fraction")):
            raise ValueError(
                f"{w.path} kept out another validation carve-out (seed {carve_out_seed(mine)}, fraction "
                f"{mine.get('val_fraction')}) than {members[0].path} (seed {carve_out_seed(theirs)}, fraction "
                f"{theirs.get('val_fraction')}): each would have trained on the other's validation images"
            )


def _comparable(key: str, value):
    """A metadata value as members must share it: the preprocessing without its version (the code applies
    the current one to every member; the version says what a folder's decision was fitted under)."""
    if key == "preprocessing" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "version"}
    return value


def check_mix(combine: str, mix: list[float] | None, n_members: int) -> None:
    """Raise ``ValueError`` with a message for the command line unless ``combine`` is known and ``mix``, if
    given, is a share >= 0 for each of ``n_members`` averaged networks, summing to 1."""
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {sorted(COMBINE)}, got {combine!r}")
    if mix is None:
        return
    if combine != "weights":
        raise ValueError("--mix applies to --combine weights only (an ensemble's logits are averaged evenly)")
    if len(mix) != n_members:
        raise ValueError(f"--mix gives {len(mix)} shares for {n_members} weights folders")
    if any(w < 0 for w in mix) or abs(sum(mix) - 1.0) > 1e-6:
        raise ValueError(f"--mix shares must be >= 0 and sum to 1 (got {','.join(f'{w:g}' for w in mix)})")


def build_ensemble(
    members: list[LoadedWeights],
    images,
    labels,
    thumbs,
    batch_size: int = 64,
    screening_sensitivity: float = 0.995,
    screening_specificity: float | None = 0.98,
    combine: str = "logits",
    mix: list[float] | None = None,
) -> tuple[torch.nn.Module, dict, dict[str, torch.Tensor]]:
    """(combined model, its metadata, its OOD tensors) from the members and the decoded Training split
    (uint8 squares ``(N, S, S)``, labels, thumbnails as :func:`tumor_xai.data.split_train_val` takes them).
    ``combine`` is ``"logits"`` (the members side by side) or ``"weights"`` (their parameters averaged,
    each with its ``mix`` share)."""
    check_members(members, combine)
    check_mix(combine, mix, len(members))
    if combine == "weights" and not any((w.metadata.get("training") or {}).get("init") for w in members):
        logger.warning("none of the members is a fine-tune (--init): averaging networks trained apart gives noise")
    ref = members[0]
    training = dict(ref.metadata.get("training") or {})
    train_idx, val_idx = split_train_val(labels, thumbs, training.get("val_fraction", 0.1), carve_out_seed(training))
    if len(val_idx) == 0:
        raise ValueError("the members kept out no validation carve-out: nothing to calibrate the ensemble on")
    nets = [w.model.float().eval() for w in members]
    if combine == "weights" and any(pooling_of(n) == "avgmax" for n in nets):
        nets = [set_pooling(n, "avgmax") for n in nets]  # an avg member's maximum weighs zero: its answers hold
    model = (combine_models(nets) if combine == "logits" else average_models(nets, mix)).eval()
    names = list(ref.metadata["class_names"])
    negative = names.index(NEGATIVE_CLASS) if NEGATIVE_CLASS in names else None
    logits = inference.forward(model, images[val_idx], ref.preprocess, batch_size, channels_last=True).logits
    fitted = fit_decision(
        logits, torch.as_tensor(labels[val_idx]).long(), negative, screening_sensitivity, screening_specificity
    )
    extras, ood_meta = ood.fit_model(
        model, images, labels, train_idx, val_idx, ref.preprocess, batch_size,
        augment=ood.training_recipe(ref.metadata), seed=training.get("seed", 0),
    )  # fmt: skip
    meta = {
        key: ref.metadata[key]
        for key in ("arch", "class_names", "in_chans", "preprocessing", "data_fingerprint")
        if key in ref.metadata
    }
    meta["preprocessing"] = refitted_under_current(meta["preprocessing"])  # the decision and OOD fitted just now
    described = {"combine": COMBINE[combine]}
    if combine == "weights":
        described["mix"] = mix or [1.0 / len(members)] * len(members)
    meta.update(
        members=len(members) if combine == "logits" else 1,
        ensemble={
            **described,
            "members": [
                {
                    "folder": str(w.path),
                    "weights_sha256": w.metadata.get("weights_sha256"),
                    "training": w.metadata.get("training"),
                    "validation": (w.metadata.get("metrics") or {}).get("validation"),
                    "training_cost": (w.metadata.get("metrics") or {}).get("training_cost"),
                }
                for w in members
            ],
        },
        training=training,  # the carve-out every member kept out (what --init and the gate check)
        calibration=fitted["calibration"],
        ood=ood_meta,
        metrics={"validation": fitted["validation"]},
    )
    if "screening" in fitted:
        meta["screening"] = fitted["screening"]
    return model, meta, extras


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tumor_xai.ensemble", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the Kaggle-layout dataset the members trained on (Training/)")
    p.add_argument("--out", required=True, type=Path, help="the new weights folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--half", action="store_true", help="store float16 tensors (half the file size)")
    p.add_argument(
        "--combine", choices=sorted(COMBINE), default="logits", help="; ".join(f"{k}: {v}" for k, v in COMBINE.items())
    )
    p.add_argument("--mix", help="with --combine weights: each member's share, comma-separated, summing to 1")
    p.add_argument("members", nargs="+", type=Path, help="weights folders, two or more")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tumor_xai.train import TrainConfig, load_training_data

    try:
        members = [load_weights(m) for m in args.members]
        check_members(members, args.combine)
        mix = [float(x) for x in args.mix.split(",")] if args.mix else None
        check_mix(args.combine, mix, len(members))  # before the data set is decoded, which takes a minute
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    cfg = TrainConfig(data=args.data, image_size=members[0].preprocess.input_size)
    data = load_training_data(cfg)
    if data.fingerprint != members[0].metadata.get("data_fingerprint", data.fingerprint):
        p.error(f"{args.data} is not the data the members trained on (its fingerprint differs)")
    model, meta, extras = build_ensemble(
        members, data.decoded.images, data.decoded.labels, data.decoded.thumbs, args.batch_size,
        combine=args.combine, mix=mix,
    )  # fmt: skip
    save_weights(model, args.out, meta, extras=extras, half=args.half)
    acc, t = meta["metrics"]["validation"]["accuracy"], meta["calibration"]["temperature"]
    print(
        f"wrote {args.out}: {len(members)} members ({args.combine}), validation accuracy {100 * acc:.2f} %, temperature {t:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
