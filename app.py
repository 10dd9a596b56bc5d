"""tumor-xai in a browser: a thin Gradio layer over :class:`tumor_xai.Predictor`.

The page maps user input to one predictor loaded at start-up and maps its errors to ``gr.Error``;
all decoding, preprocessing, classification and explanation live in the package. ``import app``
builds the interface (``app.demo``) without launching it; ``python app.py`` also serves it.

Settings come from the command line, else ``TUMOR_XAI_*`` environment variables, else the
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` / ``GRADIO_SHARE`` that a Hugging Face Space sets,
else the defaults (127.0.0.1:7860, the repository's ``weights/``). Research demo, not a diagnostic
device.
"""

from __future__ import annotations

import os

# Before gradio is imported: no telemetry and no version check (both call out to the internet).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict, dataclass, fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tumor_xai import InvalidImageError, Predictor, WeightsError  # noqa: E402
from tumor_xai.explain import DEFAULT_METHOD, METHODS  # noqa: E402

__all__ = ["PREDICTED", "Settings", "build_demo", "configure_torch", "demo", "load_predictor", "main", "parse_args"]

logger = logging.getLogger("tumor_xai.app")

REPO = Path(__file__).resolve().parent
EXAMPLES_DIR = REPO / "assets" / "examples"
DATASET_REPORT_DIR = REPO / "reports" / "dataset"
PREDICTED = "predicted"  # the target-class choice meaning "explain whatever the model predicted"
DEFAULT_ALPHA = 0.4
DISCLAIMER = (
    "**Research demo, not a diagnostic device.** tumor-xai assists; it never diagnoses. "
    "Do not use its output for clinical decisions."
)


@dataclass
class Settings:
    """How the app is served; mirrored by :func:`parse_args` and the ``TUMOR_XAI_*`` variables."""

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    weights: str | None = None  # None: the repository's weights/
    # Predictions run at once, each with cores // concurrency torch threads. Two one-thread predictions
    # beat one two-thread prediction on 2 cores: no barrier waits between threads, and one request's
    # decoding and PNG encoding overlap the other's forward pass.
    concurrency: int = 2
    queue_size: int = 64  # requests waiting beyond this are refused with "queue full"
    max_file_size: str = "20mb"
    cache_frequency: int = 300  # seconds between sweeps of uploaded and generated files
    cache_age: int = 900  # seconds a file lives before a sweep deletes it
    max_batch: int = 32  # files per batch request

    ENV = {
        "host": ("TUMOR_XAI_HOST", "GRADIO_SERVER_NAME"),
        "port": ("TUMOR_XAI_PORT", "GRADIO_SERVER_PORT"),
        "share": ("TUMOR_XAI_SHARE", "GRADIO_SHARE"),
        "weights": ("TUMOR_XAI_WEIGHTS",),
        "concurrency": ("TUMOR_XAI_CONCURRENCY",),
        "queue_size": ("TUMOR_XAI_QUEUE_SIZE",),
        "max_file_size": ("TUMOR_XAI_MAX_FILE_SIZE",),
        "cache_frequency": ("TUMOR_XAI_CACHE_FREQUENCY",),
        "cache_age": ("TUMOR_XAI_CACHE_AGE",),
        "max_batch": ("TUMOR_XAI_MAX_BATCH",),
    }

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Defaults overridden by the environment; a malformed value raises ``ValueError`` naming it."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            for var in cls.ENV[f.name]:
                raw = environ.get(var)
                if raw is None or raw == "":
                    continue
                values[f.name] = _convert(f.name, raw, var)
                break
        return cls(**values)


def _convert(name: str, raw: str, source: str) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if kind == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{source}={raw!r} is not a yes/no value (use true or false)")
    if kind == "int":
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{source}={raw!r} is not a whole number") from None
        if value < (0 if name == "port" else 1):
            raise ValueError(f"{source}={raw!r} must be at least 1")
        return value
    return raw


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Settings from the command line, falling back to the environment (see :class:`Settings`)."""
    try:
        base = Settings.from_env(environ)
    except ValueError as exc:
        raise SystemExit(f"app.py: {exc}") from None
    p = argparse.ArgumentParser(description="Serve the tumor-xai demo (research demo, not a diagnostic device).")
    p.add_argument(
        "--host",
        default=base.host,
        help="interface to listen on; 0.0.0.0 for every interface (env TUMOR_XAI_HOST, GRADIO_SERVER_NAME)",
    )
    p.add_argument("--port", type=int, default=base.port, help="port (env TUMOR_XAI_PORT, GRADIO_SERVER_PORT)")
    p.add_argument(
        "--share",
        action=argparse.BooleanOptionalAction,
        default=base.share,
        help="also open a temporary public gradio.live link (env TUMOR_XAI_SHARE)",
    )
    p.add_argument(
        "--weights",
        default=base.weights,
        help="weights folder (default: the repository's weights/; env TUMOR_XAI_WEIGHTS)",
    )
    p.add_argument(
        "--concurrency", type=int, default=base.concurrency, help="predictions run at once (env TUMOR_XAI_CONCURRENCY)"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=base.queue_size,
        help="most requests waiting in the queue (env TUMOR_XAI_QUEUE_SIZE)",
    )
    p.add_argument(
        "--max-file-size", default=base.max_file_size, help='upload limit, e.g. "20mb" (env TUMOR_XAI_MAX_FILE_SIZE)'
    )
    p.add_argument(
        "--cache-frequency",
        type=int,
        default=base.cache_frequency,
        help="seconds between deletions of old uploads and outputs (env TUMOR_XAI_CACHE_FREQUENCY)",
    )
    p.add_argument(
        "--cache-age",
        type=int,
        default=base.cache_age,
        help="seconds an upload or output is kept (env TUMOR_XAI_CACHE_AGE)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=base.max_batch,
        help="most files in one batch request (env TUMOR_XAI_MAX_BATCH)",
    )
    args = p.parse_args(argv)
    for name in ("concurrency", "queue_size", "cache_frequency", "cache_age", "max_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return Settings(**vars(args))


def configure_torch(settings: Settings) -> int:
    """Split the machine's cores between the predictions that may run at once; returns threads each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // settings.concurrency)
    torch.set_num_threads(threads)
    return threads


def load_predictor(settings: Settings) -> Predictor:
    """The one predictor the app serves; :class:`WeightsError` says what to do when it cannot load."""
    predictor = Predictor.from_pretrained(settings.weights)
    logger.info("serving weights from %s", getattr(predictor.weights, "path", settings.weights))
    return predictor


# ----------------------------------------------------------------------------- request handling


def _file_path(value: Any) -> str | None:
    """A file path from what Gradio hands over (a path, a FileData-like dict or object), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, dict):
        return value.get("path")
    return getattr(value, "path", None) or getattr(value, "name", None)


def _gray_image(pred: Any) -> Image.Image | None:
    """The decoded slice exactly as the model read it, for display (DICOM never renders otherwise)."""
    if pred.image is None:
        return None
    return Image.fromarray(np.round(np.clip(pred.image.gray, 0.0, 1.0) * 255.0).astype(np.uint8))


def _save_png(img: Image.Image | None, cache_dir: str) -> str | None:
    """Write ``img`` to a fresh file inside Gradio's cache and return its path.

    Handing Gradio a PIL image makes it write ``<cache>/<hash of the bytes>/image.png`` in place, so
    two users who get the same picture at the same moment (say, both clicked the same example)
    share one path, and the second write truncates the file while the first is being downloaded:
    the client sees "peer closed connection without sending complete message body". A file of our
    own per answer avoids that; being inside the cache, Gradio serves it as is and ``delete_cache``
    still sweeps it.
    """
    if img is None:
        return None
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".png", prefix="out-", dir=cache_dir)
    with os.fdopen(fd, "wb") as f:
        img.save(f, format="PNG")
    return path


def _predict(predictor: Predictor, path: str, method: str, target: str | None, alpha: float) -> Any:
    if not Path(path).is_file():
        raise gr.Error(
            "This upload is no longer on the server (uploads are deleted after a while). Upload the file again.",
            title="Upload expired",
            print_exception=False,
        )
    try:
        return predictor.predict(
            path,
            explain=True,
            method=method,
            target=None if target in (None, "", PREDICTED) else target,
            alpha=float(alpha),
        )
    except InvalidImageError as exc:
        # The message names the server's temporary path; show the file's own name instead.
        raise gr.Error(
            str(exc).replace(path, Path(path).name), title="Cannot read this file", print_exception=False
        ) from None
    except ValueError as exc:  # an option outside the predictor's choices (only reachable through the API)
        raise gr.Error(str(exc), title="Invalid option", print_exception=False) from None


def _screening_text(predictor: Predictor, pred: Any) -> str:
    meta = getattr(predictor.weights, "metadata", {}) or {}
    screening = meta.get("screening") or {}
    if pred.tumor_probability is None:
        return "These weights have no *notumor* class, so there is no tumour probability."
    calibrated = "calibrated " if meta.get("calibration") else ""
    lines = [f"**Tumour probability: {pred.tumor_probability:.1%}** ({calibrated}1 − P(notumor))."]
    if pred.screening_positive is None:
        lines.append("No screening threshold is stored with these weights, so there is no screening flag.")
        return "\n\n".join(lines)
    threshold = float(screening.get("threshold", predictor.threshold))
    sens = screening.get("target_sensitivity")
    meaning = (
        f"The threshold {threshold:.3g} was chosen on validation data so that about {float(sens):.1%} of slices "
        "with a tumour are flagged: it is set to miss few tumours, so it also flags many slices without one."
        if sens is not None
        else f"The flag is raised when the tumour probability is at least {threshold:.3g}."
    )
    flag = (
        "**Screening flag: POSITIVE**, worth an expert's look."
        if pred.screening_positive
        else "**Screening flag: negative.** This does not rule a tumour out."
    )
    lines += [flag, meaning]
    return "\n\n".join(lines)


def _summary(predictor: Predictor, pred: Any) -> str:
    if not pred.in_distribution:
        return (
            "### ⚠️ Not assessed: this image does not look like the brain MRI slices the model was trained on\n\n"
            f"**Why:** {pred.ood_reason or 'it falls outside the training data'}\n\n"
            "The model's probabilities for an image like this are not meaningful, so none are shown. "
            "Use a single axial, coronal or sagittal brain MRI slice (JPEG, PNG or DICOM)."
        )
    top = pred.probabilities[pred.label]
    return "\n\n".join(
        [
            f"**Most likely class: {pred.label}** ({top:.1%}).",
            _screening_text(predictor, pred),
            f"Heatmap: **{pred.method}** for class **{pred.target}**; warm colours mark the regions that raised "
            "that class's score. It shows where the model looked, not where a tumour is.",
        ]
    )


def _details(predictor: Predictor, pred: Any) -> dict:
    """The answer as plain data (the API's third output and the page's "details" box)."""
    screening = (getattr(predictor.weights, "metadata", {}) or {}).get("screening") or {}
    return {
        "in_distribution": bool(pred.in_distribution),
        "ood_reason": pred.ood_reason,
        "label": pred.label if pred.in_distribution else None,
        "probabilities": pred.probabilities,
        "tumor_probability": pred.tumor_probability,
        "screening_positive": pred.screening_positive,
        "screening_threshold": screening.get("threshold"),
        "screening_target_sensitivity": screening.get("target_sensitivity"),
        "method": pred.method,
        "target": pred.target,
        "note": "Research demo, not a diagnostic device.",
    }


def _label(pred: Any) -> dict[str, float] | str:
    # Out of distribution: a plain statement instead of probabilities that would look like an answer.
    return pred.probabilities if pred.in_distribution else "Not assessed: out of distribution"


def _outputs(predictor: Predictor, pred: Any, path: str, cache_dir: str) -> tuple:
    """Values for the page: (label, overlay, summary, original, details, source state)."""
    if not pred.in_distribution:
        gr.Warning(
            f"Not assessed: {pred.ood_reason or 'the image is outside the training data'}", title="Out of distribution"
        )
    overlay = _save_png(pred.overlay, cache_dir) if pred.in_distribution else None
    original = _save_png(_gray_image(pred), cache_dir)
    return _label(pred), overlay, _summary(predictor, pred), original, _details(predictor, pred), path


def _batch_rows(
    predictor: Predictor, files: list[Any], method: str, alpha: float, max_batch: int, cache_dir: str
) -> tuple[list[list], list, list[str]]:
    paths = [p for p in (_file_path(f) for f in files or []) if p]
    if not paths:
        raise gr.Error("Add one or more image or DICOM files first.", title="No files", print_exception=False)
    if len(paths) > max_batch:
        raise gr.Error(
            f"{len(paths)} files is more than the {max_batch} this demo takes at once; split them into smaller batches.",
            title="Too many files",
            print_exception=False,
        )
    rows, gallery = [], []
    for path in paths:
        name = Path(path).name
        try:
            pred = predictor.predict(path, explain=True, method=method, alpha=float(alpha))
        except InvalidImageError as exc:
            rows.append(
                [name, "unreadable", "", *([None] * len(predictor.class_names)), None, "", str(exc).replace(path, name)]
            )
            continue
        probs = [round(pred.probabilities[c], 4) for c in predictor.class_names]
        tumour = None if pred.tumor_probability is None else round(pred.tumor_probability, 4)
        flag = "" if pred.screening_positive is None else ("positive" if pred.screening_positive else "negative")
        if pred.in_distribution:
            rows.append([name, "ok", pred.label, *probs, tumour, flag, ""])
            gallery.append(
                (_save_png(pred.overlay, cache_dir), f"{name}: {pred.label} {pred.probabilities[pred.label]:.0%}")
            )
        else:  # the raw numbers stay in the CSV for the record, but no class is claimed
            rows.append([name, "not assessed (out of distribution)", "", *probs, tumour, "", pred.ood_reason or ""])
    headers = [
        "file",
        "status",
        "label",
        *[f"p_{c}" for c in predictor.class_names],
        "tumor_probability",
        "screening",
        "note",
    ]
    return rows, gallery, headers


# ----------------------------------------------------------------------------- the page


def _metrics_markdown(meta: dict) -> str:
    metrics = meta.get("metrics")
    if not metrics:
        return "_No metrics are stored with these weights._"
    flat: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float, str, bool)):
            flat.append((prefix, value))

    walk("", metrics)
    cells = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in flat[:60]]
    return "| metric (from model.json) | value |\n|---|---|\n" + "\n".join(cells)


def _about_markdown(predictor: Predictor) -> str:
    weights_dir = Path(getattr(predictor.weights, "path", REPO / "weights"))
    meta = getattr(predictor.weights, "metadata", {}) or {}
    card = weights_dir / "MODEL_CARD.md"
    parts = ["## About the model and data", DISCLAIMER]
    if card.is_file():
        parts.append(card.read_text(encoding="utf-8"))
    else:
        parts.append(f"_No MODEL_CARD.md in {weights_dir.name}/._")
    prep = meta.get("preprocessing", {})
    parts.append(
        f"**Weights:** `{weights_dir.name}/` · architecture **{meta.get('arch', '?')}** · input "
        f"{prep.get('input_size', '?')} px · classes {', '.join(predictor.class_names)}"
    )
    parts.append(_metrics_markdown(meta))
    parts.append(
        "### Limitations\n\n"
        "- Trained on one public Kaggle collection of 2-D slices (figshare, SARTAJ and Br35H), mostly "
        "T1 contrast-enhanced for tumours; other sequences, scanners, children and post-operative images "
        "are outside what it has seen.\n"
        "- It sees one slice at a time, never a whole study, and knows only four classes: any other "
        "lesion is forced into one of them.\n"
        "- The dataset has no patient IDs, so neighbouring slices of one patient may sit on both sides of "
        "the train/test split; test figures are optimistic for that reason too.\n"
        "- The out-of-distribution check catches images that are clearly not such slices; it cannot "
        "catch every subtle shift.\n"
        "- A heatmap shows which regions raised a class's score, not the tumour's outline."
    )
    return "\n\n".join(parts)


def _example_paths() -> list[str]:
    return [str(p) for p in sorted(EXAMPLES_DIR.glob("*.jpg"))]


def build_demo(predictor: Predictor, settings: Settings | None = None) -> gr.Blocks:
    """The interface (queue configured, not launched) around ``predictor``."""
    settings = settings or Settings()
    class_names = list(predictor.class_names)
    methods = list(METHODS)

    def analyze(slice_file: Any, method: str, target: str, alpha: float):
        path = _file_path(slice_file)
        if path is None:  # the input was cleared: leave the last result in place
            return (gr.skip(),) * 6
        return _outputs(predictor, _predict(predictor, path, method, target, alpha), path, overlay_out.GRADIO_CACHE)

    def rerender(path: str | None, method: str, target: str, alpha: float):
        if not path:
            return (gr.skip(),) * 6
        return analyze(path, method, target, alpha)

    def predict(slice_file: Any, method: str = DEFAULT_METHOD, target: str = PREDICTED, alpha: float = DEFAULT_ALPHA):
        """The API: class probabilities (gr.Label data), the heatmap overlay and the answer as JSON."""
        path = _file_path(slice_file)
        if path is None:
            raise gr.Error("Send an image or DICOM file.", title="No file", print_exception=False)
        pred = _predict(predictor, path, method, target, alpha)
        overlay = _save_png(pred.overlay, overlay_out.GRADIO_CACHE) if pred.in_distribution else None
        return _label(pred), overlay, _details(predictor, pred)

    def run_batch(files: list[Any], method: str, alpha: float):
        rows, gallery, headers = _batch_rows(
            predictor, files, method, alpha, settings.max_batch, batch_csv.GRADIO_CACHE
        )
        Path(batch_csv.GRADIO_CACHE).mkdir(parents=True, exist_ok=True)
        out_dir = Path(tempfile.mkdtemp(prefix="batch-", dir=batch_csv.GRADIO_CACHE))
        csv_path = out_dir / "tumor-xai-results.csv"  # inside Gradio's cache, so delete_cache sweeps it
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(headers)
            writer.writerows(rows)
        return {"headers": headers, "data": rows}, gallery, str(csv_path)

    with gr.Blocks(
        title="tumor-xai: explainable brain-MRI tumour classifier",
        analytics_enabled=False,
        delete_cache=(settings.cache_frequency, settings.cache_age),
    ) as demo:
        gr.Markdown(
            "# tumor-xai\nDrop a brain MRI slice (JPEG, PNG or DICOM) to see the model's probability for each "
            f"class ({', '.join(class_names)}) and a heatmap of where it looked.\n\n> {DISCLAIMER}"
        )
        source = gr.State(None)  # the server path of the slice on screen, so controls re-render it
        with gr.Tabs():
            with gr.Tab("Classify one slice"):
                with gr.Row():
                    with gr.Column(scale=1):
                        image_in = gr.Image(
                            label="MRI slice: drop, click or paste an image",
                            type="filepath",
                            image_mode=None,  # hand the file over untouched (16-bit PNGs stay 16-bit)
                            sources=["upload", "clipboard"],
                            height=280,
                            elem_id="image-input",
                        )
                        file_in = gr.File(
                            label="…or a DICOM file (or any image file)", type="filepath", elem_id="file-input"
                        )
                        method = gr.Dropdown(
                            methods, value=DEFAULT_METHOD, label="Explanation method", elem_id="method"
                        )
                        target = gr.Dropdown(
                            [PREDICTED, *class_names], value=PREDICTED, label="Explain class", elem_id="target"
                        )
                        alpha = gr.Slider(
                            0.0, 1.0, value=DEFAULT_ALPHA, step=0.05, label="Heatmap opacity", elem_id="alpha"
                        )
                    with gr.Column(scale=2):
                        label_out = gr.Label(
                            num_top_classes=len(class_names), label="Class probabilities", elem_id="label"
                        )
                        summary_out = gr.Markdown(label="Summary", elem_id="summary")
                        with gr.Row():
                            original_out = gr.Image(
                                label="Original (as the model read it)",
                                interactive=False,
                                buttons=["download", "fullscreen"],
                                elem_id="original",
                            )
                            overlay_out = gr.Image(
                                label="Heatmap overlay",
                                interactive=False,
                                buttons=["download", "fullscreen"],
                                elem_id="overlay",
                            )
                        with gr.Accordion("Details (as the API returns them)", open=False):
                            details_out = gr.JSON(label="Details", elem_id="details")
                        gr.Markdown(DISCLAIMER)
                gr.Examples(
                    examples=_example_paths(),
                    inputs=image_in,
                    label="Examples: real test slices (not near-duplicates of any training image), click one",
                    cache_examples=False,
                    examples_per_page=12,
                )
            outputs = [label_out, overlay_out, summary_out, original_out, details_out, source]
            controls = [method, target, alpha]
            # One listener per input: .change fires on upload, paste, example click and clear alike.
            for source_in in (image_in, file_in):
                source_in.change(
                    analyze,
                    [source_in, *controls],
                    outputs,
                    api_visibility="private",
                    trigger_mode="always_last",
                    concurrency_id="model",
                )
            for control in controls:
                control.change(
                    rerender,
                    [source, *controls],
                    outputs,
                    api_visibility="private",
                    trigger_mode="always_last",
                    concurrency_id="model",
                )
                # The API endpoint: a listener on a button nobody sees, so /predict returns only what a program
                # needs (no summary text, no copy of the original), in a fixed order.
                api_trigger = gr.Button(visible=False)  # inside the tab: a block between tabs splits the tab bar
            api_trigger.click(
                predict,
                [file_in, *controls],
                [label_out, overlay_out, details_out],
                api_name="predict",
                concurrency_id="model",
            )

            with gr.Tab("Batch"):
                gr.Markdown(
                    f"Classify up to {settings.max_batch} files at once; unreadable files are listed, not fatal."
                )
                batch_in = gr.File(
                    file_count="multiple", type="filepath", label="Image or DICOM files", elem_id="batch-input"
                )
                with gr.Row():
                    batch_method = gr.Dropdown(methods, value=DEFAULT_METHOD, label="Explanation method")
                    batch_alpha = gr.Slider(0.0, 1.0, value=DEFAULT_ALPHA, step=0.05, label="Heatmap opacity")
                batch_go = gr.Button("Classify all", variant="primary")
                batch_table = gr.Dataframe(label="Results", interactive=False, wrap=True)
                batch_gallery = gr.Gallery(label="Heatmap overlays", columns=4, buttons=["download", "fullscreen"])
                batch_csv = gr.File(label="Results as CSV", interactive=False)
                gr.Markdown(DISCLAIMER)
                batch_go.click(
                    run_batch,
                    [batch_in, batch_method, batch_alpha],
                    [batch_table, batch_gallery, batch_csv],
                    api_name="predict_batch",
                    concurrency_id="model",
                )

            with gr.Tab("About the model and data"):
                gr.Markdown(_about_markdown(predictor))
                plots = sorted(DATASET_REPORT_DIR.glob("*.png"))
                if plots:
                    gr.Gallery(
                        [(str(p), p.stem.replace("_", " ")) for p in plots],
                        label="Dataset report",
                        columns=2,
                        buttons=["download", "fullscreen"],
                    )

    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    return demo


def launch(demo: gr.Blocks, settings: Settings, **kwargs: Any) -> Any:
    """Serve ``demo`` with the settings' host, port, share link and upload limit."""
    return demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        max_file_size=settings.max_file_size,
        show_error=False,  # unexpected errors reach the page as "Error", never as a stack trace
        ssr_mode=False,
        mcp_server=False,
        run_history=False,  # keep uploaded slices out of the browser's storage
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    """``python app.py``: load the weights once, build the page and serve it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = parse_args(argv)
    threads = configure_torch(settings)
    try:
        predictor = load_predictor(settings)
    except WeightsError as exc:
        print(f"app.py: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"tumor-xai: serving {json.dumps({k: v for k, v in asdict(settings).items()})}, {threads} torch thread(s) per request"
    )
    launch(build_demo(predictor, settings), settings)


if __name__ == "__main__":
    main()
else:
    # `import app` (`gradio app.py`, the tests, another program) gets the interface built once, not
    # launched. Torch's thread count is left to the importer: it is process-wide.
    _settings = Settings.from_env()
    demo = build_demo(load_predictor(_settings), _settings)
