"""Batch prediction: ``python -m tumor_xai.predict PATH... --out DIR [--weights DIR] [--explain] [--method M]``.

Files and folders (searched recursively for image and DICOM files) are classified one by one into
``DIR/predictions.csv``, one row per file; with ``--explain`` each file's heatmap overlay is written to
``DIR/overlays/``. The columns are :func:`tumor_xai.report.batch_columns` (the batch tab's too). A file that cannot be read gets a row with its error and the batch goes on. Exit
status: 0 when the batch ran (even with bad files), 2 for bad arguments or unusable weights.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from tqdm import tqdm

from tumor_xai.checkpoint import WeightsError
from tumor_xai.data import IMAGE_SUFFIXES
from tumor_xai.decode import InvalidImageError
from tumor_xai.explain import DEFAULT_LAYER, DEFAULT_METHOD, METHODS
from tumor_xai.predictor import Predictor
from tumor_xai.report import batch_columns, batch_row, write_csv

__all__ = ["collect_files", "main", "run"]

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
    files = collect_files(args.paths)
    if not files:
        parser.error("no image files found under the given paths")
    ok, failed = run(files, args.out, predictor, args.explain, args.method, args.layer)
    print(f"{ok} file(s) classified, {failed} could not be read; results in {args.out / CSV_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
