"""Shared fixtures: a tiny synthetic dataset in the Kaggle layout and tiny weights folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# The tests run tiny models: one intra-op thread is faster than two, and on a busy 2-core machine
# two OpenMP threads spin-wait on each other (a 64 px batch of 8 then takes ~0.8 s instead of ~2 ms).
# Subprocesses the tests start (the CLIs, torchrun) inherit this; an explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from PIL import Image  # noqa: E402

# torch is imported by the tests and fixtures that use it, not here: the pytest-xdist controller loads this
# file too, and importing torch and torchvision there delayed the workers' start by seconds.


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """torch's intra-op threads as OMP_NUM_THREADS says (one unless set), in every process that runs tests."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


E2E_REASON = (
    "end-to-end test (fresh interpreters: the GPU script, torchrun, stop signals): run `python -m pytest --e2e`"
)


def pytest_addoption(parser):
    parser.addoption(
        "--e2e",
        action="store_true",
        help="also run the tests marked e2e: each starts interpreters of its own, about 2 min in all on 2 cores (CI runs them)",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``e2e`` are skipped, with the command that runs them, unless ``--e2e`` is given."""
    if config.getoption("--e2e"):
        return
    skip = pytest.mark.skip(reason=E2E_REASON)
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


# Modules whose tests share one pytest-xdist worker: the app server (conftest.app_server) and the browser
# start once instead of once per worker (seconds of CPU each), and so do module-scoped fixtures.
# test_scan.py joins the server's worker, which has imported Gradio already (its scan-tab request test needs it).
SHARED_WORKER = {
    "test_app.py": "app-server",
    "test_browser.py": "app-server",
    "test_scan.py": "app-server",
    "test_dataset_report.py": "report",
}


def pytest_xdist_make_scheduler(config, log):
    """Load balancing test by test, except that :data:`SHARED_WORKER` modules run on one worker each and the
    cases of a parametrized test together (they share its module-scoped fixtures). pytest-xdist's own
    ``--dist loadgroup`` marks do not take with pytest 9 (it renames ``item._nodeid``, which pytest 9 no
    longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SHARED_WORKER.get(Path(nodeid.split("::", 1)[0]).name) or nodeid.split("[", 1)[0]

    return SharedFixtureScheduling(config, log)


CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "assets" / "examples"


def synthetic_slice(label: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A grey 'head' disc with a bright blob whose place depends on the class (none for notumor)."""
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    img = np.where((yy - c) ** 2 + (xx - c) ** 2 < (0.42 * size) ** 2, 90.0, 0.0)
    img += rng.normal(0, 8, img.shape)
    spots = {0: (0.3, 0.3), 1: (0.3, 0.7), 3: (0.7, 0.5)}
    if label in spots:
        cy, cx = spots[label]
        cy, cx = cy * size + rng.integers(-3, 4), cx * size + rng.integers(-3, 4)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (0.1 * size) ** 2] = 230.0
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path, per_class: dict[str, int] | None = None, size: int = 64, seed: int = 0) -> Path:
    """Write a Kaggle-layout dataset of synthetic slices under ``root`` and return ``root``."""
    per_class = per_class or {"Training": 10, "Testing": 4}
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(synthetic_slice(label, rng, size)).save(
                    d / f"{split[:2]}-{name[:2]}_{i:04d}.jpg", quality=95
                )
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """40 training and 16 testing synthetic 64 px slices in the Kaggle layout."""
    return make_dataset(tmp_path_factory.mktemp("tiny-data"))


def make_weights(out: Path, input_size: int = 64, seed: int = 0, arch: str = "resnet_tiny", **extra_meta) -> Path:
    """An untrained weights folder (default: the ~20 k-parameter ``resnet_tiny``) with test metadata.

    ``extra_meta`` replaces top-level metadata keys (e.g. ``calibration``, ``screening``, ``class_names``).
    """
    import torch

    from tumor_xai.checkpoint import save_weights
    from tumor_xai.model import build_model
    from tumor_xai.preprocess import PreprocessConfig

    torch.manual_seed(seed)
    class_names = extra_meta.get("class_names", CLASSES)
    model = build_model(arch, len(class_names))
    meta = {
        "arch": arch,
        "class_names": CLASSES,
        "preprocessing": PreprocessConfig(input_size=input_size).to_dict(),
        "calibration": {"temperature": 1.0},
    }
    if "notumor" in class_names:  # a screening threshold is defined on P(notumor)
        meta["screening"] = {"threshold": 0.5, "target_sensitivity": 0.995}
    meta.update(extra_meta)
    return save_weights(model, out, meta)


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory) -> Path:
    """One untrained tiny weights folder at 64 px for the whole session: read it, never write to it."""
    return make_weights(tmp_path_factory.mktemp("tiny-weights") / "weights")


@pytest.fixture()
def tiny_weights(tiny_weights_dir, tmp_path) -> Path:
    """A private copy of the session's tiny weights folder (a few kB), free to modify."""
    return Path(shutil.copytree(tiny_weights_dir, tmp_path / "weights"))


@pytest.fixture(scope="session")
def full_data() -> Path:
    """The real dataset, from TUMOR_XAI_DATA; tests that need it skip with the reason when unset."""
    root = os.environ.get("TUMOR_XAI_DATA")
    if not root:
        pytest.skip("TUMOR_XAI_DATA is not set: point it at the Kaggle Brain Tumor MRI folder to run this test")
    if not Path(root).is_dir():
        pytest.skip(f"TUMOR_XAI_DATA={root} is not a folder")
    return Path(root)


def example_slices(n: int = 6, size: int = 96, marker: bool = True) -> np.ndarray:
    """``n`` real example slices (uint8, ``size`` px); with ``marker`` a bright square in the top-left corner."""
    from tumor_xai.decode import load_image

    files = sorted(EXAMPLES.glob("*.jpg"))
    out = np.zeros((n, size, size), np.uint8)
    for k in range(n):
        gray = load_image(files[k % len(files)]).gray
        out[k] = np.asarray(Image.fromarray(np.round(gray * 255).astype(np.uint8)).resize((size, size)))
    if marker:
        out[:, 2:8, 2:8] = 255  # anterior-right on a radiological display: the orientation tests look for it
    return out


def make_nifti(path: Path, slices: np.ndarray, spacing: float = 2.5, reverse: bool = False) -> Path:
    """A NIfTI scan whose axial slices, displayed, are ``slices`` (N, H, W); stored LPS as the TCIA files are.

    With an LPS affine, voxel (i, j, k) runs to the patient's left, posterior and superior, so the displayed
    slice (anterior up, patient's left on the right) is the stored slice transposed. ``reverse`` stores the
    slices superior first with a negative slice step: the reader must still return them inferior first.
    """
    import nibabel as nib

    data = np.ascontiguousarray(np.transpose(slices, (2, 1, 0))).astype(np.float32)  # (W, H, N)
    affine = np.diag([-1.0, -1.0, spacing, 1.0])
    affine[:3, 3] = [90.0, 120.0, -30.0]
    if reverse:
        data = data[:, :, ::-1].copy()
        affine[2, 2] = -spacing
        affine[2, 3] = -30.0 + spacing * (len(slices) - 1)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def browser_missing(chromium: str | None, chromedriver: str | None) -> str | None:
    """The browser tests' skip reason, naming what is missing (the browser, its driver or both); None if neither."""
    missing = [what for what, path in (("chromium", chromium), ("chromedriver", chromedriver)) if not path]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not found on PATH: the browser tests need the Debian packages chromium and "
        "chromium-driver (`apt-get install -y chromium chromium-driver`)"
    )


@pytest.fixture(scope="module")
def temp_folders(tmp_path_factory):
    """Keep a module's files out of the machine's temp folder: gradio_client downloads every output
    through a new folder there and leaves the folder behind, and in-process handlers write their outputs
    to GRADIO_TEMP_DIR (default ``<tmp>/gradio``)."""
    root = tmp_path_factory.mktemp("temp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(root))
        mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        yield root


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """One ``python app.py`` for the server tests of test_app.py and test_browser.py: (url, cache, weights).

    Starting a server costs seconds of CPU: one per pytest-xdist worker that needs it (module-scoped, each
    module started its own on each worker).
    """
    from test_app import CACHE_AGE, CACHE_FREQUENCY, served_weights, start_app, stop_app

    weights = served_weights(tmp_path_factory)
    cache = tmp_path_factory.mktemp("app-server") / "cache"
    cache.mkdir()
    proc, url = start_app(weights, cache, "--cache-frequency", str(CACHE_FREQUENCY), "--cache-age", str(CACHE_AGE))
    yield url, cache, weights
    stop_app(proc)
