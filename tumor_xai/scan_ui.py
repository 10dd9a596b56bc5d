"""The app's Scan tab and ``/predict_scan`` endpoint: a whole NIfTI volume or DICOM series per request.

:func:`scan_request` is the request side (no Gradio): uploaded paths in, a checked
:class:`~tumor_xai.scan.ScanPrediction` and its files (per-slice CSV, curve, overlays as JPEG files in
the app's cache folder, which the cache sweeper empties) out; every failure a client can cause is a
:class:`~tumor_xai.serve.RequestError`. :func:`scan_tab` builds the tab and :func:`scan_api` the endpoint;
``app.py`` only places them (this module imports Gradio; :mod:`tumor_xai.scan` does not). Scans run in a queue of their own, one at a time, so two large series never
hold their volumes in memory together and single-slice requests keep their slots.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio.data_classes import FileData

from tumor_xai import report, serve
from tumor_xai.inputs import InvalidImageError
from tumor_xai.predictor import Predictor
from tumor_xai.preprocess import Geometry
from tumor_xai.scan import ScanPrediction, curve_figure, scan_columns, slice_overlay, summary_markdown
from tumor_xai.volume import PLANES, read_volume

__all__ = ["MAX_TOP_K", "ScanAnswer", "browse_slice", "scan_api", "scan_request", "scan_tab"]

MAX_TOP_K = 12
SCAN_QUEUE = "scan"  # concurrency id: one scan at a time
BROWSE_FOLDER = "scans"  # the slices and Grad-CAMs a page browses, kept as long as the cache keeps files


@dataclass
class ScanAnswer:
    """A served scan: the prediction and the files made for it (paths in the cache folder)."""

    scan: ScanPrediction
    csv: str
    top: list[tuple[str, str]]  # (overlay JPEG, caption) for the most suspicious slices
    browse: dict | None  # what :func:`browse_slice` needs to draw any slice later (files in the cache)


def _options(plane: Any, top_k: Any) -> tuple[str, int]:
    if plane not in PLANES:
        raise serve.RequestError(f"plane must be one of {', '.join(PLANES)}; got {plane!r}", "Invalid option")
    try:
        k = int(top_k)
    except (TypeError, ValueError):
        k = -1
    if not 0 <= k <= MAX_TOP_K:
        raise serve.RequestError(f"top_k must be a whole number from 0 to {MAX_TOP_K}; got {top_k!r}", "Invalid option")
    return plane, k


def scan_request(
    predictor: Predictor,
    files: list[Any] | None,
    plane: Any = "axial",
    top_k: Any = 5,
    *,
    browsable: bool = False,
    progress: Callable[[float, str], None] | None = None,
) -> ScanAnswer:
    """Read the uploaded scan (one NIfTI, DICOM files of one series, or a zip), classify every slice and
    write the CSV and the top slices' overlays; failures are RequestError. With ``browsable`` the slices
    (uint8) and their Grad-CAMs go to the cache too, so :func:`browse_slice` draws any one of them on request
    without the scan staying in memory."""
    plane, k = _options(plane, top_k)
    paths = [serve.request_path(f) for f in files or []]
    if not paths:
        raise serve.RequestError("Add a NIfTI file, the DICOM files of one series, or a zip of them.", "No scan")
    report_progress = progress or (lambda fraction, text: None)

    def step(fraction: float, text: str) -> None:  # reading and the model take the first 80 %, drawing the rest
        report_progress(0.8 * fraction, text)

    try:
        step(0.0, "reading the scan")
        volume = read_volume(paths if len(paths) > 1 else paths[0], plane)
        scan = predictor.predict_volume(volume, top_k=k, progress=step)
    except InvalidImageError as exc:  # messages may name the server's temporary paths: show the names only
        message = str(exc)
        for p in paths:
            message = message.replace(p, Path(p).name)
        title = "Not assessed" if message.startswith("Not assessed") else "Cannot read this scan"
        raise serve.RequestError(message, title) from None
    csv_path = _cache_file("tumor-xai-scan-", ".csv")
    report.write_csv(csv_path, scan.rows(), scan_columns(scan.class_names))
    top = [(serve.save_jpeg(scan.overlay(i)), scan.caption(i)) for i in scan.top]
    browse = _browsable(scan) if browsable else None
    return ScanAnswer(scan, csv_path, top, browse)


def _browsable(scan: ScanPrediction) -> dict:
    """The slices (uint8) and Grad-CAMs as .npy files in the cache, with what drawing one needs (small, JSON-ready)."""
    slices = _cache_file("tumor-xai-slices-", ".npy", BROWSE_FOLDER)
    np.save(slices, np.round(scan.volume.slices * 255.0).astype(np.uint8))
    cams = _cache_file("tumor-xai-cams-", ".npy", BROWSE_FOLDER)
    np.save(cams, scan.cams.astype(np.float32))
    return {
        "slices": slices,
        "cams": cams,
        "geometry": dataclasses.asdict(scan.geometry),
        "input_size": scan.input_size,
        "assessed": [e is None for e in scan.excluded],
        "captions": [scan.caption(i) for i in range(len(scan.volume))],
    }


def browse_slice(state: dict, index: int) -> tuple[str, str]:
    """(overlay JPEG, caption) of slice ``index`` of a :func:`scan_request` answer's ``browse`` state."""
    if not 0 <= index < len(state["captions"]):
        raise serve.RequestError(f"There is no slice {index} in this scan.", "No such slice")
    try:
        gray = np.load(state["slices"], mmap_mode="r")[index].astype(np.float32) / 255.0
        cam = np.load(state["cams"], mmap_mode="r")[index] if state["assessed"][index] else None
    except (OSError, ValueError):
        raise serve.RequestError("This scan is no longer on the server; read it again.", "Scan expired") from None
    image = slice_overlay(gray, cam, Geometry(**state["geometry"]), state["input_size"])
    return serve.save_jpeg(image), state["captions"][index]


def _cache_file(prefix: str, suffix: str, folder: str | None = None) -> str:
    """A new, empty file in the cache root (Gradio serves a copy; the sweep deletes it within a minute), or in
    ``folder`` under it, where it lives the cache's full age. The file is made at once: an empty folder of its
    own could be swept before anything is written into it."""
    for _ in range(3):
        where = serve.cache_root() / folder if folder else serve.cache_root()
        where.mkdir(parents=True, exist_ok=True)
        try:
            fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=where)
        except FileNotFoundError:  # swept between mkdir and mkstemp: make it again
            continue
        os.close(fd)
        return path
    raise serve.RequestError("The server could not write to its cache folder.", "Server error")


def _curve_png(scan: ScanPrediction) -> str:
    path = _cache_file("tumor-xai-curve-", ".png")
    curve_figure(scan).savefig(path)
    return path


def scan_api(predictor: Predictor, readable: Callable) -> Callable:
    """The ``/predict_scan`` endpoint (wrapped in the app's error mapping ``readable``)."""

    @readable
    def predict_scan(
        files: list[FileData], plane: str = "axial", top_k: int = 5
    ) -> tuple[dict, list[dict], FileData, FileData, list[FileData]]:
        """A whole scan: the summary, one record per slice, the per-slice CSV, the curve (PNG) and the top_k
        most suspicious slices' overlays (JPEG). files: one NIfTI, DICOM files of one series, or a zip."""
        answer = scan_request(predictor, files, plane, top_k)
        return (
            answer.scan.summary(),
            answer.scan.rows(),
            FileData(path=answer.csv),
            FileData(path=_curve_png(answer.scan)),
            [FileData(path=p) for p, _ in answer.top],
        )

    return predict_scan


def scan_tab(predictor: Predictor, args: argparse.Namespace, readable: Callable) -> None:
    """The Scan tab: upload, plane and top-k; the curve, a slider over every slice, the top slices, the CSV."""
    gr.Markdown(
        "Drop a whole scan: a NIfTI file (`.nii`, `.nii.gz`), the DICOM files of one series (select them all), "
        "a `.zip` of them, or one multi-frame DICOM. Every slice is classified; slices with too little head or "
        "unlike the training slices are marked and left out of the summary."
    )
    files = gr.File(file_count="multiple", label="Scan files", elem_id="scan-input")
    with gr.Row():
        plane = gr.Radio(list(PLANES), value="axial", label="Plane", elem_id="scan-plane")
        top_k = gr.Slider(1, MAX_TOP_K, value=5, step=1, label="Most suspicious slices to show", elem_id="scan-top-k")
        go = gr.Button("Read the scan", variant="primary", elem_id="scan-run")
    summary = gr.Markdown(elem_id="scan-summary")
    curve = gr.Plot(label="Probability per slice", format="png", elem_id="scan-curve")
    with gr.Row():
        with gr.Column(scale=2):
            index = gr.Slider(0, 1, value=0, step=1, label="Slice", elem_id="scan-slider", visible=False)
            shown = gr.Image(label="Slice and heatmap", interactive=False, format="jpeg", elem_id="scan-slice")
            caption = gr.Markdown(elem_id="scan-caption")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Most suspicious slices", columns=3, elem_id="scan-gallery")
            csv = gr.File(label="Per-slice results (CSV)", interactive=False, elem_id="scan-csv")
    gr.Markdown(report.DISCLAIMER)
    browse = gr.State(None, time_to_live=args.cache_age)  # file paths and captions only; the scan is not kept

    @readable
    def run(uploaded, plane_value, k, progress=gr.Progress()):  # noqa: B008 (Gradio's way to ask for a progress bar)
        if not uploaded:
            return (gr.skip(),) * 8
        answer = scan_request(
            predictor, uploaded, plane_value, k, browsable=True, progress=lambda f, t: progress(f, desc=t)
        )
        n = len(answer.scan.volume)
        first = answer.scan.top[0] if answer.scan.top else n // 2
        image, text = browse_slice(answer.browse, first)
        return (
            summary_markdown(answer.scan),
            curve_figure(answer.scan),
            gr.Slider(0, max(1, n - 1), value=first, step=1, visible=True),
            image,
            text,
            answer.top,
            answer.csv,
            answer.browse,
        )

    @readable
    def show(i, state):
        if not state or i is None:
            return gr.skip(), gr.skip()
        return browse_slice(state, int(i))

    outputs = [summary, curve, index, shown, caption, gallery, csv, browse]
    listen = {"api_visibility": "private", "trigger_mode": "always_last", "concurrency_id": SCAN_QUEUE}
    for event in (files.upload, go.click, plane.change):
        event(run, [files, plane, top_k], outputs, concurrency_limit=1, **listen)
    index.change(show, [index, browse], [shown, caption], api_visibility="private", show_progress="hidden")
