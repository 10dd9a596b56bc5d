"""The dataset report: what the images look like per class and split, and where they repeat.

``python -m tumor_xai.dataset_report --data DIR --out DIR`` writes ``DIR/README.md`` with PNG figures:
image counts, a census of the files on disk (format, colour mode, size, JPEG quality), class mean
images and their differences (framing), intensity histograms and simple image-quality statistics
(source / scanner differences), and a census of byte-identical and near-identical images within
Training and across the Training/Testing split, including pictures that carry two different labels.
Every image is decoded once, through the same :func:`~tumor_xai.preprocess.fit_square` path that
training and prediction use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from tumor_xai.data import DataError, DecodedSplit, KaggleDataset, decode_samples, discover
from tumor_xai.duplicates import DEFAULT_THRESHOLD, group_ids, near_duplicate_pairs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "BLACK_LEVEL",
    "DuplicateCensus",
    "FileInfo",
    "build_report",
    "census_files",
    "get_args_parser",
    "duplicate_census",
    "image_stats",
    "jpeg_quality",
    "main",
    "nearest_mad",
]

logger = logging.getLogger(__name__)

# A pixel at or below this grey level (0-255) counts as black background.
BLACK_LEVEL = 10
DPI = 90
SPLITS = ("Training", "Testing")
# Standard JPEG luminance table (ITU T.81, Annex K) at quality 50; libjpeg scales it by quality.
_STD_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.float64,
)  # fmt: skip
STAT_LABELS = {
    "mean": "mean intensity (0-255)",
    "std": "contrast: std of intensity",
    "black": "black background fraction",
    "extent": "head box: share of the frame",
    "sharpness": "sharpness: Laplacian variance",
    "kilobytes": "file size (kB)",
    "jpeg_quality": "JPEG quality (estimated)",
}


@dataclass(frozen=True)
class FileInfo:
    """What a file on disk is, before decoding."""

    format: str
    mode: str
    width: int
    height: int
    bytes: int
    sha256: str
    jpeg_quality: float | None  # libjpeg-scale estimate from the luminance table; None if not a JPEG


@dataclass
class DuplicateCensus:
    """Byte-identical and near-identical images within Training and across the split."""

    threshold: float
    exact_train: list[list[int]]  # groups (Training indices) of byte-identical files, size >= 2
    exact_test: list[list[int]]  # groups (Testing indices) of byte-identical files, size >= 2
    exact_across: list[tuple[int, int]]  # (Testing index, Training index) with equal sha256
    near_train: list[tuple[int, int, float]]  # Training pairs i < j
    near_test: list[tuple[int, int, float]]  # Testing pairs i < j
    near_across: list[tuple[int, int, float]]  # (Testing index, Training index, MAD)
    train_groups: np.ndarray  # near-duplicate group id per Training image
    nearest: np.ndarray  # per Testing image: MAD to its nearest Training image
    nearest_index: np.ndarray  # per Testing image: index of that Training image
    nearest_other_class: np.ndarray  # per Testing image: MAD to the nearest Training image of another class

    @property
    def test_with_twin(self) -> np.ndarray:
        """Sorted Testing indices that have a near-duplicate in Training (dropped from the duplicate-free subset)."""
        return np.array(sorted({i for i, _, _ in self.near_across}), dtype=np.int64)


def jpeg_quality(img: Image.Image) -> float | None:
    """Estimate the libjpeg quality setting (1-100) from a JPEG's luminance quantisation table."""
    tables = getattr(img, "quantization", None)
    if not tables or 0 not in tables:
        return None
    # Sums make the estimate independent of the table's storage order; clamping at 1 and 255 makes it
    # approximate at the extremes, which is enough to tell sources apart.
    scale = 100.0 * float(np.sum(tables[0])) / float(_STD_LUMA.sum())
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return float(np.clip(round(quality), 1, 100))


def census_files(paths: list[Path], progress: bool = False) -> list[FileInfo]:
    """Read each file's header (format, mode, size, JPEG tables) and hash its bytes."""
    out = []
    for path in tqdm(paths, desc="census", disable=not progress, leave=False):
        data = path.read_bytes()
        try:
            with Image.open(path) as img:
                info = FileInfo(
                    format=img.format or "unknown",
                    mode=img.mode,
                    width=img.width,
                    height=img.height,
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    jpeg_quality=jpeg_quality(img) if img.format == "JPEG" else None,
                )
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"Cannot read the header of {path}: {exc}.") from exc
        out.append(info)
    return out


def image_stats(images: np.ndarray, files: list[FileInfo]) -> dict[str, np.ndarray]:
    """Per-image quality statistics of decoded uint8 images ``(N, S, S)`` and their files."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    sharp = np.array([cv2.Laplacian(im, cv2.CV_32F).var() for im in images], dtype=np.float64)
    quality = np.array([np.nan if f.jpeg_quality is None else f.jpeg_quality for f in files], dtype=np.float64)
    return {
        "mean": flat.mean(axis=1),
        "std": flat.std(axis=1),
        "black": (flat <= BLACK_LEVEL).mean(axis=1),
        "extent": _head_extent(images),
        "sharpness": sharp,
        "kilobytes": np.array([f.bytes / 1024.0 for f in files]),
        "jpeg_quality": quality,
    }


def _head_extent(images: np.ndarray, min_share: float = 0.05) -> np.ndarray:
    """Area of the box around the rows and columns that are at least ``min_share`` non-black, over the frame area."""
    fg = images > BLACK_LEVEL
    n, h, w = fg.shape

    def span(share: np.ndarray) -> np.ndarray:
        on = share >= min_share
        first = on.argmax(axis=1)
        last = on.shape[1] - 1 - on[:, ::-1].argmax(axis=1)
        return np.where(on.any(axis=1), last - first + 1, 0)

    return span(fg.mean(axis=2)) * span(fg.mean(axis=1)) / float(h * w)


def nearest_mad(
    a: np.ndarray, a_labels: np.ndarray, b: np.ndarray, b_labels: np.ndarray, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each thumbnail in ``a``: the mean absolute difference (grey levels) to its nearest thumbnail in
    ``b``, that neighbour's index, and the distance to the nearest ``b`` that carries a *different* label
    (``inf`` when there is none)."""
    ta = torch.from_numpy(np.asarray(a, dtype=np.float32).reshape(len(a), -1))
    tb = torch.from_numpy(np.asarray(b, dtype=np.float32).reshape(len(b), -1))
    la, lb = torch.from_numpy(np.asarray(a_labels)), torch.from_numpy(np.asarray(b_labels))
    dist, idx, other = [], [], []
    for s in range(0, len(ta), chunk):
        d = torch.cdist(ta[s : s + chunk], tb, p=1) / ta.shape[1]
        m = d.min(dim=1)
        dist.append(m.values)
        idx.append(m.indices)
        same = la[s : s + chunk, None] == lb[None, :]
        other.append(d.masked_fill(same, float("inf")).min(dim=1).values)
    return torch.cat(dist).numpy(), torch.cat(idx).numpy(), torch.cat(other).numpy()


def _hash_groups(files: list[FileInfo]) -> list[list[int]]:
    by_hash: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        by_hash.setdefault(f.sha256, []).append(i)
    return [g for g in by_hash.values() if len(g) > 1]


def duplicate_census(
    train: DecodedSplit,
    test: DecodedSplit,
    train_files: list[FileInfo],
    test_files: list[FileInfo],
    threshold: float = DEFAULT_THRESHOLD,
) -> DuplicateCensus:
    """Find byte-identical files (sha256) and near-identical pictures (thumbnail MAD < ``threshold``)."""
    train_index = {}
    for j, f in enumerate(train_files):
        train_index.setdefault(f.sha256, j)
    exact_across = [(i, train_index[f.sha256]) for i, f in enumerate(test_files) if f.sha256 in train_index]
    near_train = near_duplicate_pairs(train.thumbs, threshold=threshold)
    nearest, nearest_index, other = nearest_mad(test.thumbs, test.labels, train.thumbs, train.labels)
    return DuplicateCensus(
        threshold=threshold,
        exact_train=_hash_groups(train_files),
        exact_test=_hash_groups(test_files),
        exact_across=exact_across,
        near_train=near_train,
        near_test=near_duplicate_pairs(test.thumbs, threshold=threshold),
        near_across=near_duplicate_pairs(test.thumbs, train.thumbs, threshold=threshold),
        train_groups=group_ids(len(train.labels), near_train),
        nearest=nearest,
        nearest_index=nearest_index,
        nearest_other_class=other,
    )


# --------------------------------------------------------------------------------------------- figures


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend (the report is written to files, never shown), imported
    when the first figure is drawn rather than with the module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return name


def _class_colors(n: int) -> list:
    return [_pyplot().get_cmap("tab10")(i) for i in range(n)]


def plot_counts(counts: dict[str, list[int]], class_names: list[str], out: Path) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 3.5))
    x = np.arange(len(class_names))
    width = 0.38
    for k, split in enumerate(SPLITS):
        bars = ax.bar(x + (k - 0.5) * width, counts[split], width, label=split, color=("tab:blue", "tab:orange")[k])
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, class_names)
    ax.set_ylabel("images")
    ax.set_title("Images per class and split")
    ax.legend()
    ax.margins(y=0.12)
    return _save(fig, out, "counts.png")


def plot_means(means: dict[str, np.ndarray], class_names: list[str], out: Path) -> str:
    fig, axes = _pyplot().subplots(len(SPLITS), len(class_names), figsize=(2.4 * len(class_names), 2.6 * len(SPLITS)))
    axes = np.atleast_2d(axes)
    for r, split in enumerate(SPLITS):
        for c, name in enumerate(class_names):
            ax = axes[r, c]
            ax.imshow(means[split][c], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{name} ({split})", fontsize=9)
            ax.axis("off")
    fig.suptitle("Mean image per class (same grey scale for all)")
    return _save(fig, out, "class_means.png")


def plot_mean_differences(mean: np.ndarray, class_names: list[str], out: Path) -> str:
    pairs = list(combinations(range(len(class_names)), 2))
    diffs = [mean[a].astype(np.float32) - mean[b].astype(np.float32) for a, b in pairs]
    vmax = max(float(np.abs(d).max()) for d in diffs) or 1.0
    ncols = min(3, len(pairs))
    nrows = int(np.ceil(len(pairs) / ncols))
    fig, axes = _pyplot().subplots(nrows, ncols, figsize=(3.0 * ncols, 3.0 * nrows), squeeze=False)
    im = None
    for ax, (a, b), d in zip(axes.flat, pairs, diffs, strict=False):
        im = ax.imshow(d, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"{class_names[a]} − {class_names[b]}", fontsize=9)
        ax.axis("off")
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="difference of mean grey level (red: first brighter)")
    fig.suptitle("Differences between class mean images (Training), shared symmetric scale")
    return _save(fig, out, "class_mean_differences.png")


def plot_histograms(hists: dict[str, np.ndarray], class_names: list[str], out: Path) -> str:
    """``hists[split]`` is (classes, 256) pixel counts."""
    colors = _class_colors(len(class_names))
    fig, (ax_all, ax_fg) = _pyplot().subplots(1, 2, figsize=(11, 3.8))
    levels = np.arange(256)
    for split, style in zip(SPLITS, ("-", "--"), strict=False):
        for c, name in enumerate(class_names):
            h = hists[split][c].astype(np.float64)
            if h.sum() == 0:
                continue
            ax_all.plot(levels, h / h.sum(), style, color=colors[c], lw=1, label=f"{name} ({split})")
            fg = h.copy()
            fg[: BLACK_LEVEL + 1] = 0
            if fg.sum() > 0:
                ax_fg.plot(levels, fg / fg.sum(), style, color=colors[c], lw=1)
    ax_all.set_yscale("log")
    ax_all.set_title("All pixels (log scale)")
    ax_fg.set_title(f"Pixels above the background (> {BLACK_LEVEL})")
    for ax in (ax_all, ax_fg):
        ax.set_xlabel("grey level of the decoded 224 px image")
        ax.set_ylabel("fraction of pixels")
    ax_all.legend(fontsize=7, ncol=2)
    fig.suptitle("Intensity histograms per class (solid: Training, dashed: Testing)")
    return _save(fig, out, "intensity_histograms.png")


def _varies(v: np.ndarray) -> bool:
    v = v[np.isfinite(v)]
    return bool(len(v)) and float(v.max()) > float(v.min())


def plot_quality(
    stats: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray], class_names: list[str], out: Path
) -> str:
    # a statistic with one value everywhere (e.g. a JPEG quality every file shares) gets no panel
    keys = [k for k in STAT_LABELS if _varies(np.concatenate([stats[s][k] for s in SPLITS]))]
    ncols = int(np.ceil(len(keys) / 2))
    fig, axes = _pyplot().subplots(2, ncols, figsize=(4.3 * ncols, 6.5), squeeze=False)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    colors = _class_colors(len(class_names))
    for ax, key in zip(axes.flat, keys, strict=False):
        data, pos, cols = [], [], []
        for c in range(len(class_names)):
            for k, split in enumerate(SPLITS):
                v = stats[split][key][labels[split] == c]
                v = v[np.isfinite(v)]
                data.append(v if len(v) else np.array([np.nan]))
                pos.append(c * 3 + k)
                cols.append(colors[c])
        bp = ax.boxplot(
            data, positions=pos, widths=0.8, patch_artist=True, showfliers=True, flierprops={"markersize": 1.5}
        )
        for patch, col, p in zip(bp["boxes"], cols, pos, strict=False):
            patch.set_facecolor(col)
            patch.set_alpha(0.85 if p % 3 == 0 else 0.35)  # Training solid, Testing pale
        ax.set_xticks([c * 3 + 0.5 for c in range(len(class_names))], class_names, fontsize=8)
        ax.set_title(STAT_LABELS[key], fontsize=10)
        if key == "sharpness":
            ax.set_yscale("log")
    fig.suptitle("Image-quality statistics per class (left/solid box: Training, right/pale box: Testing)")
    fig.tight_layout()
    return _save(fig, out, "quality_boxplots.png")


def plot_nearest(nearest: np.ndarray, nearest_other: np.ndarray, threshold: float, out: Path) -> str:
    """Histogram (log x) of each Testing image's distance to its nearest Training image, any class and other class."""
    fig, ax = _pyplot().subplots(figsize=(7.5, 3.6))
    finite = np.concatenate([nearest, nearest_other[np.isfinite(nearest_other)]])
    positive = finite[finite > 0]
    lo = float(positive.min()) if len(positive) else threshold / 10
    hi = float(finite.max()) if len(finite) else threshold * 10
    bins = np.geomspace(lo * 0.99, max(hi, lo * 10) * 1.01, 60)
    zeros = int(np.sum(nearest == 0))
    ax.hist(
        nearest[nearest > 0],
        bins=bins,
        color="tab:gray",
        label=f"nearest Training image ({zeros} more at 0: byte-identical)",
    )
    ax.hist(nearest_other[np.isfinite(nearest_other) & (nearest_other > 0)], bins=bins, histtype="step",
            color="tab:purple", lw=1.5, label="nearest Training image with a different label")  # fmt: skip
    ax.axvline(threshold, color="tab:red", ls="--", label=f"duplicate threshold {threshold:g}")
    ax.set_xscale("log")
    ax.set_xlabel("MAD of 32 x 32 thumbnails (grey levels, log scale)")
    ax.set_ylabel("Testing images")
    ax.set_title("Distance from each Testing image to the Training set")
    ax.legend(fontsize=8)
    return _save(fig, out, "nearest_training_distance.png")


def plot_pairs(examples: list[tuple[np.ndarray, str, np.ndarray, str, str]], out: Path) -> str:
    """``examples``: (image A, caption A, image B, caption B, row title)."""
    n = max(1, len(examples))
    fig, axes = _pyplot().subplots(n, 2, figsize=(5.6, 2.9 * n), squeeze=False)
    for row, (a, cap_a, b, cap_b, title) in zip(axes, examples, strict=False):
        for ax, im, cap in zip(row, (a, b), (cap_a, cap_b), strict=False):
            ax.imshow(im, cmap="gray", vmin=0, vmax=255)
            ax.set_title(cap, fontsize=7)
            ax.axis("off")
        row[0].text(-0.06, 0.5, title, transform=row[0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    if not examples:
        axes[0, 0].text(0.5, 0.5, "no duplicate pairs found", ha="center")
        for ax in axes[0]:
            ax.axis("off")
    return _save(fig, out, "duplicate_examples.png")


# --------------------------------------------------------------------------------------------- report


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _median_iqr(v: np.ndarray, fmt: str) -> str:
    v = v[np.isfinite(v)]
    if not len(v):
        return "–"
    q1, q2, q3 = np.percentile(v, [25, 50, 75])
    return f"{q2:{fmt}} ({q1:{fmt}}–{q3:{fmt}})"


def _pick_examples(
    dup: DuplicateCensus,
    ds: KaggleDataset,
    dec: dict[str, DecodedSplit],
    files: dict[str, list[FileInfo]],
    max_examples: int,
) -> list[tuple[np.ndarray, str, np.ndarray, str, str]]:
    """Cross-class pairs first, then split-crossing pairs across the range of MAD (a byte-identical one, the
    closest and the furthest re-encoded ones, one in between), then the closest pair that is *not* counted,
    so a reader sees both sides of the threshold."""
    if max_examples <= 0:
        return []
    tr, te = dec["Training"], dec["Testing"]
    cands: list[tuple[str, int, str, int, float, str]] = []
    cands += [
        ("Testing", i, "Training", j, d, "cross-class, across split")
        for i, j, d in dup.near_across
        if te.labels[i] != tr.labels[j]
    ]
    cands += [
        ("Training", i, "Training", j, d, "cross-class, within Training")
        for i, j, d in dup.near_train
        if tr.labels[i] != tr.labels[j]
    ]
    exact = [(i, j, d) for i, j, d in dup.near_across if files["Testing"][i].sha256 == files["Training"][j].sha256]
    cands += [("Testing", i, "Training", j, d, "byte-identical, across split") for i, j, d in exact[:1]]
    reencoded = sorted(
        (p for p in dup.near_across if files["Testing"][p[0]].sha256 != files["Training"][p[1]].sha256),
        key=lambda p: p[2],
    )
    if reencoded:
        picks = sorted({0, len(reencoded) - 1, len(reencoded) // 2, (3 * len(reencoded)) // 4})
        cands += [
            ("Testing", reencoded[k][0], "Training", reencoded[k][1], reencoded[k][2], "re-encoded copy, across split")
            for k in picks
        ]
    # keep the last row for the closest pair that is not counted
    chosen = cands[: max(1, max_examples - 1)]
    above = np.flatnonzero(dup.nearest >= dup.threshold)
    if len(above) and len(chosen) < max_examples:
        i = int(above[np.argmin(dup.nearest[above])])
        chosen.append(
            ("Testing", i, "Training", int(dup.nearest_index[i]), float(dup.nearest[i]), "closest pair NOT counted")
        )
    out = []
    for sa, ia, sb, ib, d, kind in chosen:
        a, b = dec[sa], dec[sb]
        cap_a = f"{_rel(a.paths[ia], ds.root)}\n({ds.class_names[a.labels[ia]]})"
        cap_b = f"{_rel(b.paths[ib], ds.root)}\n({ds.class_names[b.labels[ib]]})"
        out.append((a.images[ia], cap_a, b.images[ib], cap_b, f"{kind}\nMAD {d:.2f}"))
    return out


def build_report(
    data: str | Path,
    out: str | Path,
    image_size: int = 224,
    threshold: float = DEFAULT_THRESHOLD,
    max_examples: int = 6,
    workers: int = 4,
    progress: bool = False,
) -> dict:
    """Analyse the dataset under ``data`` and write ``README.md``, figures and ``summary.json`` into ``out``.

    Returns the summary (also written as ``summary.json``). Raises :class:`DataError` for a bad dataset.
    """
    start = time.perf_counter()
    ds = discover(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = ds.class_names
    n_cls = len(names)

    dec: dict[str, DecodedSplit] = {}
    files: dict[str, list[FileInfo]] = {}
    for split in SPLITS:
        logger.info("decoding %d %s images at %d px", len(ds.splits[split]), split, image_size)
        dec[split] = decode_samples(ds.splits[split], image_size, workers=workers)
        files[split] = census_files(dec[split].paths, progress=progress)
    labels = {s: dec[s].labels for s in SPLITS}
    counts = {s: [int(np.sum(labels[s] == c)) for c in range(n_cls)] for s in SPLITS}

    means = {s: np.stack([dec[s].images[labels[s] == c].mean(axis=0) if counts[s][c] else np.zeros((image_size,) * 2)
                          for c in range(n_cls)]) for s in SPLITS}  # fmt: skip
    hists = {s: np.stack([np.bincount(dec[s].images[labels[s] == c].ravel(), minlength=256) for c in range(n_cls)])
             for s in SPLITS}  # fmt: skip
    stats = {s: image_stats(dec[s].images, files[s]) for s in SPLITS}
    logger.info("looking for duplicates (threshold %.2f)", threshold)
    dup = duplicate_census(dec["Training"], dec["Testing"], files["Training"], files["Testing"], threshold)

    figs = {
        "counts": plot_counts(counts, names, out),
        "means": plot_means(means, names, out),
        "diffs": plot_mean_differences(means["Training"], names, out),
        "hists": plot_histograms(hists, names, out),
        "quality": plot_quality(stats, labels, names, out),
        "nearest": plot_nearest(dup.nearest, dup.nearest_other_class, threshold, out),
        "pairs": plot_pairs(_pick_examples(dup, ds, dec, files, max_examples), out),
    }
    summary = _summarise(ds, dec, files, counts, stats, dup)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = _ReportData(ds, dec, files, counts, stats, dup, figs, summary, image_size)
    (out / "README.md").write_text(_markdown(report))
    logger.info("wrote %s in %.1f s", out / "README.md", time.perf_counter() - start)
    return summary


def _closest_cross_class(ds: KaggleDataset, tr: DecodedSplit, te: DecodedSplit, dup: DuplicateCensus) -> list | None:
    """The Testing x Training pair with different labels whose thumbnails are closest, with their MAD."""
    finite = np.flatnonzero(np.isfinite(dup.nearest_other_class))
    if not len(finite):
        return None
    i = int(finite[np.argmin(dup.nearest_other_class[finite])])
    d_all = np.abs(tr.thumbs - te.thumbs[i]).reshape(len(tr.labels), -1).mean(axis=1)
    d_all[tr.labels == te.labels[i]] = np.inf
    j = int(np.argmin(d_all))
    return [_rel(te.paths[i], ds.root), _rel(tr.paths[j], ds.root), round(float(d_all[j]), 3)]


def _exact_summary(ds: KaggleDataset, tr: DecodedSplit, te: DecodedSplit, dup: DuplicateCensus) -> dict:
    cross_train = [g for g in dup.exact_train if len({int(tr.labels[k]) for k in g}) > 1]
    cross_across = [(i, j) for i, j in dup.exact_across if te.labels[i] != tr.labels[j]]
    return {
        "training_groups": len(dup.exact_train),
        "training_redundant": int(sum(len(g) - 1 for g in dup.exact_train)),
        "testing_redundant": int(sum(len(g) - 1 for g in dup.exact_test)),
        "testing_identical_to_training": len({i for i, _ in dup.exact_across}),
        "cross_class_training": [[_rel(tr.paths[k], ds.root) for k in g] for g in cross_train],
        "cross_class_across": [[_rel(te.paths[i], ds.root), _rel(tr.paths[j], ds.root)] for i, j in cross_across],
    }


def _near_summary(ds: KaggleDataset, tr: DecodedSplit, te: DecodedSplit, dup: DuplicateCensus) -> dict:
    names, twin = ds.class_names, dup.test_with_twin
    cross_train = [(i, j, d) for i, j, d in dup.near_train if tr.labels[i] != tr.labels[j]]
    cross_across = [(i, j, d) for i, j, d in dup.near_across if te.labels[i] != tr.labels[j]]
    return {
        "training_pairs": len(dup.near_train),
        "training_images_with_twin": int(len({k for p in dup.near_train for k in p[:2]})),
        "training_redundant": int(len(tr.labels) - len(np.unique(dup.train_groups))),
        "testing_pairs": len(dup.near_test),
        "across_pairs": len(dup.near_across),
        "testing_with_training_twin": int(len(twin)),
        "testing_with_training_twin_per_class": {
            names[c]: int(np.sum(te.labels[twin] == c)) for c in range(len(names))
        },
        "duplicate_free_testing": int(len(te.labels) - len(twin)),
        "testing_with_training_twin_files": [_rel(te.paths[i], ds.root) for i in twin],
        "closest_cross_class_across": _closest_cross_class(ds, tr, te, dup),
        "cross_class_training": [
            [_rel(tr.paths[i], ds.root), _rel(tr.paths[j], ds.root), round(d, 3)] for i, j, d in cross_train
        ],
        "cross_class_across": [
            [_rel(te.paths[i], ds.root), _rel(tr.paths[j], ds.root), round(d, 3)] for i, j, d in cross_across
        ],
    }


def _median_stats(names: list[str], dec, counts, stats) -> dict:
    """Per split and class, the median of each image statistic (None where it is undefined)."""
    out: dict = {}
    for s in SPLITS:
        out[s] = {}
        for c in range(len(names)):
            if not counts[s][c]:
                continue
            sel = dec[s].labels == c
            out[s][names[c]] = {
                k: float(np.nanmedian(v[sel])) if np.any(np.isfinite(v[sel])) else None for k, v in stats[s].items()
            }
    return out


def _summarise(ds, dec, files, counts, stats, dup: DuplicateCensus) -> dict:
    """``summary.json``: counts, the duplicate census (byte-identical and near) and median image statistics."""
    tr, te = dec["Training"], dec["Testing"]
    return {
        "dataset": ds.root.name,
        "class_names": ds.class_names,
        "counts": counts,
        "training_fingerprint": ds.fingerprint("Training"),
        "threshold": dup.threshold,
        "exact": _exact_summary(ds, tr, te, dup),
        "near": _near_summary(ds, tr, te, dup),
        "median_stats": _median_stats(ds.class_names, dec, counts, stats),
    }


@dataclass
class _ReportData:
    """Everything the Markdown report is written from."""

    ds: KaggleDataset
    dec: dict[str, DecodedSplit]
    files: dict[str, list[FileInfo]]
    counts: dict[str, list[int]]
    stats: dict[str, dict[str, np.ndarray]]
    dup: DuplicateCensus
    figs: dict[str, str]
    summary: dict
    image_size: int

    @property
    def names(self) -> list[str]:
        return self.ds.class_names


def _md_intro(r: _ReportData) -> list[str]:
    return [
        "# Dataset report: Brain Tumor MRI (Kaggle layout)\n",
        f"Generated by `python -m tumor_xai.dataset_report --data <{r.ds.root.name}> --out <this folder>`. Every image was decoded once and placed on a {r.image_size} px square "
        "by the same path training and prediction use. Key numbers are also in `summary.json`. "
        f"Training fingerprint (sha256 over paths, labels and bytes): `{r.summary['training_fingerprint'][:16]}…`.\n",
    ]


def _md_counts(r: _ReportData) -> list[str]:
    tr, te = r.counts["Training"], r.counts["Testing"]
    rows = [[name, tr[c], te[c], tr[c] + te[c]] for c, name in enumerate(r.names)]
    rows.append(["**total**", sum(tr), sum(te), sum(tr) + sum(te)])
    return [
        "## 1. Images per class and split\n",
        _table(["class", "Training", "Testing", "total"], rows) + "\n",
        f"![Images per class and split]({r.figs['counts']})\n",
    ]


def _md_files(r: _ReportData) -> list[str]:
    combos: Counter = Counter()
    for s in SPLITS:
        for f in r.files[s]:
            combos[(s, f.format, f.mode, f"{f.width}×{f.height}")] += 1
    md = [
        "## 2. Files on disk\n",
        _table(["split", "format", "PIL mode", "size (W×H)", "files"], [[*k, v] for k, v in sorted(combos.items())])
        + "\n",
    ]
    rows = []
    for s in SPLITS:
        for c in range(len(r.names)):
            fl = [f for f, lab in zip(r.files[s], r.dec[s].labels, strict=False) if lab == c]
            if not fl:
                continue
            modes = Counter(f.mode for f in fl)
            kb = np.array([f.bytes / 1024 for f in fl])
            q = np.array([np.nan if f.jpeg_quality is None else f.jpeg_quality for f in fl])
            qs = Counter(int(v) for v in q[np.isfinite(q)])
            rows.append([
                s, r.names[c], ", ".join(f"{m} {n / len(fl):.0%}" for m, n in modes.most_common()),
                _median_iqr(kb, ".1f"), ", ".join(f"q{k} ×{n}" for k, n in qs.most_common(3)) or "–",
            ])  # fmt: skip
    md.append(
        _table(["split", "class", "colour mode", "file kB, median (IQR)", "JPEG quality (most common)"], rows) + "\n"
    )
    qualities = {f.jpeg_quality for s in SPLITS for f in r.files[s] if f.jpeg_quality is not None}
    note = (
        "Colour mode is how a file is stored; the decoder turns every file into one grey channel, so the model "
        "never sees it, but it follows the source collection a file came from and so differs by class. "
    )
    if len(qualities) == 1:
        note += (
            f"Every JPEG carries the same quantisation tables (quality ≈ {int(next(iter(qualities)))}): the files "
            "were all re-encoded when this copy was made, so compression level does not tell the sources apart "
            "here; file size still does, because it follows image content, size of the original and noise."
        )
    return [*md, note + "\n"]


def _md_framing(r: _ReportData) -> list[str]:
    tr = r.dec["Training"]

    def medians(key: str) -> str:
        return ", ".join(
            f"{r.names[c]} {np.median(r.stats['Training'][key][tr.labels == c]):.0%}"
            for c in range(len(r.names))
            if r.counts["Training"][c]
        )

    return [
        "## 3. Mean images and framing\n",
        f"![Mean image per class]({r.figs['means']})\n",
        f"![Differences between class mean images]({r.figs['diffs']})\n",
        "Each class has its own typical framing: how much of the frame the head fills, where it sits, which "
        "orientations and sequences dominate. Median share of the frame taken by the box around the head, in "
        f"Training: {medians('extent')}; median black-background fraction: {medians('black')}. A classifier can "
        "pick up framing instead of tumour signs; Grad-CAM heatmaps that light up the border or the background "
        "are the symptom to look for.\n",
    ]


def _md_quality(r: _ReportData) -> list[str]:
    rows = []
    for s in SPLITS:
        for c in range(len(r.names)):
            sel = r.dec[s].labels == c
            if not sel.any():
                continue
            st = r.stats[s]
            rows.append([s, r.names[c]] + [
                _median_iqr(st["mean"][sel], ".0f"), _median_iqr(st["std"][sel], ".0f"),
                _median_iqr(st["black"][sel], ".2f"), _median_iqr(st["sharpness"][sel], ".0f"),
                _median_iqr(st["extent"][sel], ".2f"), _median_iqr(st["kilobytes"][sel], ".1f"),
            ])  # fmt: skip
    return [
        "## 4. Intensity and image quality\n",
        f"![Intensity histograms]({r.figs['hists']})\n",
        "Median (interquartile range) per class, on the decoded images:\n",
        _table(["split", "class", "mean intensity", "contrast (std)", f"black fraction (≤ {BLACK_LEVEL})",
                "sharpness (Laplacian var)", "head box / frame", "file kB"], rows) + "\n",
        f"![Quality statistics]({r.figs['quality']})\n",
    ]  # fmt: skip


def _md_duplicate_totals(r: _ReportData) -> list[str]:
    ex, near, te = r.summary["exact"], r.summary["near"], r.dec["Testing"]
    rows = [
        ["byte-identical groups within Training", ex["training_groups"]],
        ["redundant byte-identical copies within Training", ex["training_redundant"]],
        ["redundant byte-identical copies within Testing", ex["testing_redundant"]],
        ["Testing files byte-identical to a Training file", ex["testing_identical_to_training"]],
        ["near-duplicate pairs within Training", near["training_pairs"]],
        ["Training images with a near-duplicate in Training", near["training_images_with_twin"]],
        ["redundant Training images (group size − 1, summed)", near["training_redundant"]],
        ["near-duplicate pairs within Testing", near["testing_pairs"]],
        ["near-duplicate pairs Testing × Training", near["across_pairs"]],
        ["**Testing images with a near-duplicate in Training (removed for the duplicate-free subset)**", f"**{near['testing_with_training_twin']}**"],
        ["**duplicate-free Testing subset**", f"**{near['duplicate_free_testing']}** of {len(te.labels)}"],
        ["cross-class pairs (near-identical, different labels) within Training", len(near["cross_class_training"])],
        ["cross-class pairs Testing × Training", len(near["cross_class_across"])],
    ]  # fmt: skip
    return [
        "## 5. Duplicates\n",
        "Two kinds: **byte-identical** files (same sha256) and **near-identical** pictures, i.e. the same slice "
        "re-encoded or re-scaled: the mean absolute difference (MAD) of their 32 × 32 thumbnails is below "
        f"{r.dup.threshold:g} grey levels (`tumor_xai.duplicates.near_duplicate_pairs`). Neighbouring slices of one "
        "patient are further apart than that and are *not* caught; the dataset has no patient IDs.\n",
        _table(["", "count"], rows) + "\n",
    ]


def _duplicates_per_class(r: _ReportData) -> list[list]:
    """Per class: Training count, extra byte copies, near-dup group members, redundant, and the Testing view."""
    dup, tr, te = r.dup, r.dec["Training"], r.dec["Testing"]
    exact_te = np.zeros(len(te.labels), bool)
    exact_te[[i for i, _ in dup.exact_across]] = True
    twin = np.zeros(len(te.labels), bool)
    twin[dup.test_with_twin] = True
    uniq, sizes = np.unique(dup.train_groups, return_counts=True)
    multi = set(uniq[sizes > 1].tolist())
    per_class = []
    for c in range(len(r.names)):
        groups_c = dup.train_groups[tr.labels == c]
        in_multi = [g for g in groups_c if g in multi]
        exact_c = sum(
            sum(1 for k in g if tr.labels[k] == c) - 1 for g in dup.exact_train if any(tr.labels[k] == c for k in g)
        )
        sel = te.labels == c
        per_class.append([
            r.names[c], r.counts["Training"][c], max(exact_c, 0), len(in_multi), len(in_multi) - len(set(in_multi)),
            r.counts["Testing"][c], int(exact_te[sel].sum()), int(twin[sel].sum()), int(sel.sum() - twin[sel].sum()),
        ])  # fmt: skip
    return per_class


def _md_duplicates_per_class(r: _ReportData, per_class: list[list]) -> list[str]:
    return [
        "Per class (Testing counts by the Testing image's label):\n",
        _table(["class", "Training", "byte-identical extra copies", "in a near-dup group", "redundant (near)",
                "Testing", "Testing = Training file (bytes)", "Testing with Training twin", "duplicate-free Testing"],
               per_class) + "\n",
        f"![Nearest Training image for each Testing image]({r.figs['nearest']})\n",
    ]  # fmt: skip


def _cross_class(r: _ReportData) -> list[tuple]:
    near = r.summary["near"]
    cross = [("Training", a, "Training", b, d) for a, b, d in near["cross_class_training"]]
    return cross + [("Testing", a, "Training", b, d) for a, b, d in near["cross_class_across"]]


def _md_cross_class(r: _ReportData, cross: list[tuple]) -> list[str]:
    ex = r.summary["exact"]
    md = ["### Cross-class duplicates: the same picture with two labels\n"]
    if cross:
        md.append("These are label conflicts; at most one of each pair can be right.\n")
        md.append(
            _table(["image A", "image B", "MAD"], [[f"`{a}`", f"`{b}`", f"{d:.2f}"] for _, a, _, b, d in cross]) + "\n"
        )
    else:
        md.append("None: no near-identical pair carries two different labels.\n")
    closest = r.summary["near"]["closest_cross_class_across"]
    if closest:
        md.append(
            f"The closest Testing × Training pair with different labels is `{closest[0]}` and `{closest[1]}` at "
            f"MAD {closest[2]:.2f} (purple curve in the figure above).\n"
        )
    if ex["cross_class_training"] or ex["cross_class_across"]:
        groups = ex["cross_class_training"] + ex["cross_class_across"]
        md.append("Byte-identical among them: " + "; ".join(" = ".join(f"`{p}`" for p in g) for g in groups) + "\n")
    return md + [
        "### Example pairs\n",
        "Duplicate pairs from across the range of MAD; the last row is the closest Testing × Training pair that is "
        "*not* counted, for comparison: typically a neighbouring slice or another acquisition, not a copy.\n",
        f"![Example duplicate pairs]({r.figs['pairs']})\n",
    ]


def _md_meaning(r: _ReportData, per_class: list[list], cross: list[tuple]) -> list[str]:
    ex, near = r.summary["exact"], r.summary["near"]
    tw, nte = near["testing_with_training_twin"], len(r.dec["Testing"].labels)
    twin_per_class = near["testing_with_training_twin_per_class"]
    worst = max(twin_per_class, key=twin_per_class.get)
    worst_n = r.counts["Testing"][r.names.index(worst)]
    redundant = {row[0]: row[4] for row in per_class}
    most = max(redundant, key=redundant.get)
    md = [
        "## 6. What this means\n",
        f"- **Leakage across the split.** {tw} of {nte} Testing images ({tw / max(nte, 1):.0%}) are the same picture "
        f"as a Training image ({ex['testing_identical_to_training']} of them byte for byte); for {worst} it is "
        f"{twin_per_class[worst]} of {worst_n}. A model that memorises its training set gets those right for free, so "
        "accuracy on the official Testing split is optimistic. Report it only beside accuracy on the "
        f"duplicate-free subset ({near['duplicate_free_testing']} images; the removed files are listed in "
        "`summary.json`). Even that subset can hold neighbouring slices of a training patient, which no image "
        "comparison can rule out without patient IDs.\n",
        f"- **Duplicates inside Training.** {near['training_redundant']} Training images are redundant copies, "
        f"{redundant[most]} of them in {most}: that class holds fewer distinct pictures than its count says, and "
        "its repeated pictures weigh more in training. A random validation split would leak them too; "
        "`tumor_xai.data.split_train_val` keeps each near-duplicate group on one side.\n",
    ]
    if cross:
        md.append(
            f"- **Label conflicts.** {len(cross)} near-identical pairs carry two labels: label noise in training, "
            "and a case no model can get right in testing.\n"
        )
    else:
        md.append(
            "- **Label conflicts.** No picture appears under two labels, so the duplicates inflate scores but do "
            "not contradict each other.\n"
        )
    md.append(
        "- **Framing and source differences.** The classes come from different collections (per the dataset's "
        "description: figshare for most glioma, meningioma and pituitary slices, SARTAJ, and Br35H for the "
        "no-tumour ones), and it shows: in the class mean images and their differences, the black-background "
        "fraction and head box (framing), the storage mode, the sharpness (resolution of the original) and file "
        "size, and the intensity histograms. A model can learn *which collection* an image came from instead of "
        "*whether it shows a tumour*. The shared preprocessing pads every image to a centred square and "
        "stretches its 1st–99th intensity percentiles per image, which removes global brightness and contrast "
        "differences but not framing, resolution or texture; the Grad-CAM heatmaps, checked against the expert "
        "tumour masks where they exist, are how to see whether the model looks at the tumour or at the frame.\n"
    )
    return md


def _markdown(r: _ReportData) -> str:
    """The report's ``README.md``, built section by section."""
    per_class, cross = _duplicates_per_class(r), _cross_class(r)
    sections = [
        _md_intro(r),
        _md_counts(r),
        _md_files(r),
        _md_framing(r),
        _md_quality(r),
        _md_duplicate_totals(r),
        _md_duplicates_per_class(r, per_class),
        _md_cross_class(r, cross),
        _md_meaning(r, per_class, cross),
    ]
    return "\n".join(line for section in sections for line in section)


# --------------------------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tumor_xai.dataset_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset root with Training/<class>/ and Testing/<class>/")
    p.add_argument("--out", required=True, help="folder for README.md, the PNG figures and summary.json")
    p.add_argument("--image-size", type=int, default=224, help="decode size in px (default 224)")
    p.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD, help="near-duplicate MAD threshold in grey levels"
    )
    p.add_argument("--max-examples", type=int, default=6, help="duplicate pairs to show side by side (default 6)")
    p.add_argument("--workers", type=int, default=4, help="decoding threads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.max_examples < 0 or args.image_size < 8 or args.threshold <= 0:
        print("error: --max-examples must be >= 0, --image-size >= 8 and --threshold > 0", file=sys.stderr)
        return 2
    try:
        summary = build_report(
            args.data, args.out, args.image_size, args.threshold, args.max_examples, args.workers, progress=True
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    near = summary["near"]
    print(
        f"wrote {Path(args.out) / 'README.md'}: {sum(summary['counts']['Training'])} Training, "
        f"{sum(summary['counts']['Testing'])} Testing images; {near['testing_with_training_twin']} Testing images "
        f"have a near-duplicate in Training; {len(near['cross_class_training']) + len(near['cross_class_across'])} "
        "cross-class pairs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
