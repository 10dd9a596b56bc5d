"""Publish this repository as a Hugging Face Space: ``python scripts/publish_space.py USER/tumor-xai``.

Uploads the files git tracks (from a fresh clone: the weights are real files here, not LFS pointers)
with ``huggingface_hub``'s ``upload_folder``, leaving out what the Space does not run (tests,
benchmarks, CI, scripts). The Hub stores files over 10 MB and binary files (the weights, images) in
LFS/Xet by itself, so this repository needs no LFS filter. ``--dry-run`` lists what would be uploaded
and which files go to LFS/Xet, and touches no network. The token comes from ``HF_TOKEN`` or
``hf auth login``. The README's front matter is the Space's configuration; it is checked first.
"""

from __future__ import annotations

import argparse
import glob
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LEAVE_OUT = ("tests/", "benchmarks/", "scripts/", ".ci/", ".github/", ".gitignore", "pytest.ini", "weights/candidates/")
LFS_SIZE = 10 * 1024 * 1024  # the Hub refuses plain git files above this
BINARY_SNIFF = 8000  # bytes read for a NUL, git's own test for a binary file


def tracked_files(root: Path) -> list[str]:
    """Files git tracks under ``root`` that the Space needs, as POSIX paths relative to it."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    files = [f for f in out.decode().split("\0") if f]
    return sorted(f for f in files if not f.startswith(LEAVE_OUT) and (root / f).is_file())


def goes_to_lfs(path: Path) -> bool:
    """Whether the Hub stores ``path`` in LFS/Xet: over 10 MB, or binary."""
    if path.stat().st_size > LFS_SIZE:
        return True
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF)


def check_front_matter(root: Path) -> list[str]:
    """Problems with the README's Space configuration, as sentences (empty when it is valid)."""
    text = (root / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    if not match:
        return ["README.md does not start with a --- front matter block (the Space's configuration)"]
    meta = dict(line.split(":", 1) for line in match.group(1).splitlines() if ":" in line)
    meta = {k.strip(): v.strip().strip('"') for k, v in meta.items()}
    problems = []
    if meta.get("sdk") != "gradio":
        problems.append(f"front matter sdk is {meta.get('sdk')!r}, not 'gradio'")
    if not (root / meta.get("app_file", "")).is_file():
        problems.append(f"front matter app_file {meta.get('app_file')!r} is not a file")
    pinned = re.search(r"^gradio==(\S+)", (root / "requirements.txt").read_text(), re.M)
    if not pinned or meta.get("sdk_version") != pinned.group(1):
        problems.append(f"front matter sdk_version {meta.get('sdk_version')!r} differs from requirements.txt's gradio")
    return problems


def check_weights(root: Path, files: list[str]) -> list[str]:
    weights = root / "weights" / "model.safetensors"
    if "weights/model.safetensors" not in files:
        return ["weights/model.safetensors is not tracked: the Space would start without a model"]
    if weights.read_bytes()[:100].startswith(b"version https://git-lfs"):
        return ["weights/model.safetensors is a Git LFS pointer, not the weights: run `git lfs pull` first"]
    return []


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repo_id", help="the Space, as USER/NAME (created if it does not exist)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    p.add_argument("--private", action="store_true", help="create the Space private")
    p.add_argument("--message", default="Publish tumor-xai", help="commit message on the Hub")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    files = tracked_files(REPO)
    problems = check_front_matter(REPO) + check_weights(REPO, files)
    if problems:
        print("cannot publish:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    lfs = [f for f in files if goes_to_lfs(REPO / f)]
    total = sum((REPO / f).stat().st_size for f in files)
    for f in files:
        print(f"{'lfs/xet' if f in lfs else 'regular':8} {(REPO / f).stat().st_size:>12,}  {f}")
    print(f"{len(files)} files, {total / 1e6:.1f} MB; {len(lfs)} stored in LFS/Xet by the Hub -> spaces/{args.repo_id}")
    if args.dry_run:
        print("dry run: nothing uploaded")
        return 0

    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(args.repo_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
    api.upload_folder(
        repo_id=args.repo_id,
        repo_type="space",
        folder_path=REPO,
        allow_patterns=[glob.escape(f) for f in files],
        commit_message=args.message,
    )
    print(f"published: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
