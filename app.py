"""tumor-xai in a browser: the page and the API wired to one :class:`tumor_xai.Predictor` (errors as ``gr.Error``).

Requests, files and text live in :mod:`tumor_xai.serve` and :mod:`tumor_xai.report`. ``import app`` builds
``app.demo`` without launching it; ``python app.py`` serves it at Gradio's own ``GRADIO_SERVER_NAME``,
``GRADIO_SERVER_PORT`` and ``GRADIO_SHARE`` (as a Space sets them) unless flags say otherwise.
"""

from __future__ import annotations

import logging
import os
import sys

# Before gradio is imported: no telemetry and no version check (both call out to the internet).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Gradio's queue rebuilds a pandas table of every recorded event (up to 10 000) after each job, for a
# monitoring page this app does not use: 1 ms of CPU per answer after 1000 answers, 4 ms after 10 000.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**9))
# Before numpy is imported: OpenBLAS's own threads keep spinning after a call (EigenCAM's SVD) and halve
# the speed of the predictions running beside them; the server's cores already go to predictions.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from tumor_xai import Predictor, WeightsError, serve  # noqa: E402

if __name__ == "__main__":
    # Before gradio is imported (seconds of CPU): its temporary folder, and the weights, so that a missing or
    # damaged folder stops start-up at once with what to do.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    CACHE = serve.private_cache_dir()  # before gradio reads GRADIO_TEMP_DIR; deleted at exit
    ARGS = serve.get_args_parser().parse_args()
    serve.prepare_process(CACHE, ARGS.concurrency)
    try:
        PREDICTOR = Predictor.from_pretrained(ARGS.weights)
    except WeightsError as exc:
        print(f"app.py: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

import argparse  # noqa: E402
import functools  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
from gradio.data_classes import FileData  # noqa: E402

from tumor_xai import Prediction, report, scan_ui  # noqa: E402
from tumor_xai import explain as xai  # noqa: E402
from tumor_xai.serve import get_args_parser  # noqa: E402

__all__ = ["PREDICTED", "build_demo", "demo", "get_args_parser"]

logger = logging.getLogger("tumor_xai.app")

REPO = Path(__file__).resolve().parent
PREDICTED = "predicted"  # the target-class choice meaning "explain whatever the model predicted"
FAST_METHODS = [m for m in xai.METHODS if m not in xai.SLOW_METHODS]
# The About tab is prose: Gradio's Markdown breaks table cells anywhere ("1311" became "131 / 1") and keeps
# the line breaks of inline code, which then filled a line of its own in the middle of a sentence.
CSS = """
#about table, #about td, #about th { word-break: normal; overflow-wrap: normal; }
#about code { display: inline; white-space: normal; overflow-wrap: anywhere; }
"""
# Unexpected errors reach the page as words, never a stack trace; no server-side rendering, no MCP server,
# and no browser-side run history (uploaded slices stay out of the browser's storage).
LAUNCH = {"show_error": False, "ssr_mode": False, "mcp_server": False, "run_history": False, "css": CSS}


# ----------------------------------------------------------------------------- request handling


# The record (Prediction.to_dict, one batch row): label, p_<class>, tumor_probability, screening_positive, ...
Record = dict[str, str | float | bool | None]


def _readable(fn):
    """Every failure reaches the client with words: RequestError as it says, anything else logged and named."""
    # gr.api reads the return hint as it is, and `from __future__ import annotations` leaves it a string
    # ("1st: Any" in view_api): resolve the hints once, here, for every handler.
    fn.__annotations__ = typing.get_type_hints(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except serve.RequestError as exc:
            raise gr.Error(exc.message, title=exc.title, print_exception=False) from None
        except gr.Error:
            raise
        except Exception:
            logger.exception("request failed")
            raise gr.Error("The server failed on this request; the error was logged.", title="Server error") from None

    return wrapper


def _page(pred: Prediction, screening: dict) -> tuple:
    """(label, summary, original, overlay, details) for the page."""
    if not pred.in_distribution:
        gr.Warning(f"Not assessed: {pred.ood_reason or 'outside the training data'}", title="Out of distribution")
    overlay = serve.save_jpeg(pred.overlay) if pred.in_distribution else None
    original = serve.save_jpeg(serve.slice_image(pred))
    return report.label_data(pred), report.summary_markdown(pred, screening), original, overlay, pred.to_dict()


# ----------------------------------------------------------------------------- the handlers


def _request(predictor: Predictor, file: Any, method: str, target: str, alpha: float, allowed: list[str]) -> Prediction:
    options = serve.request_options(method, target, alpha, allowed, PREDICTED)
    return serve.predict_request(predictor, serve.request_path(file), **options)


def _handlers(predictor: Predictor, args: argparse.Namespace) -> SimpleNamespace:
    """What the page calls, each a thin layer over :mod:`tumor_xai.serve`; with the API's (:func:`_api`)."""
    screening = predictor.weights.metadata.get("screening") or {}
    methods = list(xai.METHODS)

    @_readable
    def analyze(file: Any, method: str, target: str, alpha: float):
        """The page's first answer; a slow method's heatmap follows from `explain_slow`, in its own queue."""
        if not file:  # the input was cleared: leave the last result in place
            return (gr.skip(),) * 6
        if method in xai.SLOW_METHODS:
            return *_page(serve.predict_request(predictor, serve.request_path(file)), screening), file
        return *_page(_request(predictor, file, method, target, alpha, methods), screening), file

    @_readable
    def explain_slow(file: str | None, method: str, target: str, alpha: float):
        if not file or method not in xai.SLOW_METHODS:
            return (gr.skip(),) * 5
        return _page(_request(predictor, file, method, target, alpha, methods), screening)

    @_readable
    def batch_page(files: list[Any] | None, method: str, alpha: float):
        options = serve.request_options(method, None, alpha, FAST_METHODS, PREDICTED)
        _, rows, overlays, csv_path = serve.batch_request(predictor, files, options, args.max_batch)
        names = list(predictor.class_names)
        return (
            {"headers": report.batch_table_headers(names), "data": report.batch_table(rows, names)},
            overlays,
            csv_path,
        )

    return SimpleNamespace(analyze=analyze, explain_slow=explain_slow, batch_page=batch_page, **_api(predictor, args))


def _api(predictor: Predictor, args: argparse.Namespace) -> dict:
    """The API's endpoints: /predict (fast methods), /explain (every method), /predict_batch."""

    def endpoint(allowed: list[str]):
        @_readable
        def predict(
            file: FileData, method: str = xai.DEFAULT_METHOD, target: str = PREDICTED, alpha: float = xai.DEFAULT_ALPHA
        ) -> tuple[Record, FileData | None]:
            """One slice: its record (Prediction.to_dict) and the heatmap overlay (JPEG; None out of distribution)."""
            pred = _request(predictor, file, method, target, alpha, allowed)
            overlay = serve.save_jpeg(pred.overlay) if pred.in_distribution else None
            return pred.to_dict(), overlay and FileData(path=overlay)

        return predict

    @_readable
    def predict_batch(
        files: list[FileData], method: str = xai.DEFAULT_METHOD, alpha: float = xai.DEFAULT_ALPHA
    ) -> tuple[list[Record], FileData]:
        """Several slices: one row per file (the batch CSV's columns) and the CSV; a bad file is a row with its error."""
        options = serve.request_options(method, None, alpha, FAST_METHODS, PREDICTED)
        _, rows, _, csv_path = serve.batch_request(predictor, files, options, args.max_batch, gallery=False)
        return rows, FileData(path=csv_path)

    return {"predict": endpoint(FAST_METHODS), "explain": endpoint(list(xai.METHODS)), "predict_batch": predict_batch}


# ----------------------------------------------------------------------------- the page


def _single_tab(h: SimpleNamespace, classes: list[str]) -> None:
    """One slice: upload, controls, and the answer; every control re-renders the slice on screen."""
    source = gr.State(None)  # the server path of the slice on screen
    with gr.Row():
        with gr.Column(scale=1):
            image_in = gr.Image(
                label="MRI slice: drop, click or paste an image", type="filepath", image_mode=None,
                sources=["upload", "clipboard"], height=280, elem_id="image-input",
            )  # fmt: skip
            file_in = gr.File(label="…or a DICOM file (or any image file)", elem_id="file-input")
            method = gr.Dropdown(list(xai.METHODS), value=xai.DEFAULT_METHOD, label="Method", elem_id="method")
            target = gr.Dropdown([PREDICTED, *classes], value=PREDICTED, label="Explain", elem_id="target")
            alpha = gr.Slider(0, 1, value=xai.DEFAULT_ALPHA, step=0.05, label="Opacity", elem_id="alpha")
        with gr.Column(scale=2):
            label_out = gr.Label(num_top_classes=len(classes), label="Class probabilities", elem_id="label")
            summary_out = gr.Markdown(elem_id="summary")
            with gr.Row():
                images = {"interactive": False, "buttons": ["download", "fullscreen"], "format": "jpeg"}
                original_out = gr.Image(label="As the model read it", elem_id="original", **images)
                overlay_out = gr.Image(label="Heatmap overlay", elem_id="overlay", **images)
            with gr.Accordion("Details (as the API returns them)", open=False):
                details_out = gr.JSON(label="Details", elem_id="details")
            gr.Markdown(report.DISCLAIMER)
    examples = sorted((REPO / "assets" / "examples").glob("*.jpg"))
    gr.Examples([str(p) for p in examples], image_in, label="Real test slices", cache_examples=False)
    page, controls = [label_out, summary_out, original_out, overlay_out, details_out], [method, target, alpha]
    listen = {"api_visibility": "private", "trigger_mode": "always_last", "show_progress": "minimal"}
    slow = {**listen, "concurrency_id": "explain", "concurrency_limit": 1}
    # .change fires on upload, paste, example click and clear alike.
    for changed, first in [(image_in, image_in), (file_in, file_in)] + [(c, source) for c in controls]:
        changed.change(h.analyze, [first, *controls], [*page, source], concurrency_id="predict", **listen).success(
            h.explain_slow, [source, *controls], page, **slow
        )


def _batch_tab(h: SimpleNamespace, max_batch: int, classes: list[str]) -> None:
    gr.Markdown(f"Up to {max_batch} files at once; unreadable files are listed, not fatal.")
    files = gr.File(file_count="multiple", label="Image or DICOM files", elem_id="batch-input")
    with gr.Row():
        method = gr.Dropdown(FAST_METHODS, value=xai.DEFAULT_METHOD, label="Explanation method")
        alpha = gr.Slider(0.0, 1.0, value=xai.DEFAULT_ALPHA, step=0.05, label="Heatmap opacity")
    go = gr.Button("Classify all", variant="primary")
    headers = report.batch_table_headers(classes)
    table = gr.Dataframe(
        headers=headers, label="Results", interactive=False, wrap=True, elem_id="batch-table",
        column_widths=["12%", "25%"] + [f"{63 / (len(headers) - 2):.1f}%"] * (len(headers) - 2),
    )  # fmt: skip
    gallery = gr.Gallery(label="Heatmap overlays", columns=4, buttons=["download", "fullscreen"])
    csv = gr.File(label="Results as CSV", interactive=False)
    gr.Markdown(report.DISCLAIMER)
    go.click(
        h.batch_page, [files, method, alpha], [table, gallery, csv], api_visibility="private", concurrency_id="predict"
    )


def build_demo(predictor: Predictor, args: argparse.Namespace | None = None) -> gr.Blocks:
    """The interface around ``predictor`` with its queue configured, not launched."""
    args = args or get_args_parser().parse_args([])
    classes, h = list(predictor.class_names), _handlers(predictor, args)
    with gr.Blocks(title="tumor-xai: explainable brain-MRI tumour classifier", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# tumor-xai\nDrop a brain MRI slice (JPEG, PNG or DICOM) to see the model's probability for each class "
            f"({', '.join(classes)}) and a heatmap of where it looked.\n\n> {report.DISCLAIMER}"
        )
        with gr.Tabs():
            with gr.Tab("Classify one slice"):
                _single_tab(h, classes)
            with gr.Tab("Batch"):
                _batch_tab(h, args.max_batch, classes)
            with gr.Tab("Scan"):
                scan_ui.scan_tab(predictor, args, _readable)
            with gr.Tab("About the model and data"):
                about = report.about_markdown(predictor.weights.path, predictor.weights.metadata, classes)
                gr.Markdown(about, elem_id="about")
                plots = sorted((REPO / "reports" / "dataset").glob("*.png"))
                gr.Gallery(  # whole plots (titles, axes and legends), not square crops
                    [(str(p), p.stem.replace("_", " ")) for p in plots], label="Dataset report", columns=2,
                    object_fit="contain", height="auto", elem_id="dataset-plots",
                )  # fmt: skip
        gr.api(h.predict, api_name="predict", concurrency_id="predict")
        gr.api(h.explain, api_name="explain", concurrency_id="explain", concurrency_limit=1)
        gr.api(h.predict_batch, api_name="predict_batch", concurrency_id="predict")
        scan = scan_ui.scan_api(predictor, _readable)
        gr.api(scan, api_name="predict_scan", concurrency_id=scan_ui.SCAN_QUEUE, concurrency_limit=1)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    return demo


if __name__ == "__main__":
    # `python app.py`: the page around the predictor loaded at start-up, served until SIGTERM or Ctrl-C.
    serve.serve_forever(build_demo(PREDICTOR, ARGS), ARGS, CACHE, **LAUNCH)
else:
    # `import app` (`gradio app.py`, the tests, another program) gets the interface built once, not launched.
    # Torch's thread count is left to the importer: it is process-wide.
    _args = get_args_parser().parse_args([])
    demo = build_demo(Predictor.from_pretrained(_args.weights), _args)
