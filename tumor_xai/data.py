"""The Kaggle Brain Tumor MRI folder layout: discovery, validation, decoding and the validation split.

Layout: ``<root>/Training/<class>/*`` and ``<root>/Testing/<class>/*``; class names are the sorted
folder names. Images are decoded once through :mod:`tumor_xai.decode` and :func:`~tumor_xai.preprocess.fit_square`
(the same path prediction uses) into one uint8 array that training keeps resident in memory.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from tumor_xai.decode import InvalidImageError, load_image
from tumor_xai.duplicates import group_ids, near_duplicate_pairs, thumbnail
from tumor_xai.preprocess import PreprocessConfig, to_square_u8

__all__ = [
    "IMAGE_SUFFIXES",
    "DataError",
    "DecodedSplit",
    "KaggleDataset",
    "Sample",
    "carve_out_seed",
    "decode_samples",
    "discover",
    "read_mask",
    "read_mask_table",
    "split_train_val",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm"}
SPLITS = ("Training", "Testing")


class DataError(ValueError):
    """The dataset folder is not laid out or readable as expected."""


def read_mask_table(masks_dir: str | Path) -> dict[str, Path]:
    """``masks.csv`` of a brain-tumor-mri-masks folder: image path under the data root -> its mask file."""
    masks_dir = Path(masks_dir)
    table = masks_dir / "masks.csv"
    if not table.is_file():
        raise DataError(f"No masks.csv in {masks_dir}: point --masks at the brain-tumor-mri-masks folder.")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"image", "mask"} <= set(rows[0]):
        raise DataError(f"{table} lacks the 'image' and 'mask' columns.")
    return {row["image"]: masks_dir / row["mask"] for row in rows}


def read_mask(path: Path) -> np.ndarray:
    """A tumour mask file as a boolean array (pixels above mid-grey); :class:`DataError` if unreadable."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(f"Cannot read mask {path} listed in masks.csv.")
    return mask > 127


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class KaggleDataset:
    root: Path
    class_names: list[str]
    splits: dict[str, list[Sample]]

    def fingerprint(self, split: str = "Training") -> str:
        """SHA-256 over the split's relative paths, labels and file contents."""
        h = hashlib.sha256()
        for s in self.splits[split]:
            h.update(f"{s.path.relative_to(self.root).as_posix()}|{s.label}|".encode())
            h.update(hashlib.sha256(s.path.read_bytes()).digest())
        return h.hexdigest()


@dataclass
class DecodedSplit:
    """Decoded images of one split at one input size, with their 32 x 32 duplicate thumbnails."""

    images: np.ndarray  # uint8, (N, S, S)
    labels: np.ndarray  # int64, (N,)
    thumbs: np.ndarray  # float32, (N, 32, 32)
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def discover(root: str | Path, splits: tuple[str, ...] = SPLITS) -> KaggleDataset:
    """Find the splits and classes under ``root``; raise :class:`DataError` naming what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset folder {root} does not exist (expected {root}/Training/<class>/*.jpg).")
    class_names: list[str] | None = None
    found: dict[str, list[Sample]] = {}
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"Missing split folder {split_dir} (expected {root}/{split}/<class>/*.jpg).")
        names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise DataError(f"{split_dir} has no class folders.")
        if class_names is None:
            class_names = names
        elif names != class_names:
            missing = sorted(set(class_names) ^ set(names))
            raise DataError(
                f"{split_dir} has classes {names} but {splits[0]} has {class_names}: check folder(s) {missing}."
            )
        samples: list[Sample] = []
        for label, name in enumerate(names):
            class_dir = split_dir / name
            files = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise DataError(f"Class folder {class_dir} is empty.")
            for p in files:
                if p.suffix.lower() not in IMAGE_SUFFIXES:
                    raise DataError(f"{p} is not an image file (expected one of {sorted(IMAGE_SUFFIXES)}).")
                samples.append(Sample(p, label))
        found[split] = samples
    assert class_names is not None
    return KaggleDataset(root, class_names, found)


def _decode_one(sample: Sample, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    gray = load_image(sample.path).gray
    return to_square_u8(gray, cfg)[0], thumbnail(gray)


def decode_samples(
    samples: list[Sample], size: int | PreprocessConfig, skip_unreadable: bool = False, workers: int = 4
) -> DecodedSplit:
    """Decode ``samples`` once through :func:`~tumor_xai.preprocess.to_square_u8` (``size``: the config, or
    an input size in px with the default config). An unreadable file raises :class:`DataError` naming it,
    unless ``skip_unreadable``, which leaves it out and lists it in ``skipped``."""
    cfg = size if isinstance(size, PreprocessConfig) else PreprocessConfig(input_size=size)

    def work(s: Sample):
        try:
            return _decode_one(s, cfg)
        except InvalidImageError as exc:
            if not skip_unreadable:
                raise DataError(
                    f"Unreadable image {s.path}: {exc} (pass --skip-unreadable to leave such files out)."
                ) from exc
            return exc

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(work, samples))
    keep = [(s, r) for s, r in zip(samples, results, strict=False) if not isinstance(r, Exception)]
    skipped = [(s.path, str(r)) for s, r in zip(samples, results, strict=False) if isinstance(r, Exception)]
    for path, why in skipped:
        logger.warning("skipped %s: %s", path, why)
    if not keep:
        raise DataError("No readable images left.")
    return DecodedSplit(
        images=np.stack([r[0] for _, r in keep]),
        labels=np.array([s.label for s, _ in keep], dtype=np.int64),
        thumbs=np.stack([r[1] for _, r in keep]),
        paths=[s.path for s, _ in keep],
        skipped=skipped,
    )


def carve_out_seed(training: Mapping) -> int:
    """The seed of a run's validation carve-out from its training configuration: ``split_seed`` when
    set, else ``seed`` (so runs of several training seeds can share, and be compared on, one carve-out)."""
    split_seed = training.get("split_seed")
    return int(split_seed if split_seed is not None else training.get("seed", 0))


def split_train_val(
    labels: np.ndarray, thumbs: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified train/validation indices in which near-duplicates never straddle the split.

    Near-duplicate images are grouped (see :mod:`tumor_xai.duplicates`) and whole groups go to one
    side. Groups whose members disagree on the label stay in training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(labels)
    if fraction == 0.0:
        return np.arange(n), np.arange(0)
    groups = group_ids(n, near_duplicate_pairs(thumbs))
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for label in np.unique(labels):
        members = {}
        for idx in np.flatnonzero(labels == label):
            members.setdefault(groups[idx], []).append(idx)
        pure = [g for g, idx in members.items() if np.all(labels[np.flatnonzero(groups == g)] == label)]
        rng.shuffle(pure)
        target = int(round(fraction * int(np.sum(labels == label))))
        taken = 0
        for g in pure:
            if taken >= target:
                break
            val.extend(members[g])
            taken += len(members[g])
    val_idx = np.sort(np.array(val, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return train_idx, val_idx
