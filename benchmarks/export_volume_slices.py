"""Export the axial slices of NIfTI MRI volumes that hold tumour (per their mask) as an external set.

    python benchmarks/export_volume_slices.py ../shared/data/tcia-volumes-dev .data/tcia-slices [--label glioma]

For every ``<patient>/<X>_Scan_T1.nii.gz`` with its ``<X>_Mask.nii.gz`` (the TCIA
Brain-Tumor-Progression layout), the volume is read as the app reads a scan
(:func:`tumor_xai.volume.read_volume`: canonical orientation, one window for the whole volume, square
pixels, axial slices in the training slices' radiological view) and its mask on the same grid. Slices
whose mask holds tumour are written as 8-bit PNGs with their masks and an ``index.csv`` that
``python -m tumor_xai.evaluate --external`` reads. Evaluation only: never train on them.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np

from tumor_xai.volume import read_mask, read_volume


def export(src: Path, dst: Path, label: str) -> int:
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for scan in sorted(src.glob("*/*_Scan_T1.nii.gz")):
        mask_path = scan.with_name(scan.name.replace("_Scan_T1", "_Mask"))
        if not mask_path.is_file():
            continue
        volume = read_volume(scan)
        masks = read_mask(mask_path, like=volume)
        for z, (img, m) in enumerate(zip(volume.slices, masks, strict=True)):
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
