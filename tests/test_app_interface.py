"""The Gradio app without a server: importing app.py builds the interface once (without launching), its
flags, its handlers called in-process, and a start-up without weights.

These tests run on any pytest-xdist worker (test_app.py's server tests share one, see
``conftest.SHARED_WORKER``). They are marked slow: the interface tests build it anew (the first pays
Gradio's import, seconds) and the start-up test starts an interpreter, which the fast lane leaves out.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, REPO, make_weights
from PIL import Image
from test_app import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("temp_folders")]


@pytest.fixture()
def fresh_app(monkeypatch, tmp_path):
    """Import app.py anew against weights whose class names differ from the usual four."""
    weights = make_weights(tmp_path / "w", class_names=["alpha", "beta", "notumor", "delta"])
    monkeypatch.setenv("TUMOR_XAI_WEIGHTS", str(weights))
    import tumor_xai

    loads = []
    original = tumor_xai.Predictor.from_pretrained.__func__

    def counting(cls, path=None):
        loads.append(path)
        return original(cls, path)

    monkeypatch.setattr(tumor_xai.Predictor, "from_pretrained", classmethod(counting))
    monkeypatch.delitem(sys.modules, "app", raising=False)
    module = importlib.import_module("app")
    yield module, loads
    sys.modules.pop("app", None)


def test_import_builds_the_interface_once_without_launching(fresh_app):
    import gradio as gr

    app, loads = fresh_app
    assert isinstance(app.demo, gr.Blocks)
    assert loads == [os.environ["TUMOR_XAI_WEIGHTS"]], "the model must be loaded exactly once, at import"
    assert getattr(app.demo, "server", None) is None and not app.demo.is_running
    assert app.demo.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    public = {fn.api_name: fn for fn in app.demo.fns.values() if fn.api_visibility == "public"}
    assert set(public) == {"predict", "explain", "predict_batch", "predict_scan"}
    assert public["explain"].concurrency_id != public["predict"].concurrency_id
    assert public["explain"].concurrency_limit == 1
    assert public["predict_scan"].concurrency_id not in ("predict", "explain")  # scans queue on their own
    assert public["predict_scan"].concurrency_limit == 1
    # Endpoints are declared, not hung on invisible buttons.
    assert not [b for b in app.demo.blocks.values() if isinstance(b, gr.Button) and not b.visible]
    # The target choices come from the weights' class names, never from a list in the app.
    dropdowns = [b for b in app.demo.blocks.values() if isinstance(b, gr.Dropdown) and b.elem_id == "target"]
    assert [c[1] for c in dropdowns[0].choices] == ["predicted", "alpha", "beta", "notumor", "delta"]


def test_flags_fall_back_to_the_environment_and_leave_the_address_to_gradio(fresh_app, monkeypatch, capsys):
    app, _ = fresh_app
    args = app.get_args_parser().parse_args([])
    assert (args.host, args.port, args.share) == (None, None, None)  # launch() reads GRADIO_SERVER_NAME etc.
    assert (args.concurrency, args.cache_age, args.max_batch) == (2, 900, 32)
    monkeypatch.setenv("TUMOR_XAI_CACHE_AGE", "5")
    args = app.get_args_parser().parse_args(["--max-batch", "3", "--host", "0.0.0.0", "--share"])
    assert (args.cache_age, args.max_batch, args.host, args.share) == (5, 3, "0.0.0.0", True)
    monkeypatch.setenv("TUMOR_XAI_CONCURRENCY", "zero")
    with pytest.raises(SystemExit):
        app.get_args_parser().parse_args([])
    assert "--concurrency: 'zero' is not a whole number of at least 1" in capsys.readouterr().err


def test_missing_weights_stop_start_up_with_instructions(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "app.py"), "--weights", str(tmp_path / "nowhere"), "--port", str(free_port())],
        cwd=REPO,
        env=dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "cache")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "cannot start" in out.stderr and "python -m tumor_xai.train" in out.stderr
    assert "Traceback" not in out.stderr
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_page_answers_at_once_and_a_slow_heatmap_follows_in_its_own_queue(fresh_app):
    import gradio as gr

    app, _ = fresh_app
    fns = {fn.name: fn for fn in app.demo.fns.values()}
    analyze, slow = fns["analyze"], fns["explain_slow"]
    assert analyze.concurrency_id == "predict" and slow.concurrency_id == "explain" and slow.concurrency_limit == 1
    path = str(EXAMPLES / "glioma_1.jpg")
    label, summary, original, overlay, record, source = analyze.fn(path, "scorecam", "predicted", 0.5)
    assert source == path and record["method"] is None and overlay is None and Path(original).is_file()
    label, summary, original, overlay, record = slow.fn(path, "scorecam", "predicted", 0.5)
    assert record["method"] == "scorecam" and Image.open(overlay).size == Image.open(path).size
    assert slow.fn(path, "gradcam", "predicted", 0.5) == (gr.skip(),) * 5  # fast methods were answered already


def test_batch_table_says_why_a_row_has_no_figures_before_the_figures(fresh_app, tmp_path):
    import gradio as gr

    app, _ = fresh_app
    names = ["alpha", "beta", "notumor", "delta"]
    headers = [
        "file",
        "result",
        "P(alpha)",
        "P(beta)",
        "P(notumor)",
        "P(delta)",
        "tumour probability",
        "screening flag",
    ]
    table = next(b for b in app.demo.blocks.values() if isinstance(b, gr.Dataframe) and b.elem_id == "batch-table")
    assert table.value["headers"] == headers  # the empty table has real headers, not "1 2 3"
    broken, blank = tmp_path / "broken.png", tmp_path / "blank.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(blank)
    batch = {fn.name: fn for fn in app.demo.fns.values()}["batch_page"]
    shown, _, csv_path = batch.fn([str(EXAMPLES / "glioma_1.jpg"), str(broken), str(blank)], "gradcam", 0.5)
    assert shown["headers"] == headers
    good, bad, ood = shown["data"]
    assert good[1] in names and good[2].endswith("%") and good[-1] in ("positive", "negative", "")
    assert bad[:2] == ["broken.png", bad[1]] and bad[1].startswith("unreadable: ") and "broken.png" in bad[1]
    assert ood[1].startswith("not assessed: ") and "blank" in ood[1] and ood[-1] == "not assessed"
    assert bad[2:] == [""] * 6 and ood[2:-1] == [""] * 5  # no figures without a verdict
    assert Path(csv_path).is_file()
