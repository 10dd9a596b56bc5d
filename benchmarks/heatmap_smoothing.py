"""Where the drawn heatmap points, for each width of the smoothing Gaussian (``explain.smooth_heatmaps``).

    python benchmarks/heatmap_smoothing.py --data DIR --masks DIR [--weights DIR] [--sigmas 0,0.25,0.5,0.75,1]

The default map (Grad-CAM on the last block, 7 x 7 at 224 px) explains the true class of every masked
slice of the weights' validation carve-out (the set that chooses) and of the official Testing split (the
set the README reports), and is scored as the app draws it: upsampled bilinearly, then blurred with a
Gaussian of ``sigma`` feature-map cells (0: the plain bilinear map), each against the expert mask with
``tumor_xai.evaluate``'s pointing game (peak within 8 px of the tumour) and heat inside the tumour.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tumor_xai import explain as xai
from tumor_xai import inference
from tumor_xai.attention import load_training_masks
from tumor_xai.checkpoint import load_weights
from tumor_xai.data import carve_out_seed, decode_samples, discover, split_train_val
from tumor_xai.evaluate import load_masks, score_heatmap


def _plain_maps(weights, squares: np.ndarray, targets: np.ndarray, batch: int = 32) -> np.ndarray:
    """Bilinear Grad-CAM maps (no smoothing) of ``targets`` on uint8 squares."""
    maps = []
    for i in range(0, len(squares), batch):
        x = inference.to_input(squares[i : i + batch], weights.preprocess)
        maps.append(xai.explain_batch(weights.model, x, torch.from_numpy(targets[i : i + batch]), smooth=0))
    return np.concatenate(maps)


def _scores(maps: np.ndarray, masks: list[np.ndarray], sigma: float, cell: float) -> tuple[float, float]:
    drawn = xai.smooth_heatmaps(maps, cell, sigma)
    scores = [score_heatmap(m, mask) for m, mask in zip(drawn, masks, strict=True)]
    return float(np.mean([s.hit for s in scores])), float(np.mean([s.mass for s in scores]))


def _validation(weights, data: Path, masks_dir: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The masked slices of the weights' validation carve-out: squares, labels, boolean masks."""
    dataset = discover(data, splits=("Training",))
    training = weights.metadata.get("training") or {}
    size = weights.preprocess.input_size
    split = decode_samples(dataset.splits["Training"], size, skip_unreadable=True)
    _, val_idx = split_train_val(
        split.labels, split.thumbs, float(training.get("val_fraction", 0.1)), carve_out_seed(training)
    )
    found = load_training_masks(masks_dir, data, [split.paths[i] for i in val_idx], size)
    keep = val_idx[found.has_mask]
    return split.images[keep], split.labels[keep], [m > 127 for m in found.masks[found.has_mask]]


def _testing(weights, data: Path, masks_dir: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    dataset = discover(data, splits=("Testing",))
    masks = load_masks(masks_dir, dataset, "Testing")
    idx = sorted(masks)
    samples = [dataset.splits["Testing"][i] for i in idx]
    split = decode_samples(samples, weights.preprocess.input_size)
    if any(masks[i].shape != split.images.shape[1:] for i in idx):
        raise SystemExit("this benchmark scores square 224 px slices; a mask of another size was found")
    return split.images, split.labels, [masks[i] for i in idx]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--masks", required=True, type=Path)
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--sigmas", default="0,0.25,0.5,0.75,1", help="Gaussian widths in feature-map cells")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = load_weights(args.weights)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    cell = xai.layer_stride(xai.DEFAULT_LAYER)
    print(
        f"default heatmap: gradcam@{xai.DEFAULT_LAYER}, cells of {cell} px; the app draws sigma = {xai.SMOOTH_SIGMA_CELLS:g}"
    )
    for name, load in (("validation carve-out", _validation), ("official Testing", _testing)):
        start = time.perf_counter()
        squares, labels, masks = load(weights, args.data, args.masks)
        maps = _plain_maps(weights, squares, labels)
        print(f"\n{name}: {len(masks)} masked slices ({time.perf_counter() - start:.0f} s)")
        print("| sigma (cells) | pointing game | heat in mask |\n|---|---|---|")
        for sigma in sigmas:
            hit, mass = _scores(maps, masks, sigma, cell)
            mark = " (drawn)" if sigma == xai.SMOOTH_SIGMA_CELLS else ""
            print(f"| {sigma:g}{mark} | {hit:.1%} | {mass:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
