"""The Gradio app: it builds without launching, reads its settings, and a real server answers a real client.

One server runs for the whole module (``python app.py`` in a subprocess, as a Space runs it), with a
short cache lifetime so the deletion of uploads can be observed. It serves the shipped ``weights/``
when they exist and an untrained 64 px model otherwise; the test that needs correct answers skips
without the shipped weights.
"""

from __future__ import annotations

import csv
import importlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import CLASSES, EXAMPLES, REPO, make_weights
from PIL import Image

SHIPPED = REPO / "weights"
HAVE_SHIPPED = (SHIPPED / "model.json").is_file()
CACHE_FREQUENCY, CACHE_AGE = 1, 6  # seconds; the defaults are minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(weights: Path, cache_dir: Path, *extra: str, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """Start ``python app.py`` on a free local port and wait until it serves its page."""
    port = free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
    log = open(cache_dir.parent / f"app-{port}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--port", str(port), "--weights", str(weights), *extra],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{Path(log.name).read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s:\n{Path(log.name).read_text()}")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def served_weights(tmp_path_factory) -> Path:
    return SHIPPED if HAVE_SHIPPED else make_weights(tmp_path_factory.mktemp("app-weights") / "weights")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("app-server") / "cache"
    cache.mkdir()
    proc, url = start_app(
        served_weights(tmp_path_factory),
        cache,
        "--cache-frequency",
        str(CACHE_FREQUENCY),
        "--cache-age",
        str(CACHE_AGE),
    )
    yield url, cache
    stop_app(proc)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


# ----------------------------------------------------------------------------- without a server


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
    api_names = {fn.api_name for fn in app.demo.fns.values()}
    assert {"predict", "predict_batch"} <= api_names
    # The target choices come from the weights' class names, never from a list in the app.
    dropdowns = [b for b in app.demo.blocks.values() if isinstance(b, gr.Dropdown) and b.elem_id == "target"]
    assert [c[1] for c in dropdowns[0].choices] == ["predicted", "alpha", "beta", "notumor", "delta"]


def test_settings_follow_cli_then_own_env_then_space_env(fresh_app):
    app, _ = fresh_app

    space = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7000"}
    s = app.parse_args([], environ=space)
    assert (s.host, s.port, s.share, s.weights) == ("0.0.0.0", 7000, False, None)
    s = app.parse_args(
        [], environ={**space, "TUMOR_XAI_PORT": "7100", "TUMOR_XAI_SHARE": "true", "TUMOR_XAI_CACHE_AGE": "5"}
    )
    assert (s.port, s.share, s.cache_age) == (7100, True, 5)
    s = app.parse_args(
        ["--port", "7200", "--no-share", "--weights", "w"], environ={"TUMOR_XAI_PORT": "7100", "TUMOR_XAI_SHARE": "1"}
    )
    assert (s.port, s.share, s.weights) == (7200, False, "w")
    assert app.parse_args([], environ={}).host == "127.0.0.1" and app.parse_args([], environ={}).port == 7860


def test_malformed_setting_names_the_variable(fresh_app):
    app, _ = fresh_app

    with pytest.raises(SystemExit, match="TUMOR_XAI_PORT='seventy' is not a whole number"):
        app.parse_args([], environ={"TUMOR_XAI_PORT": "seventy"})
    with pytest.raises(SystemExit, match="GRADIO_SHARE='maybe' is not a yes/no value"):
        app.parse_args([], environ={"GRADIO_SHARE": "maybe"})


def test_missing_weights_stop_start_up_with_instructions(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "app.py"), "--weights", str(tmp_path / "nowhere"), "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "cannot start" in out.stderr and "python -m tumor_xai.train" in out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- a real server


@pytest.mark.slow
@pytest.mark.skipif(
    not HAVE_SHIPPED, reason="needs the shipped weights/ (weights/model.json is absent): train them first"
)
@pytest.mark.parametrize("cls", CLASSES)
def test_server_classifies_a_real_example_of_each_class(client, cls):
    from gradio_client import handle_file

    label, overlay, details = client.predict(handle_file(str(EXAMPLES / f"{cls}_1.jpg")), api_name="/predict")
    assert label["label"] == cls == details["label"], details
    assert {c["label"] for c in label["confidences"]} == set(CLASSES)
    assert abs(sum(c["confidence"] for c in label["confidences"]) - 1.0) < 1e-4
    with Image.open(overlay) as im:
        assert im.size == Image.open(EXAMPLES / f"{cls}_1.jpg").size and im.mode == "RGB"


@pytest.mark.slow
def test_server_answers_with_probabilities_first_then_the_overlay_and_details(client):
    from gradio_client import handle_file

    label, overlay, details = client.predict(
        handle_file(str(EXAMPLES / "glioma_1.jpg")), "eigencam", "meningioma", 0.7, api_name="/predict"
    )
    assert len(label["confidences"]) == len(CLASSES)
    assert (details["method"], details["target"], details["in_distribution"]) == ("eigencam", "meningioma", True)
    assert details["tumor_probability"] == pytest.approx(1 - details["probabilities"]["notumor"])
    assert details["screening_positive"] == (details["tumor_probability"] >= details["screening_threshold"])
    with Image.open(overlay) as ov:
        assert ov.size == (224, 224) and ov.mode == "RGB"
        assert np.asarray(ov).std() > 0


@pytest.mark.slow
def test_bad_file_gets_a_clean_error_and_the_server_keeps_serving(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / "scan.jpg"
    bad.write_text("this is not an image")
    with pytest.raises(AppError, match="scan.jpg") as info:
        client.predict(handle_file(str(bad)), api_name="/predict")
    message = str(info.value)
    assert "Traceback" not in message and "/tmp" not in message and str(tmp_path) not in message
    label, *_ = client.predict(handle_file(str(EXAMPLES / "notumor_1.jpg")), api_name="/predict")
    assert len(label["confidences"]) == len(CLASSES)


@pytest.mark.slow
def test_a_dicom_file_is_answered_like_an_image(client, tmp_path):
    from gradio_client import handle_file
    from pydicom.data import get_testdata_file

    bundled = get_testdata_file("MR_small.dcm", download=False)  # ships with pydicom; never downloads
    if bundled is None:
        pytest.skip("MR_small.dcm is not bundled with this pydicom version")
    dcm = tmp_path / "slice.dcm"
    shutil.copy(bundled, dcm)
    label, overlay, details = client.predict(handle_file(str(dcm)), api_name="/predict")
    assert set(details["probabilities"]) == set(CLASSES)
    assert abs(sum(details["probabilities"].values()) - 1.0) < 1e-4
    if details["in_distribution"]:
        with Image.open(overlay) as ov:
            assert ov.size == (64, 64)  # the overlay has the DICOM slice's own size


@pytest.mark.slow
def test_out_of_distribution_input_is_not_presented_as_a_normal_answer(client, tmp_path):
    from gradio_client import handle_file

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((256, 256), 128, np.uint8)).save(blank)
    label, overlay, details = client.predict(handle_file(str(blank)), api_name="/predict")
    assert label["label"].startswith("Not assessed") and not label.get("confidences")
    assert overlay is None
    assert details["in_distribution"] is False and details["label"] is None and "blank" in details["ood_reason"]


@pytest.mark.slow
def test_batch_returns_a_table_a_gallery_and_a_csv(client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    files = [
        handle_file(str(EXAMPLES / "glioma_1.jpg")),
        handle_file(str(EXAMPLES / "pituitary_1.jpg")),
        handle_file(str(bad)),
    ]
    table, gallery, csv_path = client.predict(files, api_name="/predict_batch")
    assert [row[0] for row in table["data"]] == ["glioma_1.jpg", "pituitary_1.jpg", "broken.png"]
    assert [row[1] for row in table["data"]] == ["ok", "ok", "unreadable"]
    assert len(gallery) == 2
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["file", "status", "label"] and [f"p_{c}" for c in CLASSES] == rows[0][3:7]
    assert len(rows) == 4


@pytest.mark.slow
def test_uploads_and_outputs_are_deleted_after_their_lifetime(client, server, tmp_path):
    from gradio_client import handle_file

    _, cache = server
    name = f"upload-{uuid.uuid4().hex}.jpg"
    shutil.copy(EXAMPLES / "meningioma_1.jpg", tmp_path / name)
    client.predict(handle_file(str(tmp_path / name)), api_name="/predict")
    assert list(cache.rglob(name)), "the upload should be in the server's cache right after the request"
    deadline = time.monotonic() + CACHE_AGE + 4 * CACHE_FREQUENCY + 10
    while list(cache.rglob(name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not list(cache.rglob(name)), "the upload outlived the configured cache lifetime"
    assert not [
        p for p in cache.rglob("out-*.png") if time.time() - p.stat().st_ctime > CACHE_AGE + 3 * CACHE_FREQUENCY
    ]
