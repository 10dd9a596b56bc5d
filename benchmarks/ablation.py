"""Ablation of the attention and robustness recipes: train each variant for several seeds, evaluate, tabulate.

    python benchmarks/ablation.py --data DIR --masks DIR --out DIR \\
        [--variants baseline,cam,strong,cam+strong] [--seeds 0,1] [--epochs 100] [--budget-min 12]

A variant is ``+``-joined components (see COMPONENTS): ``baseline`` (today's recipe), ``cam`` (CAM-in-mask
loss), ``camkl`` (its KL form), ``head`` (CAM-in-head loss for unmasked images), ``erase`` (lesion
erasing with a "not confident" target), ``strong`` (strong acquisition augmentation). Runs go seed by
seed (every variant once before any twice), so a run cut short by the budget still compares them all.

Training runs in this process (the Training split is decoded once and shared), so the reported
training time is the GPU's. Each finished run is evaluated by ``python -m tumor_xai.evaluate
--localization`` (fast Grad-CAM on layer4, the app's default heatmap) in a CPU subprocess while the
next run trains. ``OUT/summary.md`` and ``OUT/summary.json`` are rewritten after every evaluation:
official and duplicate-free accuracy, ECE, pointing game and heat-in-mask on the masked Testing
slices, accuracy under each stress test, and training time, per run and per variant (mean, sd).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tumor_xai import attention, inference
from tumor_xai import evaluate as _evaluate  # noqa: F401  (evaluation subprocesses need it: fail before training)
from tumor_xai.checkpoint import LoadedWeights, load_weights
from tumor_xai.data import carve_out_seed, split_train_val
from tumor_xai.duplicates import group_ids, near_duplicate_pairs
from tumor_xai.explain import DEFAULT_LAYER, DEFAULT_METHOD
from tumor_xai.stress import CORRUPTIONS, corrupt_squares
from tumor_xai.train import check_config, config_from_args, get_args_parser, load_training_data, train

COMPONENTS: dict[str, list[str]] = {
    "baseline": [],
    "cam": ["--cam-loss-weight", "1.0"],
    "camkl": ["--cam-loss-weight", "1.0", "--cam-loss", "kl"],
    "head": ["--head-loss-weight", "0.5"],
    "erase": ["--lesion-erase", "0.3"],
    "strong": ["--aug", "strong"],
}
NEEDS_MASKS = {"cam", "camkl", "erase"}
# The bars for the shipped model.
BAR_STRESS = tuple(CORRUPTIONS)  # every stress test must keep 97 %
HEATMAP = (DEFAULT_METHOD, DEFAULT_LAYER)  # the app's default heatmap


def variant_args(name: str, masks: str) -> list[str]:
    """Training arguments of a ``+``-joined variant name; raises ``ValueError`` for an unknown component."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown variant component(s) {unknown}; choose from {sorted(COMPONENTS)}")
    args = [a for p in parts for a in COMPONENTS[p]]
    if NEEDS_MASKS & set(parts):
        args += ["--masks", masks]
    return args


def validation_split(weights: LoadedWeights, data, cfg) -> tuple[np.ndarray, np.ndarray | None]:
    """The validation carve-out's indices into ``data`` and, with masks, which of them are masked tumour
    slices (the heatmap scores' subset; None without masks)."""
    seed = carve_out_seed(vars(cfg))
    _, val_idx = split_train_val(data.decoded.labels, data.decoded.thumbs, cfg.val_fraction, seed)
    if data.masks is None:
        return val_idx, None
    return val_idx, data.masks.has_mask[val_idx] & (data.decoded.labels[val_idx] != weights.decision.negative_index)


def distinct_accuracy(right: np.ndarray, thumbs: np.ndarray) -> float:
    """Accuracy with each near-duplicate group counted once (the mean over groups of their mean).

    The carve-out keeps a group on one side, so a slice stored three times counts three times in the
    plain accuracy; this figure says how many distinct images the errors are.
    """
    groups = group_ids(len(right), near_duplicate_pairs(thumbs))  # 0 .. k-1
    return float(np.mean(np.bincount(groups, weights=right) / np.bincount(groups)))


_CORRUPTED: dict[tuple[bytes, str], np.ndarray] = {}


def corrupted(squares: np.ndarray, name: str) -> np.ndarray:
    """``squares`` after the named stress corruption (seeded per image), computed once per set of squares:
    every run of an ablation is scored on the same corrupted validation images."""
    import hashlib

    key = (hashlib.sha1(squares.tobytes()).digest(), name)
    if key not in _CORRUPTED:
        _CORRUPTED[key] = corrupt_squares(squares, name)
    return _CORRUPTED[key]


def validation_scores(weights: LoadedWeights, data, cfg) -> dict:
    """What the recipe is chosen on: the run's own validation carve-out (never the Testing split).

    Accuracy; accuracy under every stress corruption (applied to the decoded squares, seeded per
    image); and, on the masked validation slices, the approximate pointing game and heat-in-mask of
    the app's default heatmap (true class, Grad-CAM on layer4).
    """
    model, pre = weights.model.float().eval(), weights.preprocess
    val_idx, sel = validation_split(weights, data, cfg)
    squares, labels = data.decoded.images[val_idx], torch.from_numpy(data.decoded.labels[val_idx])
    out = inference.forward(model, squares, pre, keep_maps=True)
    fmap, logits = out.fmap, out.logits
    right = (logits.argmax(1) == labels).numpy()
    # Test-time flipping: the mean of the probabilities of the slice and its mirror image.
    flipped = inference.forward(model, np.ascontiguousarray(squares[..., ::-1]), pre).logits
    tta = (logits.softmax(1) + flipped.softmax(1)).argmax(1) == labels
    scores = {
        "val_acc": float(right.mean()),
        "val_acc_flip_tta": float(tta.float().mean()),
        "val_acc_distinct": distinct_accuracy(right, data.decoded.thumbs[val_idx]),
        "val_n": len(val_idx),
    }
    stress = {}
    for name in CORRUPTIONS:
        bad = corrupted(squares, name)
        stress[name] = (inference.forward(model, bad, pre).logits.argmax(1) == labels).float().mean().item()
    scores.update(val_stress=stress, val_stress_min=min(stress.values()))
    if sel is not None:
        if sel.any():
            sel_t = torch.from_numpy(sel)
            cam = inference.class_activation_map(fmap[sel_t], model.fc.weight.detach().cpu(), labels[sel_t])
            masks = torch.from_numpy(data.masks.masks[val_idx][sel]).unsqueeze(1).float().div_(255.0)
            scores.update(
                val_pointing=attention.pointing_hits(cam, masks).float().mean().item(),
                val_heat_in_mask=attention.heat_in_mask(cam, masks).mean().item(),
                val_masked_n=int(sel.sum()),
            )
    return scores


# Validation stand-ins for the shipped model's bars: accuracy, worst stress accuracy, pointing game.
SELECTION_BARS = {"val_acc": 0.996, "val_stress_min": 0.97, "val_pointing": 0.70}


def selection_shortfall(row: dict) -> float:
    """How far a run's validation figures fall short of the bars, summed (lower is better; 0 meets all)."""
    return sum(max(0.0, bar - row.get(key, 0.0)) for key, bar in SELECTION_BARS.items())


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run_summary(run: Path, variant: str, seed: int) -> dict:
    """One row of the table from a run's log.json and its evaluation's metrics.json."""
    log = json.loads((run / "log.json").read_text())
    row: dict = {
        "variant": variant,
        "seed": seed,
        "run": str(run),
        "train_seconds": round(sum(e["seconds"] for e in log), 1),
        "epochs": len(log),
        "val_acc_last": log[-1].get("val_acc"),
    }
    val_path = run / "validation.json"
    if val_path.is_file():
        val = json.loads(val_path.read_text())
        row.update({k: v for k, v in val.items() if k != "val_stress"}, val_stress=val["val_stress"])
        row["shortfall"] = round(selection_shortfall(row), 4)
    metrics_path = run / "eval" / "metrics.json"
    if not metrics_path.is_file():
        row["error"] = f"no {metrics_path}: see {run / 'eval.log'}"
        return row
    m = json.loads(metrics_path.read_text())
    row.update(
        official_acc=m["official"]["accuracy"], dedup_acc=m["deduplicated"]["accuracy"], ece=m["official"]["ece"]
    )
    for r in m.get("localization", {}).get("results", []):
        if (r["method"], r["layer"]) == HEATMAP:
            row.update(pointing=r["true"]["pointing"], heat_in_mask=r["true"]["mass_in_mask"])
    if "stress" in m:
        row["stress"] = {k: v["accuracy"] for k, v in m["stress"].items()}
        row["stress_min_bar"] = min(row["stress"][k] for k in BAR_STRESS if k in row["stress"])
    return row


def _fmt(values: list[float], pct: bool = True) -> str:
    if not values:
        return "-"
    scale = 100.0 if pct else 1.0
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}" if pct else f"{mean:.3f}"
    sd = statistics.stdev(values) * scale
    return f"{mean:.1f} ± {sd:.1f}" if pct else f"{mean:.3f} ± {sd:.3f}"


# Chosen on these (the run's validation carve-out) ...
VAL_COLUMNS = [
    ("val_acc", "val acc %"),
    ("val_acc_distinct", "val acc, near-duplicates once %"),
    ("val_stress_min", "val worst stress %"),
    ("val_pointing", "val pointing %"),
    ("val_heat_in_mask", "val heat in mask %"),
    ("shortfall", "shortfall"),
]
# ... and reported on the Testing split.
COLUMNS = [
    ("official_acc", "official acc %"),
    ("dedup_acc", "dup-free acc %"),
    ("ece", "ECE"),
    ("pointing", "pointing %"),
    ("heat_in_mask", "heat in mask %"),
    ("stress_min_bar", "worst bar stress acc %"),
]


def best_variant(per_variant: dict) -> str | None:
    """The variant with the lowest mean validation shortfall (ties: higher validation accuracy)."""
    scored = [
        (statistics.fmean(s["shortfall"]), -statistics.fmean(s["val_acc"]), v)
        for v, s in per_variant.items()
        if s.get("shortfall")
    ]
    return min(scored)[2] if scored else None


def median_seed(rows: list[dict], variant: str) -> dict | None:
    """The run of ``variant`` whose validation shortfall is the median of its seeds (the one to ship)."""
    runs = sorted((r for r in rows if r["variant"] == variant and "shortfall" in r), key=lambda r: r["shortfall"])
    return runs[(len(runs) - 1) // 2] if runs else None


def write_summary(out: Path, rows: list[dict], meta: dict) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    per_variant = {}
    for v in variants:
        done = [r for r in rows if r["variant"] == v and "error" not in r]
        per_variant[v] = {"runs": len(done), "train_seconds": [r["train_seconds"] for r in done]}
        for key, _ in VAL_COLUMNS + COLUMNS:
            per_variant[v][key] = [r[key] for r in done if key in r]
        stress_names = sorted({k for r in done for k in r.get("stress", {})})
        per_variant[v]["stress"] = {k: [r["stress"][k] for r in done if k in r.get("stress", {})] for k in stress_names}
    best = best_variant(per_variant)
    chosen = median_seed(rows, best) if best else None
    (out / "summary.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "runs": rows,
                "variants": per_variant,
                "best_variant": best,
                "ship": chosen["run"] if chosen else None,
            },
            indent=1,
        )
        + "\n"
    )
    shared = meta.get("carve_outs", [None])
    where = (
        f"one carve-out, split seed {shared[0]}, shared by every run"
        if len(shared) == 1 and shared[0] is not None
        else "each run's own carve-out"
    )
    lines = [
        "# Ablation: attention guidance and acquisition robustness",
        "",
        f"{meta['device']}; {meta['epochs']} epochs at {meta['image_size']} px; seeds {meta['seeds']}. "
        f"Heatmap: {HEATMAP[0]} on {HEATMAP[1]}, true class, on the masked Testing slices. Mean ± sd over seeds. "
        f"Worst stress = the lowest accuracy over all {len(BAR_STRESS)} stress tests.",
        "",
        f"Chosen by validation ({where}; shortfall = sum of the distances below "
        + ", ".join(f"{k} {v:g}" for k, v in SELECTION_BARS.items())
        + f"; lower is better). Best: **{best_variant(per_variant) or '-'}**.",
        "",
        "| variant | runs | " + " | ".join(h for _, h in VAL_COLUMNS) + " |",
        "|---" * (len(VAL_COLUMNS) + 2) + "|",
    ]
    for v, s in per_variant.items():
        cells = [_fmt(s[k], pct=(k != "shortfall")) for k, _ in VAL_COLUMNS]
        lines.append(f"| {v} | {s['runs']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Reported on Testing (not used for the choice):",
        "",
        "| variant | runs | " + " | ".join(h for _, h in COLUMNS) + " | train s |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for v, s in per_variant.items():
        cells = [_fmt(s[k], pct=(k != "ece")) for k, _ in COLUMNS]
        lines.append(f"| {v} | {s['runs']} | " + " | ".join(cells) + f" | {_fmt(s['train_seconds'], pct=False)} |")
    lines += [
        "",
        "Per run:",
        "",
        "| variant | seed | " + " | ".join(h for _, h in VAL_COLUMNS + COLUMNS) + " | train s |",
        "|---" * (len(VAL_COLUMNS) + len(COLUMNS) + 3) + "|",
    ]
    for r in rows:
        cells = [_fmt([r[k]], pct=k not in ("ece", "shortfall")) if k in r else "-" for k, _ in VAL_COLUMNS + COLUMNS]
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} |")
    stress_names = sorted({k for s in per_variant.values() for k in s["stress"]})
    if stress_names:
        lines += [
            "",
            "Accuracy (%) under each stress test:",
            "",
            "| variant | " + " | ".join(stress_names) + " |",
            "|---" * (len(stress_names) + 1) + "|",
        ]
        for v, s in per_variant.items():
            lines.append(f"| {v} | " + " | ".join(_fmt(s["stress"].get(k, [])) for k in stress_names) + " |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += [
            "",
            "Failed evaluations: " + "; ".join(f"{r['variant']} seed {r['seed']}: {r['error']}" for r in failed),
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--masks", required=True, help="brain-tumor-mri-masks folder (training guidance and localisation)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--variants", type=_csv, default=_csv("baseline,cam,strong,cam+strong"))
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=[0, 1])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--budget-min",
        type=float,
        default=0.0,
        help="stop starting runs that would end after this many minutes (0: no limit)",
    )
    p.add_argument(
        "--eval-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="CPU threads of each evaluation"
    )
    p.add_argument("--no-stress", action="store_true", help="skip the stress tests in the evaluation")
    p.add_argument("--eval-device", default="cpu", choices=["cpu", "cuda"], help="device of the evaluations")
    p.add_argument(
        "--extra-seeds",
        type=lambda s: [int(x) for x in _csv(s)],
        default=[],
        help="after the plan, train these seeds of the variant validation prefers (3+ seeds: ship the median)",
    )
    p.add_argument(
        "--train-arg",
        action="append",
        default=[],
        help="extra argument for every training run (repeatable, e.g. --train-arg=--amp=off)",
    )
    args = p.parse_args()

    plan = [(v, s) for s in args.seeds for v in args.variants]
    common = [
        "--data",
        args.data,
        "--epochs",
        str(args.epochs),
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        *args.train_arg,
    ]

    def make_config(v: str, s: int):
        out = args.out / v / f"seed{s}"
        argv = [*common, *variant_args(v, args.masks), "--out", str(out), "--seed", str(s)]
        cfg = config_from_args(get_args_parser().parse_args(argv))
        check_config(cfg)
        return cfg

    try:
        configs = [(v, s, make_config(v, s)) for v, s in plan]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda") if (args.device != "cpu" and torch.cuda.is_available()) else torch.device("cpu")
    meta = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU",
        "epochs": args.epochs,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "variants": args.variants,
        "carve_outs": sorted({carve_out_seed(vars(c)) for _, _, c in configs}),
        "command": " ".join(sys.argv),
    }
    started = time.time()
    t = time.time()
    # Decode once, with the masks, for every run (a run without guidance ignores them).
    data = load_training_data(replace(configs[0][2], masks=args.masks))
    print(f"decoded the Training split in {time.time() - t:.1f}s", flush=True)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.eval_workers)}
    rows: list[dict] = []
    pending: tuple[subprocess.Popen, Path, str, int, object] | None = None
    durations: list[float] = []

    def finish(job) -> None:
        proc, run, v, s, log = job
        proc.wait()
        log.close()
        rows.append(run_summary(run, v, s))
        write_summary(args.out, rows, {**meta, "elapsed_s": round(time.time() - started, 1)})
        print(f"evaluated {v} seed {s}: " + json.dumps({k: rows[-1].get(k) for k, _ in COLUMNS}), flush=True)

    queue, extra_added = list(configs), not args.extra_seeds
    while queue or not extra_added:
        if not queue:
            # The plan is done: more seeds of the variant that validation prefers, for the median to ship.
            extra_added = True
            done = [
                {"variant": v, "seed": s, **json.loads((Path(c.out) / "validation.json").read_text())}
                for v, s, c in configs
                if (Path(c.out) / "validation.json").is_file()
            ]
            for r in done:
                r["shortfall"] = selection_shortfall(r)
            best = best_variant(
                {
                    v: {
                        "shortfall": [r["shortfall"] for r in done if r["variant"] == v],
                        "val_acc": [r["val_acc"] for r in done if r["variant"] == v],
                    }
                    for v in dict.fromkeys(r["variant"] for r in done)
                }
            )
            if best is None:
                break
            print(f"validation prefers {best}: training seeds {args.extra_seeds} of it", flush=True)
            queue = [(best, s, make_config(best, s)) for s in args.extra_seeds]
            continue
        v, s, cfg = queue.pop(0)
        elapsed = time.time() - started
        if args.budget_min and durations and elapsed + 1.5 * statistics.fmean(durations) > args.budget_min * 60:
            print(
                f"budget: skipping {v} seed {s} and later runs ({elapsed / 60:.1f} of {args.budget_min} min used)",
                flush=True,
            )
            break
        t = time.time()
        print(f"== training {v} seed {s}", flush=True)
        train(cfg, data)
        durations.append(time.time() - t)
        val = validation_scores(load_weights(cfg.out), data, cfg)
        (Path(cfg.out) / "validation.json").write_text(json.dumps(val, indent=1) + "\n")
        print(f"validation {v} seed {s}: " + json.dumps({k: val.get(k) for k, _ in VAL_COLUMNS}), flush=True)
        if pending is not None:
            finish(pending)
        run = Path(cfg.out)
        cmd = [
            sys.executable,
            "-m",
            "tumor_xai.evaluate",
            "--data",
            args.data,
            "--weights",
            str(run),
            "--out",
            str(run / "eval"),
            "--localization",
            "--masks",
            args.masks,
            "--methods",
            HEATMAP[0],
            "--layers",
            HEATMAP[1],
            "--workers",
            str(args.eval_workers),
            "--batch-size",
            "64",
            "--device",
            args.eval_device,
        ]
        if args.no_stress:
            cmd.append("--no-stress")
        log = open(run / "eval.log", "w")
        pending = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), run, v, s, log)
    if pending is not None:
        finish(pending)
    print(f"wrote {args.out / 'summary.md'} after {(time.time() - started) / 60:.1f} min", flush=True)
    print((args.out / "summary.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
