"""Request helpers and cache hygiene of tumor_xai.serve, on real files (the server tests run them over HTTP)."""

from __future__ import annotations

import os
import time

import pytest
from conftest import EXAMPLES

from tumor_xai import serve


def _aged(path, seconds: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def test_sweep_deletes_stale_files_and_the_folders_they_leave(tmp_path):
    old_upload = _aged(tmp_path / "abc123" / "scan.dcm", 1000)
    fresh_upload = _aged(tmp_path / "def456" / "slice.jpg", 5)
    failed_staging = _aged(tmp_path / "tmpq1w2e3", 120)  # an upload that stopped arriving two minutes ago
    live_staging = _aged(tmp_path / "tmpr4t5y6", 5)
    assert serve.sweep(tmp_path, age=900) == 2
    assert not old_upload.exists() and not old_upload.parent.exists()
    assert not failed_staging.exists()
    assert fresh_upload.exists() and live_staging.exists()


def test_request_options_reject_with_words():
    methods = ["gradcam", "eigencam"]
    assert serve.request_options("gradcam", "predicted", "0.5", methods, "predicted") == {
        "method": "gradcam",
        "target": None,
        "alpha": 0.5,
    }
    with pytest.raises(serve.RequestError, match="method must be one of gradcam, eigencam; got 'x'"):
        serve.request_options("x", None, 0.5, methods, "predicted")
    with pytest.raises(serve.RequestError, match="scorecam takes seconds per image: the /explain endpoint"):
        serve.request_options("scorecam", None, 0.5, methods, "predicted")
    for bad in (None, "abc", [1]):
        with pytest.raises(serve.RequestError, match="alpha \\(heatmap opacity\\) must be a number in \\[0, 1\\]"):
            serve.request_options("gradcam", None, bad, methods, "predicted")


def test_request_path_says_what_is_missing(tmp_path):
    assert serve.request_path({"path": str(EXAMPLES / "glioma_1.jpg")}) == str(EXAMPLES / "glioma_1.jpg")
    with pytest.raises(serve.RequestError, match="Send an image or DICOM file"):
        serve.request_path(None)
    with pytest.raises(serve.RequestError, match="no longer on the server"):
        serve.request_path(str(tmp_path / "gone.jpg"))
