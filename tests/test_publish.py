"""The Space publishing script: its dry run lists what would go up, and where, without the network."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_dry_run_lists_the_space_files_and_what_goes_to_lfs():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="")  # any network call would fail
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "publish_space.py"), "someone/tumor-xai", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split()[-1]: line.split()[0] for line in out.stdout.splitlines() if line.startswith(("lfs", "reg"))}
    for needed in ("README.md", "app.py", "requirements.txt", "tumor_xai/predictor.py", "weights/model.json"):
        assert rows.get(needed) == "regular", needed
    assert rows["weights/model.safetensors"] == "lfs/xet"  # over 10 MB: the Hub refuses it as a plain file
    assert all(kind == "lfs/xet" for path, kind in rows.items() if path.endswith((".png", ".jpg")))
    assert not [p for p in rows if p.startswith(("tests/", "benchmarks/", "scripts/", ".ci/"))]
    assert "dry run: nothing uploaded" in out.stdout and "-> spaces/someone/tumor-xai" in out.stdout
