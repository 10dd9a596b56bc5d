"""What a person reads about a prediction, and the one record every batch output writes.

The app shows this text; the API, the batch tab and the batch CLI all serialise
:meth:`tumor_xai.predictor.Prediction.to_dict`, wrapped here in the same batch columns
(``file``, the record, ``overlay``, ``error``) and written to CSV with spreadsheet formulas defused.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from tumor_xai.predictor import Prediction

__all__ = [
    "DISCLAIMER",
    "about_markdown",
    "batch_columns",
    "batch_row",
    "batch_table",
    "batch_table_headers",
    "csv_cell",
    "label_data",
    "summary_markdown",
    "write_csv",
]

logger = logging.getLogger(__name__)

DISCLAIMER = (
    "**Research demo, not a diagnostic device.** tumor-xai assists; it never diagnoses. "
    "Do not use its output for clinical decisions."
)
NOT_ASSESSED = "Not assessed: out of distribution"
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection, OWASP).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def label_data(pred: Prediction) -> dict[str, float] | str:
    """What ``gr.Label`` shows: the probabilities, or a plain statement when no class is claimed."""
    return pred.probabilities if pred.in_distribution else NOT_ASSESSED


def _screening_markdown(pred: Prediction, screening: dict) -> str:
    if pred.tumor_probability is None:
        return "These weights have no *notumor* class, so there is no tumour probability."
    lines = [f"**Tumour probability: {pred.tumor_probability:.1%}** (calibrated 1 − P(notumor))."]
    if pred.screening_positive is None:
        return "\n\n".join([*lines, "No screening threshold is stored with these weights, so there is no flag."])
    threshold, sens = screening.get("threshold"), screening.get("target_sensitivity")
    lines.append(
        "**Screening flag: POSITIVE**, worth an expert's look."
        if pred.screening_positive
        else "**Screening flag: negative.** This does not rule a tumour out."
    )
    if threshold is not None and sens is not None:
        lines.append(
            f"The threshold {float(threshold):.3g} was chosen on validation data so that about {float(sens):.1%} of "
            "slices with a tumour are flagged: it is set to miss few tumours, so it also flags many slices without one."
        )
    return "\n\n".join(lines)


def summary_markdown(pred: Prediction, screening: dict | None = None) -> str:
    """The result in words: class, tumour probability and flag with its meaning, what the heatmap shows."""
    if not pred.in_distribution:
        return (
            "### ⚠️ Not assessed: this image does not look like the brain MRI slices the model was trained on\n\n"
            f"**Why:** {pred.ood_reason or 'it falls outside the training data'}\n\n"
            "The model's probabilities for an image like this are not meaningful, so none are shown. "
            "Use a single axial, coronal or sagittal brain MRI slice (JPEG, PNG or DICOM)."
        )
    parts = [
        f"**Most likely class: {pred.label}** ({pred.probabilities[pred.label]:.1%}).",
        _screening_markdown(pred, screening or {}),
    ]
    if pred.method:
        parts.append(
            f"Heatmap: **{pred.method}** for class **{pred.target}**; warm colours mark the regions that raised "
            "that class's score. It shows where the model looked, not where a tumour is."
        )
    return "\n\n".join(parts)


def _metrics_markdown(metrics: dict | None, limit: int = 60) -> str:
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
    cells = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in flat[:limit]]
    return "| metric (from model.json) | value |\n|---|---|\n" + "\n".join(cells)


def about_markdown(weights_dir: Path, metadata: dict, class_names: list[str]) -> str:
    """The About tab: the weights' own model card (its limits included) and the metrics stored with them.

    A number and its unit ("0.92 %", "1.5 h") are joined by a no-break space, so a narrow table column
    never puts the unit on a line of its own.
    """
    card = weights_dir / "MODEL_CARD.md"
    prep = metadata.get("preprocessing", {})
    text = "\n\n".join(
        [
            "## About the model and data",
            DISCLAIMER,
            card.read_text(encoding="utf-8") if card.is_file() else f"_No MODEL_CARD.md in {weights_dir.name}/._",
            f"**Weights:** `{weights_dir.name}/` · architecture **{metadata.get('arch', '?')}** · input "
            f"{prep.get('input_size', '?')} px · classes {', '.join(class_names)}",
            _metrics_markdown(metadata.get("metrics")),
        ]
    )
    return re.sub(r"(\d) (h|px|s|ms|MB)\b", "\\1\u00a0\\2", text.replace(" %", "\u00a0%"))


# ----------------------------------------------------------------------------- batch records


def batch_columns(class_names: list[str]) -> list[str]:
    """The batch table's and CSV's columns: the file, :meth:`Prediction.to_dict`'s keys, overlay, error."""
    record = Prediction(probabilities=dict.fromkeys(class_names, 0.0), label=class_names[0]).to_dict()
    return ["file", *record, "overlay", "error"]


def batch_row(file: str, class_names: list[str], pred: Prediction | None, overlay: str = "", error: str = "") -> dict:
    """One batch row: the prediction's record, or empty cells and the error for a file that could not be read."""
    row = dict.fromkeys(batch_columns(class_names))
    row.update(file=file, overlay=overlay, error=error)
    if pred is not None:
        row.update(pred.to_dict())
    return row


def batch_table_headers(class_names: list[str]) -> list[str]:
    """The batch tab's table: the file, then what happened to it in words, then the figures."""
    return ["file", "result", *(f"P({c})" for c in class_names), "tumour probability", "screening flag"]


def _pct_cell(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def batch_table(rows: list[dict], class_names: list[str]) -> list[list[str]]:
    """The batch tab's cells for ``rows`` (:func:`batch_row` dicts), under :func:`batch_table_headers`.

    The ``result`` column, second from the left so that it is read first, says what happened: the class, or
    "not assessed" with the out-of-distribution reason, or "unreadable" with the error; a row without a
    verdict has empty figures. (The CSV and the API keep the record's own columns.)
    """
    table = []
    for row in rows:
        if row.get("error"):
            result, flag = f"unreadable: {row['error']}", ""
        elif not row.get("in_distribution"):
            result, flag = f"not assessed: {row.get('ood_reason') or 'out of distribution'}", "not assessed"
        else:
            result = row["label"]
            flag = {True: "positive", False: "negative", None: ""}[row.get("screening_positive")]
        figures = [_pct_cell(row.get(f"p_{c}")) for c in class_names] + [_pct_cell(row.get("tumor_probability"))]
        table.append([csv_cell(row["file"]), result, *figures, flag])
    return table


def csv_cell(value: Any) -> str:
    """A CSV cell: None empty, booleans lower case, floats to 6 places, and formula starts defused.

    A leading ``'`` makes a spreadsheet show ``=1+1.jpg`` as text instead of evaluating it.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_csv(out: str | Path | TextIO, rows: Iterable[dict], columns: list[str]) -> None:
    """Write ``rows`` (dicts with ``columns``) as CSV with :func:`csv_cell` formatting."""
    if isinstance(out, (str, Path)):
        with open(out, "w", newline="", encoding="utf-8") as f:
            write_csv(f, rows, columns)
        return
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in columns])
        out.flush()  # a long batch keeps what it has done if it is stopped
