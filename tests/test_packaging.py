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
