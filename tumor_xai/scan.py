"""What the model says about a whole scan: per-slice probabilities, the summary, the curve and the files.

:meth:`tumor_xai.predictor.Predictor.predict_volume` returns a :class:`ScanPrediction`; the app's Scan
tab, the ``/predict_scan`` endpoint and ``python -m tumor_xai.predict scan.nii.gz --out DIR`` all show
or write what is here: one record per slice (:meth:`ScanPrediction.rows`, the CSV's rows), the summary
(:meth:`ScanPrediction.summary`), the tumour-probability curve (:func:`curve_figure`) and the overlays
of the most suspicious slices.

Slices with too little head or flagged out of distribution are kept in the records, marked, and left
out of the summary, the curve's line and the top slices.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tumor_xai import explain as xai
from tumor_xai.preprocess import Geometry
from tumor_xai.report import write_csv
from tumor_xai.volume import Volume

__all__ = [
    "MIN_HEAD_AREA",
    "ScanPrediction",
    "curve_figure",
    "scan_columns",
    "slice_overlay",
    "summary_markdown",
    "write_scan",
]

logger = logging.getLogger(__name__)

# A slice whose head covers less of the model's square than this (the top of the skull, the neck) is
# not assessed: too little of the brain to say anything about.
MIN_HEAD_AREA = 0.05


@dataclass
class ScanPrediction:
    """Per-slice answers for a :class:`~tumor_xai.volume.Volume`, and the summary over the slices that count."""

    volume: Volume
    class_names: list[str]
    probabilities: np.ndarray  # (N, K) calibrated, in the weights' class order
    tumor_probability: np.ndarray | None  # (N,) 1 - P(negative class); None without one
    threshold: float | None  # the screening threshold stored with the weights
    excluded: list[str | None]  # per slice: None when it counts, else why it does not
    cams: np.ndarray  # (N, h, w) Grad-CAM of each slice's predicted class, at the last block's resolution
    geometry: Geometry  # how a slice sits in the model's square (every slice has the same size)
    input_size: int
    top: list[int]  # the most suspicious slices that count, highest tumour probability first
    negative_class: str | None = None  # the class whose complement is "tumour" (from the weights)

    @property
    def labels(self) -> list[str]:
        return [self.class_names[i] for i in self.probabilities.argmax(axis=1)]

    @property
    def included(self) -> np.ndarray:
        return np.array([e is None for e in self.excluded], dtype=bool)

    @property
    def screening_positive(self) -> np.ndarray | None:
        if self.tumor_probability is None or self.threshold is None:
            return None
        return self.tumor_probability >= self.threshold

    def heatmap(self, index: int) -> np.ndarray:
        """Slice ``index``'s Grad-CAM (its predicted class) on the slice's own pixels, float32 in [0, 1]."""
        heat = xai.drawn_heatmaps(self.cams[index : index + 1], self.input_size)[0]
        return np.clip(self.geometry.to_original(heat), 0.0, 1.0).astype(np.float32)

    def overlay(
        self, index: int, colormap: str = xai.DEFAULT_COLORMAP, alpha: float = xai.DEFAULT_ALPHA
    ) -> Image.Image:
        """Slice ``index`` with its heatmap; an excluded slice is shown without one."""
        cam = None if self.excluded[index] is not None else self.cams[index]
        return slice_overlay(self.volume.slices[index], cam, self.geometry, self.input_size, colormap, alpha)

    def caption(self, index: int) -> str:
        """One line about slice ``index``: where it is and what the model says (or why it does not)."""
        where = f"slice {index} ({self.volume.positions[index]:.1f} mm)"
        if self.excluded[index] is not None:
            return f"{where}: not assessed, {self.excluded[index]}"
        tumor = "" if self.tumor_probability is None else f", tumour {self.tumor_probability[index]:.0%}"
        label = self.labels[index]
        return f"{where}: {label} {self.probabilities[index].max():.0%}{tumor}"

    def rows(self) -> list[dict[str, Any]]:
        """One record per slice, in slice order (the CSV's rows; :func:`scan_columns` names the keys)."""
        positive = self.screening_positive
        out = []
        for i in range(len(self.volume)):
            counted = self.excluded[i] is None  # a slice not assessed gets no verdict: every figure null
            tumor = None if self.tumor_probability is None or not counted else float(self.tumor_probability[i])
            out.append(
                {
                    "slice": i,
                    "position_mm": float(self.volume.positions[i]),
                    "label": self.labels[i] if counted else None,
                    **{
                        f"p_{c}": float(p) if counted else None
                        for c, p in zip(self.class_names, self.probabilities[i], strict=True)
                    },
                    "tumor_probability": tumor,
                    "screening_positive": None if positive is None or not counted else bool(positive[i]),
                    "assessed": counted,
                    "not_assessed_reason": self.excluded[i],
                    "top_rank": self.top.index(i) + 1 if i in self.top else None,
                }
            )
        return out

    def summary(self) -> dict[str, Any]:
        """The scan in a few numbers, over the slices that count (JSON-ready)."""
        keep = self.included
        out: dict[str, Any] = {
            "slices": len(self.volume),
            "slices_assessed": int(keep.sum()),
            "slices_little_head": sum(1 for e in self.excluded if e is not None and e.startswith("too little head")),
            "slices_out_of_distribution": sum(
                1 for e in self.excluded if e is not None and not e.startswith("too little head")
            ),
            "plane": self.volume.plane,
            "screening_threshold": self.threshold,
            "top_slices": [int(i) for i in self.top],
            "notes": list(self.volume.notes),
        }
        if self.tumor_probability is not None and keep.any():
            idx = np.flatnonzero(keep)
            best = int(idx[np.argmax(self.tumor_probability[idx])])
            out.update(
                max_tumor_probability=float(self.tumor_probability[best]),
                max_tumor_slice=best,
                max_tumor_position_mm=float(self.volume.positions[best]),
            )
        positive = self.screening_positive
        if positive is not None:
            over = np.flatnonzero(positive & keep)
            out["slices_over_threshold"] = [int(i) for i in over]
            out["most_likely_class_over_threshold"] = self._class_over(over)
        return out

    def _class_over(self, slices: np.ndarray) -> str | None:
        """The tumour class with the highest mean probability over ``slices`` (None for none)."""
        if not len(slices):
            return None
        mean = self.probabilities[slices].mean(axis=0)
        if self.negative_class is not None:
            mean[self.class_names.index(self.negative_class)] = -1.0
        return self.class_names[int(np.argmax(mean))]


def slice_overlay(
    gray: np.ndarray,
    cam: np.ndarray | None,
    geometry: Geometry,
    input_size: int,
    colormap: str = xai.DEFAULT_COLORMAP,
    alpha: float = xai.DEFAULT_ALPHA,
) -> Image.Image:
    """A slice (H x W in [0, 1]) with its low-resolution Grad-CAM ``cam`` drawn on it; ``None``: the slice alone."""
    if cam is None:
        return Image.fromarray(np.round(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)).convert("RGB")
    heat = xai.drawn_heatmaps(cam[None], input_size)[0]
    heat = np.clip(geometry.to_original(heat), 0.0, 1.0).astype(np.float32)
    return xai.overlay(np.asarray(gray, dtype=np.float32), heat, colormap, alpha)


def scan_columns(class_names: list[str]) -> list[str]:
    """The per-slice CSV's columns (:meth:`ScanPrediction.rows`' keys)."""
    return [
        "slice",
        "position_mm",
        "label",
        *(f"p_{c}" for c in class_names),
        "tumor_probability",
        "screening_positive",
        "assessed",
        "not_assessed_reason",
        "top_rank",
    ]


def summary_markdown(scan: ScanPrediction) -> str:
    """The summary in words, for the Scan tab."""
    s = scan.summary()
    lines = [
        f"**{s['slices']} {s['plane']} slices**, {s['slices_assessed']} assessed"
        + (
            f" ({s['slices_little_head']} with too little head and {s['slices_out_of_distribution']} out of "
            "distribution left out)"
            if s["slices_assessed"] < s["slices"]
            else ""
        )
        + "."
    ]
    if "max_tumor_probability" in s:
        lines.append(
            f"**Highest tumour probability: {s['max_tumor_probability']:.1%}** at slice {s['max_tumor_slice']} "
            f"({s['max_tumor_position_mm']:.1f} mm)."
        )
    if "slices_over_threshold" in s:
        over = s["slices_over_threshold"]
        if over:
            lines.append(
                f"**{len(over)} slice(s) over the screening threshold** ({s['screening_threshold']:.3g}): "
                f"{_ranges(over)}; most likely class over them: **{s['most_likely_class_over_threshold']}**."
            )
        else:
            lines.append(
                f"No slice is over the screening threshold ({s['screening_threshold']:.3g}). This does not rule a tumour out."
            )
    lines.append(
        "The threshold was chosen on single validation slices to miss few tumours, so it also flags many slices "
        "without one; the heatmaps show where the model looked, not where a tumour is."
    )
    lines.extend(f"_Note: {n}_" for n in s["notes"])
    return "\n\n".join(lines)


def _ranges(indices: list[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def curve_figure(scan: ScanPrediction, title: str | None = None):
    """The per-slice curve: tumour probability (bold) and each class against slice position, the screening
    threshold dashed, slices not assessed shaded grey, the top slices marked. A matplotlib Figure."""
    # A Figure without pyplot: no global state, safe in a server's threads. Imported here, where a curve is
    # drawn, so that importing the package (and starting the app) does not pay for matplotlib.
    from matplotlib.figure import Figure

    pos = scan.volume.positions
    keep = scan.included
    fig = Figure(figsize=(8, 3.6), dpi=100)
    ax = fig.add_subplot()
    for i in np.flatnonzero(~keep):
        ax.axvspan(pos[i] - 0.5 * _step(pos), pos[i] + 0.5 * _step(pos), color="0.88", lw=0)
    for k, name in enumerate(scan.class_names):
        ax.plot(pos, np.where(keep, scan.probabilities[:, k], np.nan), lw=1, alpha=0.8, label=f"P({name})")
    if scan.tumor_probability is not None:
        tumor = np.where(keep, scan.tumor_probability, np.nan)
        ax.plot(pos, tumor, color="black", lw=2.2, label="tumour probability")
        if scan.top:
            ax.plot(
                pos[scan.top], scan.tumor_probability[scan.top], "o", mfc="none", mec="red", ms=9, label="top slices"
            )
    if scan.threshold is not None:
        ax.axhline(scan.threshold, color="red", ls="--", lw=1, label=f"screening threshold {scan.threshold:.3g}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"{scan.volume.plane} slice position (mm); grey: not assessed")
    ax.set_ylabel("probability")
    ax.set_title(title or f"{len(scan.volume)} {scan.volume.plane} slices")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def _step(positions: np.ndarray) -> float:
    return float(np.median(np.abs(np.diff(positions)))) if len(positions) > 1 else 1.0


def write_scan(scan: ScanPrediction, out: Path, title: str | None = None) -> dict[str, Path]:
    """Write ``slices.csv``, ``curve.png``, ``summary.json`` and ``top/NN_slice_III.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "slices.csv", "curve": out / "curve.png", "summary": out / "summary.json"}
    write_csv(paths["csv"], scan.rows(), scan_columns(scan.class_names))
    curve_figure(scan, title).savefig(paths["curve"])
    (out / "top").mkdir(exist_ok=True)
    for rank, i in enumerate(scan.top, start=1):
        scan.overlay(i).save(out / "top" / f"{rank:02d}_slice_{i:03d}.png")
    paths["summary"].write_text(json.dumps(scan.summary(), indent=2))
    return paths
