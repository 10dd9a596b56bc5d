"""Batch prediction: ``python -m tumor_xai.predict PATH... --out DIR [--weights DIR] [--explain] [--method M]``.

Files and folders (searched recursively for image and DICOM files) are classified one by one into
``DIR/predictions.csv``, one row per file; with ``--explain`` each file's heatmap overlay is written to
``DIR/overlays/``. The columns are :func:`tumor_xai.report.batch_columns` (the batch tab's too). A file that
cannot be read gets a row with its error and the batch goes on.

Scans: a NIfTI file (``.nii``, ``.nii.gz``), a ``.zip`` of DICOM files, and a folder whose DICOM files form
one series are each read as one volume (:func:`tumor_xai.volume.read_volume`: one window, slices in
anatomical order), and :func:`tumor_xai.scan.write_scan` writes ``DIR/<scan>/slices.csv`` (one row per slice,
with its index and position), ``curve.png``, ``summary.json`` and the ``--top-k`` overlays in ``top/``.

Exit status: 0 when the batch ran (even with bad files or refused scans), 2 for bad arguments or unusable weights.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import zipfile
from pathlib import Path

from tqdm import tqdm

from tumor_xai.checkpoint import WeightsError
from tumor_xai.data import IMAGE_SUFFIXES
from tumor_xai.decode import InvalidImageError
from tumor_xai.explain import DEFAULT_LAYER, DEFAULT_METHOD, METHODS
from tumor_xai.predictor import Predictor
from tumor_xai.report import batch_columns, batch_row, write_csv
from tumor_xai.volume import PLANES, is_nifti

__all__ = ["collect_files", "collect_inputs", "main", "run", "run_scans"]

logger = logging.getLogger(__name__)

CSV_NAME = "predictions.csv"
OVERLAY_DIR = "overlays"


def collect_files(paths: list[Path]) -> list[Path]:
    """Named files as given (whatever their suffix) plus image files found under named folders, sorted.

    A path that does not exist is kept, so that it gets a row saying so.
    """
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(
                sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
                )
            )
        else:
            files.append(p)
    return files


def _one_series(folder: Path) -> bool:
    """Whether the DICOM files under ``folder`` (two or more) all belong to one series."""
    from tumor_xai.dicom import series_uid

    uids = [series_uid(f) for f in sorted(folder.rglob("*")) if f.is_file() and not f.name.startswith(".")]
    found = [u for u in uids if u is not None]
    return len(found) >= 2 and len(set(found)) == 1


def collect_inputs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(scans, single files): NIfTI files, zip archives and folders whose DICOM files form one series are
    scans; everything else goes to :func:`collect_files` (a scan folder's other image files included)."""
    scans, singles = [], []
    for p in paths:
        if p.is_file() and (is_nifti(p) or zipfile.is_zipfile(p)):
            scans.append(p)
        elif p.is_dir() and _one_series(p):
            scans.append(p)
            singles.extend(f for f in collect_files([p]) if f.suffix.lower() != ".dcm" and not _is_dicom(f))
        else:
            singles.extend(collect_files([p]))
    return scans, singles


def _is_dicom(path: Path) -> bool:
    from tumor_xai.dicom import looks_like_dicom

    with open(path, "rb") as f:
        return looks_like_dicom(f.read(132))


def _scan_name(path: Path, taken: set[str]) -> str:
    stem = path.name
    for suffix in (".gz", ".nii", ".zip"):
        stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:80] or "scan"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return name


def run_scans(scans: list[Path], out: Path, predictor: Predictor, plane: str, top_k: int) -> tuple[int, int]:
    """Read and classify each scan into ``out/<scan>/``; returns (scans read, scans refused or unreadable)."""
    from tumor_xai.scan import write_scan

    ok, failed, taken = 0, 0, set()
    for path in scans:
        try:
            scan = predictor.predict_volume(path, plane, top_k)
        except InvalidImageError as exc:
            failed += 1
            print(f"{path}: {exc}")
            continue
        folder = out / _scan_name(path, taken)
        write_scan(scan, folder, title=path.name)
        s = scan.summary()
        best = (
            f"highest tumour probability {s['max_tumor_probability']:.1%} at slice {s['max_tumor_slice']} "
            f"({s['max_tumor_position_mm']:.1f} mm), {len(s.get('slices_over_threshold', []))} over the threshold"
            if "max_tumor_probability" in s
            else "no tumour probability"
        )
        print(f"{path}: {s['slices']} {plane} slices, {s['slices_assessed']} assessed; {best} -> {folder}/")
        for note in s["notes"]:
            print(f"  note: {note}")
        ok += 1
    return ok, failed


def _overlay_name(index: int, path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:80] or "image"
    return f"{index:05d}_{stem}.png"


def run(files: list[Path], out: Path, predictor: Predictor, explain: bool, method: str, layer: str) -> tuple[int, int]:
    """Classify ``files`` into ``out``; returns (files read, files that failed)."""
    out.mkdir(parents=True, exist_ok=True)
    if explain:
        (out / OVERLAY_DIR).mkdir(exist_ok=True)
    names = predictor.class_names
    failed = 0

    def rows():
        nonlocal failed
        for i, path in enumerate(tqdm(files, desc="predicting", unit="file")):
            try:
                pred = predictor.predict(path, explain=explain, method=method, layer=layer)
            except InvalidImageError as exc:
                failed += 1
                yield batch_row(str(path), names, None, error=str(exc))
                continue
            overlay = ""
            if explain and pred.overlay is not None:  # out of distribution: no heatmap
                overlay = str(out / OVERLAY_DIR / _overlay_name(i, path))
                pred.overlay.save(overlay)
            yield batch_row(str(path), names, pred, overlay=overlay)

    write_csv(out / CSV_NAME, rows(), batch_columns(names))
    return len(files) - failed, failed


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tumor_xai.predict",
        description="Classify MRI slices into a CSV (research demo, not a diagnostic device).",
    )
    p.add_argument("paths", nargs="+", type=Path, help="image/DICOM files or folders (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help=f"output folder for {CSV_NAME} (and overlays/)")
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default: the repository's weights/)")
    p.add_argument("--explain", action="store_true", help="also write a heatmap overlay PNG per file")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help="explanation method for --explain")
    p.add_argument("--layer", default=DEFAULT_LAYER, help="target layer for --explain (e.g. layer4, layer3, layer4.0)")
    p.add_argument("--plane", default="axial", choices=PLANES, help="slices of a scan (NIfTI, DICOM series)")
    p.add_argument("--top-k", type=int, default=5, help="overlays written for a scan's most suspicious slices")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    try:
        predictor = Predictor.from_pretrained(args.weights)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        predictor.check_options(args.method, layer=args.layer)
    except ValueError as exc:
        parser.error(str(exc))
    if args.top_k < 0:
        parser.error("--top-k must be 0 or more")
    scans, files = collect_inputs(args.paths)
    if not files and not scans:
        parser.error("no image files or scans found under the given paths")
    if scans:
        ok, failed = run_scans(scans, args.out, predictor, args.plane, args.top_k)
        print(f"{ok} scan(s) classified, {failed} refused or unreadable; results in {args.out}/")
    if files:
        ok, failed = run(files, args.out, predictor, args.explain, args.method, args.layer)
        print(f"{ok} file(s) classified, {failed} could not be read; results in {args.out / CSV_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
