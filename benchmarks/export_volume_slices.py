"""Export the axial slices of NIfTI MRI volumes that hold tumour (per their mask) as an external set.

    python benchmarks/export_volume_slices.py ../shared/data/tcia-volumes-dev .data/tcia-slices [--label glioma]

For every ``<patient>/<X>_Scan_T1.nii.gz`` with its ``<X>_Mask.nii.gz`` (the TCIA
Brain-Tumor-Progression layout), the volume is turned to the closest canonical (RAS) orientation,
windowed once for the whole volume (0.5th-99.5th percentile of the head's voxels, so slices are
comparable), resampled in plane to square pixels and cut into axial slices shown as the training
slices are (radiological view: anterior up, the patient's right on the image's left). Slices whose
mask holds tumour are written as 8-bit PNGs with their masks and an ``index.csv`` that
``python -m tumor_xai.evaluate --external`` reads. Evaluation only: never train on them.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np


def axial_slices(volume: nib.Nifti1Image, window: tuple[float, float] | None = None) -> list[np.ndarray]:
    """Canonical axial slices of ``volume``, in [0, 1], radiological view, square pixels."""
    canon = nib.as_closest_canonical(volume)
    data = np.asarray(canon.dataobj, dtype=np.float32)
    if window is None:
        head = data[data > np.percentile(data, 50) * 0.2] if (data > 0).any() else data.ravel()
        window = (float(np.percentile(head, 0.5)), float(np.percentile(head, 99.5)))
    lo, hi = window
    zooms = canon.header.get_zooms()[:3]
    out = []
    for z in range(data.shape[2]):
        img = data[:, :, z].T[::-1, ::-1]  # rows: anterior -> posterior; columns: patient's right -> left
        img = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        if zooms[0] != zooms[1]:  # columns are x (zooms[0]), rows are y (zooms[1])
            h, w = img.shape
            img = cv2.resize(img, (round(w * zooms[0] / min(zooms[:2])), round(h * zooms[1] / min(zooms[:2]))))
        out.append(img)
    return out


def export(src: Path, dst: Path, label: str) -> int:
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for scan in sorted(src.glob("*/*_Scan_T1.nii.gz")):
        mask_path = scan.with_name(scan.name.replace("_Scan_T1", "_Mask"))
        if not mask_path.is_file():
            continue
        slices = axial_slices(nib.load(scan))
        masks = [m > 0.5 for m in axial_slices(nib.load(mask_path), window=(0.0, 1.0))]
        for z, (img, m) in enumerate(zip(slices, masks, strict=True)):
            if not m.any():
                continue
            stem = f"{scan.parent.name}_{scan.name.split('_')[0]}_z{z:03d}"
            cv2.imwrite(str(dst / "images" / f"{stem}.png"), np.round(img * 255).astype(np.uint8))
            cv2.imwrite(str(dst / "masks" / f"{stem}.png"), m.astype(np.uint8) * 255)
            rows.append({"image": f"images/{stem}.png", "label": label, "mask": f"masks/{stem}.png"})
    with open(dst / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "mask"])
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="folder of <patient>/<X>_Scan_T1.nii.gz with <X>_Mask.nii.gz")
    p.add_argument("dst", type=Path)
    p.add_argument("--label", default="glioma", help="the class of the tumour slices (glioblastoma: glioma)")
    args = p.parse_args()
    n = export(args.src, args.dst, args.label)
    print(f"wrote {n} tumour slices and index.csv to {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
