"""Retrain the classifier alone on frozen features of lesion-pasted twins:
``python -m tumor_xai.retrain_head --init WEIGHTS --data DATA --masks MASKS --out DIR``.

Last-layer retraining (Kirichenko, Izmailov and Wilson, ICLR 2023: "Last layer re-training is sufficient
for robustness to spurious correlations"). Every no-tumour slice of the training data comes from one
collection, so the network's features carry that collection's look as well as the lesion, and the
classifier learns to weigh the look. The features themselves already find the lesion on other collections
(the heatmap's pointing game on Br35H tumour slices is above 90 %); what answers "no tumour" is the
2,052-parameter linear layer on top. Here that layer is fitted again on the features of a set in which
the look no longer predicts the label: every training slice (augmented as in training) plus, beside each
no-tumour slice, a twin with an expert-masked lesion pasted in (:func:`tumor_xai.augment.paste_lesions`),
labelled with the donor's class.

The features are extracted once (``--passes`` augmented passes, stored in ``OUT/features.pt`` and reused
by a second call), and the layer is fitted by full-batch L-BFGS for each ``--anchor`` strength: the
cross-entropy plus ``anchor * |W - W0|^2``, a pull towards the starting classifier ``W0`` that trades
what the twins teach against what the original training knew. The strength is chosen on the validation
carve-out alone: among those that lose at most ``--max-lost`` validation images against the starting
weights, on the clean slices and under the worst stress test (as the shipping gate counts them), the one
with the highest tumour sensitivity on validation no-tumour slices with a validation lesion pasted in
(ties: the stronger pull). The other-collection development sets play no part; measure
the result on them with ``benchmarks/compare_validation.py``.

The network up to the pooled features is untouched, so the heatmaps' maps and the out-of-distribution
statistics (first-stage features) stay those of ``--init`` and are copied (fitted again only when ``--init``
was fitted under an older preprocessing version); the temperature and the screening threshold are fitted
again on validation logits, as training fits them.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tumor_xai import inference
from tumor_xai.augment import PRESETS, AugmentConfig
from tumor_xai.calibration import fit_decision
from tumor_xai.checkpoint import LoadedWeights, load_weights, save_weights
from tumor_xai.model import POOLINGS, features_and_logits, set_pooling
from tumor_xai.preprocess import PREPROCESSING_VERSION, refitted_under_current

__all__ = ["HeadConfig", "extract_twin_features", "fit_head", "main", "retrain_head"]

logger = logging.getLogger(__name__)


@dataclass
class HeadConfig:
    """What defines a head retraining; saved in the weights' metadata (``head_retraining``)."""

    init: str = ""
    data: str = ""
    masks: str = ""
    out: str = ""
    passes: int = 4  # augmented passes over the training slices whose features the layer is fitted on
    lesion_paste: float = 1.0  # share of no-tumour slices given a pasted twin in each pass
    paste_donors: str = "balanced"  # see tumor_xai.train.PASTE_DONORS
    anchors: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
    max_lost: int = 1  # validation images the result may get wrong beyond the starting weights' errors
    label_smoothing: float = 0.1
    pooling: str = "avg"  # the refitted classifier's input: "avgmax" adds each channel's maximum (model.AvgMaxPool)
    batch_size: int = 64
    seed: int = 0
    half: bool = False


# --------------------------------------------------------------------------- features


def _train_config(init: LoadedWeights, cfg: HeadConfig):
    """The starting weights' training configuration (their carve-out, recipe and size) with the twins on."""
    from tumor_xai.train import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    training = {k: v for k, v in (init.metadata.get("training") or {}).items() if k in known}
    training.update(
        data=cfg.data,
        masks=cfg.masks,
        out=cfg.out,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device="cpu",
        init=None,
        resume=False,
        pretrained=None,
        lesion_paste=cfg.lesion_paste,
        paste_twins=True,
        paste_donors=cfg.paste_donors,
        lesion_erase=0.0,
        head_loss_weight=0.0,
    )
    training.setdefault("split_seed", None)
    training["image_size"] = init.preprocess.input_size
    return TrainConfig(**training)


def _pooled(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        fmap, _ = features_and_logits(model, x)
    return inference.pooled_features(model, fmap)


def _twin_passes(ctx, model, split, passes: int, aug: AugmentConfig, seed: int) -> tuple[torch.Tensor, ...]:
    """Pooled features, labels and a pasted flag of ``passes`` shuffled passes over ``split`` through
    training's own batch maker (augmentation, then twins), in eval mode."""
    from tumor_xai.train import make_batch

    g = torch.Generator().manual_seed(seed)
    feats, labels, pasted = [], [], []
    bs = ctx.cfg.batch_size
    for p in range(passes):
        order = torch.randperm(len(split), generator=g)
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            batch = make_batch(ctx, split, idx, aug, g)
            feats.append(_pooled(model, batch.x, ctx.bf16))
            labels.append(batch.y)
            flag = torch.zeros(len(batch.y), dtype=torch.bool)
            flag[len(idx) :] = True  # twins join after the batch's own slices
            pasted.append(flag)
        logger.info("pass %d/%d: %d feature vectors", p + 1, passes, sum(len(f) for f in feats))
    return torch.cat(feats), torch.cat(labels), torch.cat(pasted)


@dataclass
class TwinFeatures:
    """What the head is fitted and chosen on, all float32 / int64 on the CPU."""

    train_x: torch.Tensor  # (N, C) augmented training slices and their pasted twins
    train_y: torch.Tensor
    train_pasted: torch.Tensor  # bool (N,)
    val_x: torch.Tensor  # (V, C) the validation carve-out as the app sees it
    val_y: torch.Tensor
    paste_x: torch.Tensor  # (P, C) validation no-tumour slices with a validation lesion pasted in
    paste_y: torch.Tensor
    stress_x: torch.Tensor  # (K, V, C) the validation carve-out under each stress test

    def save(self, path: Path) -> None:
        torch.save(asdict(self), path)

    @classmethod
    def load(cls, path: Path) -> TwinFeatures:
        return cls(**torch.load(path, weights_only=True))


def stress_features(model: torch.nn.Module, squares: np.ndarray, pre, batch_size: int) -> torch.Tensor:
    """Pooled features ``(K, V, C)`` of the validation squares under each of :data:`~tumor_xai.stress.CORRUPTIONS`,
    corrupted as the gate corrupts them (:func:`~tumor_xai.stress.corrupt_squares`), so the choice below
    holds the gate's worst-stress rule."""
    from tumor_xai.stress import CORRUPTIONS, corrupt_squares

    return torch.stack(
        [inference.forward(model, corrupt_squares(squares, name), pre, batch_size).features for name in CORRUPTIONS]
    )


def extract_twin_features(init: LoadedWeights, cfg: HeadConfig) -> TwinFeatures:
    """Decode the Training split and its masks, carve out the starting weights' validation slices, and
    extract the pooled features :class:`TwinFeatures` holds."""
    from tumor_xai.train import Split, check_config, load_training_data, place_data, start_run

    tcfg = _train_config(init, cfg)
    check_config(tcfg)
    ctx = start_run(tcfg)
    data = load_training_data(tcfg)
    if data.fingerprint != init.metadata.get("data_fingerprint", data.fingerprint):
        raise ValueError(f"{cfg.data} is not the data {cfg.init} trained on (its fingerprint differs)")
    ctx.negative = data.class_names.index("notumor")
    run = place_data(ctx, data)
    model = init.model.float().eval()
    train_x, train_y, train_pasted = _twin_passes(
        ctx, model, run.train, cfg.passes, AugmentConfig(**tcfg.augment), cfg.seed
    )
    val = inference.forward(model, run.val.images, ctx.pre, cfg.batch_size)
    # Validation twins: each validation no-tumour slice with a lesion of a validation tumour slice, unaugmented.
    masks = torch.from_numpy(data.masks.masks).unsqueeze(1)
    has = torch.from_numpy(data.masks.has_mask) & (torch.from_numpy(data.decoded.labels) != ctx.negative)
    v = torch.from_numpy(run.val_idx)
    val_split = Split(run.all.images[v], run.all.labels[v], masks[v], has[v], has[v].nonzero().squeeze(1))
    hosts = (val_split.labels == ctx.negative).nonzero().squeeze(1)
    ctx.cfg.lesion_paste = 1.0
    paste_x, paste_y, flag = _twin_passes(ctx, model, Split(*_subset(val_split, hosts)), 3, PRESETS["none"], cfg.seed)
    stress = stress_features(model, data.decoded.images[run.val_idx], ctx.pre, cfg.batch_size)
    return TwinFeatures(
        train_x.float(),
        train_y.long(),
        train_pasted,
        val.features,
        run.val.labels.long(),
        paste_x[flag].float(),
        paste_y[flag].long(),
        stress,
    )


def _subset(split, hosts: torch.Tensor) -> tuple:
    """``split``'s host slices followed by its donors, with donor indices into that new order."""
    keep = torch.cat([hosts, split.donors])
    donors = torch.arange(len(hosts), len(keep))
    return split.images[keep], split.labels[keep], split.masks[keep], split.has_mask[keep], donors


# --------------------------------------------------------------------------- the fit


def fit_head(
    x: torch.Tensor,
    y: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    anchor: float,
    label_smoothing: float = 0.1,
    max_iter: int = 300,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear layer minimising cross-entropy on ``(x, y)`` plus ``anchor * |(W, b) - (w0, b0)|^2``,
    by full-batch L-BFGS from ``(w0, b0)``; returns ``(W, b)``."""
    w, b = w0.clone().float().requires_grad_(True), b0.clone().float().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y, label_smoothing=label_smoothing)
        loss = loss + anchor * ((w - w0).pow(2).sum() + (b - b0).pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _scores(w: torch.Tensor, b: torch.Tensor, feats: TwinFeatures, negative: int) -> dict:
    val_pred = (feats.val_x @ w.T + b).argmax(1)
    paste_pred = (feats.paste_x @ w.T + b).argmax(1)
    stress = (feats.stress_x @ w.T + b).argmax(2) != feats.val_y  # (K, V)
    return {
        "validation_errors": int((val_pred != feats.val_y).sum()),
        "worst_stress_errors": int(stress.sum(1).max()),
        "validation_accuracy": float((val_pred == feats.val_y).float().mean()),
        "pasted_sensitivity": float((paste_pred != negative).float().mean()),
        "pasted_class_accuracy": float((paste_pred == feats.paste_y).float().mean()),
    }


def choose(rows: list[dict], start: dict, max_lost: int) -> dict:
    """The row with the highest pasted sensitivity among those within ``max_lost`` validation errors of
    the ``start`` row, on the clean slices and under the worst stress test (the shipping gate's rule;
    ties: the stronger anchor); the strongest anchor when none is."""
    keys = ("validation_errors", "worst_stress_errors")
    allowed = [r for r in rows if all(r[k] <= start[k] + max_lost for k in keys)]
    if not allowed:
        return max(rows, key=lambda r: r["anchor"])
    return max(allowed, key=lambda r: (round(r["pasted_sensitivity"], 6), r["anchor"]))


def retrain_head(cfg: HeadConfig) -> dict:
    """Extract (or reuse) the features, fit the layer for every anchor, keep the chosen one and write
    ``cfg.out`` as a weights folder; returns its metadata."""
    t0 = time.time()
    init = load_weights(cfg.init)
    if init.metadata.get("members", 1) != 1:
        raise ValueError(f"{cfg.init} runs several networks side by side: retrain the head of one network")
    negative = init.decision.negative_index
    if negative is None:
        raise ValueError(f"{cfg.init} has no no-tumour class to paste lesions into")
    set_pooling(init.model, cfg.pooling)  # avg -> avgmax keeps the answers: the max half starts at zero
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "features.pt"
    if cache.is_file():
        feats = TwinFeatures.load(cache)
        logger.info("features from %s", cache)
        if feats.train_x.shape[1] != init.model.fc.in_features:
            raise ValueError(f"{cache} holds features of another pooling than {cfg.pooling!r}: delete it")
    else:
        feats = extract_twin_features(init, cfg)
        feats.save(cache)
    model = init.model.float().eval()
    w0, b0 = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    start = _scores(w0, b0, feats, negative)
    logger.info("start: %s", start)
    rows = []
    for anchor in cfg.anchors:
        w, b = fit_head(feats.train_x, feats.train_y, w0, b0, anchor, cfg.label_smoothing)
        rows.append({"anchor": anchor, **_scores(w, b, feats, negative), "weights": (w, b)})
        logger.info("anchor %g: %s", anchor, {k: v for k, v in rows[-1].items() if k != "weights"})
    best = choose(rows, start, cfg.max_lost)
    with torch.no_grad():
        model.fc.weight.copy_(best["weights"][0])
        model.fc.bias.copy_(best["weights"][1])
    table = [{k: v for k, v in r.items() if k != "weights"} for r in rows]

    val_logits = feats.val_x @ model.fc.weight.T + model.fc.bias
    training = init.metadata.get("training") or {}
    fitted = fit_decision(
        val_logits.detach(),
        feats.val_y,
        negative,
        training.get("screening_sensitivity", 0.995),
        training.get("screening_specificity", 0.98) or None,
    )
    meta = {k: v for k, v in init.metadata.items() if k not in ("weights_sha256", "storage_dtype", "format_version")}
    meta["preprocessing"] = refitted_under_current(meta["preprocessing"])  # features decoded by this code
    meta["metrics"] = {"validation": fitted.pop("validation")}
    meta.update(fitted)
    meta["head_retraining"] = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("out", "half")},
        "init_sha256": init.metadata.get("weights_sha256"),
        "chosen_anchor": best["anchor"],
        "start": start,
        "table": table,
        "n_features": len(feats.train_x),
        "n_pasted": int(feats.train_pasted.sum()),
        "seconds": round(time.time() - t0, 1),
    }
    extras = init.extras  # OOD tensors: first-stage features, which the refit leaves alone
    if init.preprocess.version != PREPROCESSING_VERSION:  # ... but fitted on pixels this code no longer makes
        extras, meta["ood"] = _refit_ood(init, model, cfg)
    save_weights(model, out, meta, extras=extras, half=cfg.half)
    return meta


def _refit_ood(init: LoadedWeights, model: torch.nn.Module, cfg: HeadConfig) -> tuple[dict, dict]:
    """The OOD statistics of ``init``'s network fitted again on its carve-out as this code preprocesses it
    (decoded once more: the feature cache holds no images), the other extras kept."""
    from tumor_xai import ood

    logger.info(
        "%s was fitted under preprocessing version %d: refitting its OOD statistics", cfg.init, init.preprocess.version
    )
    return ood.refit_statistics(init, ood.carve_out(init, Path(cfg.data)), cfg.batch_size, model=model)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    d = HeadConfig()
    p = argparse.ArgumentParser(prog="python -m tumor_xai.retrain_head", description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="the weights folder whose classifier is refitted")
    p.add_argument("--data", required=True, help="the Kaggle-layout dataset it trained on (Training/)")
    p.add_argument("--masks", required=True, help="the brain-tumor-mri-masks folder (the pasted lesions)")
    p.add_argument("--out", required=True, help="the new weights folder (its features.pt is reused if present)")
    p.add_argument("--passes", type=int, default=d.passes, help="augmented passes over the training slices")
    p.add_argument("--lesion-paste", type=float, default=d.lesion_paste, help="share of no-tumour slices twinned")
    p.add_argument("--paste-donors", choices=("uniform", "balanced"), default=d.paste_donors)
    p.add_argument(
        "--anchor",
        default=",".join(f"{a:g}" for a in d.anchors),
        help="pull strengths towards the start, tried in turn",
    )
    p.add_argument("--max-lost", type=int, default=d.max_lost, help="validation images the choice may lose")
    p.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=d.pooling,
        help="the classifier's input: the last block's average pool, or average and max pool side by side",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--half", action="store_true", help="store float16 tensors (half the file size)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        anchors = tuple(float(a) for a in args.anchor.split(","))
        if not anchors or min(anchors) < 0:
            raise ValueError
    except ValueError:
        p.error(f"--anchor takes non-negative numbers separated by commas, got {args.anchor!r}")
    if args.passes < 1 or not 0.0 < args.lesion_paste <= 1.0:
        p.error("--passes must be at least 1 and --lesion-paste in (0, 1]")
    cfg = HeadConfig(
        init=args.init,
        data=args.data,
        masks=args.masks,
        out=args.out,
        passes=args.passes,
        lesion_paste=args.lesion_paste,
        paste_donors=args.paste_donors,
        anchors=anchors,
        max_lost=args.max_lost,
        pooling=args.pooling,
        batch_size=args.batch_size,
        seed=args.seed,
        half=args.half,
    )
    try:
        meta = retrain_head(cfg)
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    h = meta["head_retraining"]
    print(f"wrote {args.out}: anchor {h['chosen_anchor']:g} of {len(h['table'])}, start {h['start']}")
    for row in h["table"]:
        print("  " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
