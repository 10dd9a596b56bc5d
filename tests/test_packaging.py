"""pyproject.toml declares the same pinned runtime dependencies as requirements.txt."""

from __future__ import annotations

import pytest
from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_pyproject_pins_what_requirements_txt_pins():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = (REPO / "requirements.txt").read_text().splitlines()
    pinned = [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
    assert declared == pinned


def test_the_browser_tests_skip_message_names_what_is_missing():
    from conftest import browser_missing

    assert browser_missing("/usr/bin/chromium", "/usr/bin/chromedriver") is None
    assert browser_missing("/usr/bin/chromium", None).startswith("chromedriver not found")
    assert browser_missing(None, "/usr/bin/chromedriver").startswith("chromium not found")
    assert browser_missing(None, None).startswith("chromium and chromedriver not found")
    assert "apt-get install -y chromium chromium-driver" in browser_missing(None, None)


def test_the_readme_cpu_install_line_pins_the_same_torch():
    pins = dict(
        line.split("#")[0].strip().split("==")
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if "==" in line
    )
    readme = (REPO / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "download.pytorch.org/whl/cpu" in ln)
    assert f"torch=={pins['torch']}" in line and f"torchvision=={pins['torchvision']}" in line, line
