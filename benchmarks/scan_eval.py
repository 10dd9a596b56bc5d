"""Slice-level screening on whole scans with tumour masks: ``python benchmarks/scan_eval.py --data DIR``.

``DIR`` holds one folder per patient with ``*_Scan_*.nii.gz`` volumes and a ``*_Mask*.nii.gz`` beside each
on the same grid (the layout of ``tcia-volumes-dev``: ``PGBM-001/Pre_Scan_T1.nii.gz`` + ``Pre_Mask.nii.gz``).
Every scan goes through :meth:`Predictor.predict_volume` (axial, as the app reads it; refusal switched off
so that every scan is scored); a slice is a tumour slice when its mask holds tumour. Over the slices the
scan assesses, it prints the screening flag's and the argmax label's sensitivity and specificity, and
whether the top-k slices hold tumour; with ``--out`` it writes ``scan_eval.json``/``.md`` and each scan's
curve (with the mask's tumour slices shaded) as ``<patient>_<scan>.png``, and ``orientation.png``: the first
scan's axial, coronal and sagittal middle slices as read, beside training slices (``--training DIR``) for the
display convention (anterior or superior up, the patient's left on the image's right).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from tumor_xai import Predictor
from tumor_xai.scan import curve_figure
from tumor_xai.volume import read_mask, read_volume


def pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """(name, scan, mask) for every ``*_Scan_*.nii.gz`` with a ``<prefix>_Mask.nii.gz`` beside it."""
    found = []
    for scan in sorted(root.glob("*/*_Scan_*.nii*")):
        prefix = scan.name.split("_Scan_")[0]
        masks = sorted(scan.parent.glob(f"{prefix}_Mask*.nii*"))
        if masks:
            found.append((f"{scan.parent.name}_{prefix}", scan, masks[0]))
    return found


def rates(flag: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    tp, fn = int((flag & truth).sum()), int((~flag & truth).sum())
    tn, fp = int((~flag & ~truth).sum()), int((flag & ~truth).sum())
    return {
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "sensitivity": tp / max(tp + fn, 1),
        "specificity": tn / max(tn + fp, 1),
    }


def orientation_figure(scan: Path, training: Path | None):
    """The scan's middle slice in each plane as read, beside up to three training slices."""
    from matplotlib.figure import Figure
    from PIL import Image

    panels = []
    for plane in ("axial", "coronal", "sagittal"):
        volume = read_volume(scan, plane)
        panels.append((f"{scan.parent.name} {plane} {len(volume) // 2}", volume.slices[len(volume) // 2]))
    for path in sorted(training.glob("*.jpg"))[:3] if training else []:
        panels.append((f"training: {path.name}", np.asarray(Image.open(path).convert("L"))))
    fig = Figure(figsize=(2.6 * len(panels), 3.0), dpi=100)
    for k, (title, image) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.imshow(image, cmap="gray", aspect="equal")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, required=True, help="folder of patient folders (e.g. ../shared/data/tcia-volumes-dev)"
    )
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default: the repository's weights/)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="folder for scan_eval.json/.md and the curves")
    p.add_argument(
        "--training", type=Path, default=None, help="a Training/<class> folder to show beside (orientation.png)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    predictor = Predictor.from_pretrained(args.weights)
    found = pairs(args.data)
    if not found:
        p.error(f"no *_Scan_*.nii.gz with a *_Mask*.nii.gz beside it under {args.data}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    per_scan, flags, labels, truths = [], [], [], []
    negative = predictor.decision.negative_index
    for name, scan_path, mask_path in found:
        volume = read_volume(scan_path)
        truth_all = read_mask(mask_path, like=volume).any(axis=(1, 2))
        scan = predictor.predict_volume(volume, top_k=args.top_k, refuse_out_of_distribution=False)
        keep = scan.included
        truth = truth_all[keep]
        flag = scan.screening_positive[keep]
        label = scan.probabilities[keep].argmax(axis=1) != negative
        top = scan.top
        row = {
            "scan": name,
            "slices": len(volume),
            "assessed": int(keep.sum()),
            "tumour_slices": int(truth.sum()),
            "tumour_slices_not_assessed": int((truth_all & ~keep).sum()),
            "flag": rates(flag, truth),
            "label": rates(label, truth),
            "top_k": top,
            "top_k_tumour": int(truth_all[top].sum()),
            "top1_is_tumour": bool(truth_all[top[0]]) if top else False,
            "max_tumor_slice": scan.summary().get("max_tumor_slice"),
        }
        per_scan.append(row)
        flags.append(flag)
        labels.append(label)
        truths.append(truth)
        if args.out:
            fig = curve_figure(scan, title=f"{name}: tumour slices (mask) shaded red")
            ax = fig.axes[0]
            pos, step = volume.positions, float(np.median(np.diff(volume.positions)))
            for i in np.flatnonzero(truth_all):
                ax.axvspan(pos[i] - step / 2, pos[i] + step / 2, color="red", alpha=0.12, lw=0)
            fig.savefig(args.out / f"{name}.png")
    flag_all = rates(np.concatenate(flags), np.concatenate(truths))
    label_all = rates(np.concatenate(labels), np.concatenate(truths))
    k = args.top_k
    lines = [
        f"weights: {predictor.weights.path.name}/; {len(found)} scans from {args.data}; threshold {predictor.threshold}",
        "",
        f"| scan | slices (assessed) | tumour slices | flag sens / spec | label sens / spec | top-{k} holding tumour | top-1 tumour? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in per_scan:
        f, lab = r["flag"], r["label"]
        lines.append(
            f"| {r['scan']} | {r['slices']} ({r['assessed']}) | {r['tumour_slices']} | "
            f"{f['tp']}/{f['tp'] + f['fn']} = {f['sensitivity']:.0%} / {f['tn']}/{f['tn'] + f['fp']} = {f['specificity']:.0%} | "
            f"{lab['sensitivity']:.0%} / {lab['specificity']:.0%} | {r['top_k_tumour']} of {len(r['top_k'])} | "
            f"{'yes' if r['top1_is_tumour'] else 'no'} |"
        )
    lines.append(
        f"| **all** | {sum(r['slices'] for r in per_scan)} ({sum(r['assessed'] for r in per_scan)}) | "
        f"{sum(r['tumour_slices'] for r in per_scan)} | "
        f"{flag_all['tp']}/{flag_all['tp'] + flag_all['fn']} = **{flag_all['sensitivity']:.1%}** / "
        f"{flag_all['tn']}/{flag_all['tn'] + flag_all['fp']} = **{flag_all['specificity']:.1%}** | "
        f"{label_all['sensitivity']:.1%} / {label_all['specificity']:.1%} | "
        f"{sum(r['top_k_tumour'] for r in per_scan)} of {sum(len(r['top_k']) for r in per_scan)} | "
        f"{sum(r['top1_is_tumour'] for r in per_scan)} of {len(per_scan)} |"
    )
    print("\n".join(lines))
    if args.out:
        orientation_figure(found[0][1], args.training).savefig(args.out / "orientation.png")
        result = {"scans": per_scan, "flag": flag_all, "label": label_all, "top_k": k, "threshold": predictor.threshold}
        (args.out / "scan_eval.json").write_text(json.dumps(result, indent=2))
        (args.out / "scan_eval.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
