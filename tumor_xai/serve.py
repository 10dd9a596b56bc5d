"""The server's side of the app, without Gradio: checked requests, output files, a cache that empties itself.

Requests: every failure a client can cause becomes :class:`RequestError` (a title and a message a person
can act on), which the app turns into ``gr.Error``; slow explanations run on a low-priority thread of
their own; photos over 16 MP are decoded one at a time. Generated images are JPEG files in the cache root.

Cache: Gradio keeps uploads and generated files under ``GRADIO_TEMP_DIR``. Its ``delete_cache`` only
deletes files it registered, so upload staging files (``tmp*`` in the cache root, kept when an upload
fails part-way) stayed, and a SIGTERM (what Spaces, docker and systemd send) ended the process before
any clean-up. Here the app gets a folder of its own inside ``GRADIO_TEMP_DIR``; :class:`CacheSweeper`
deletes every file in it older than the configured age, and :func:`install_shutdown` turns SIGTERM into
the same orderly stop as Ctrl-C and deletes the folder on the way out. Imports nothing from Gradio: the
folder must be chosen before Gradio reads the environment.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import functools
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tumor_xai import report
from tumor_xai.decode import InvalidImageError
from tumor_xai.explain import SLOW_METHODS, ExplanationTimeout
from tumor_xai.predictor import Prediction, Predictor

__all__ = [
    "CacheSweeper",
    "RequestError",
    "batch_request",
    "get_args_parser",
    "install_shutdown",
    "predict_request",
    "prepare_process",
    "private_cache_dir",
    "request_options",
    "request_path",
    "save_jpeg",
    "serve_forever",
    "slice_image",
    "sweep",
    "tune_malloc",
]

logger = logging.getLogger(__name__)

# Images with more pixels than this are decoded one at a time: each costs a few hundred MB at its peak.
LARGE_PIXELS = 4096 * 4096
_LARGE_DECODE = threading.Semaphore(1)
# Files directly in the cache root are upload staging files: written continuously while an upload
# arrives, so one untouched for this long belongs to an upload that failed.
STALE_STAGING_S = 60.0


def private_cache_dir() -> Path:
    """A new folder inside ``GRADIO_TEMP_DIR`` (default ``<tmp>/gradio``), set as ``GRADIO_TEMP_DIR``.

    Call it before ``import gradio``, which reads the variable at import time.
    """
    base = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="tumor-xai-", dir=base))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


def sweep(root: Path, age: float, staging_age: float = STALE_STAGING_S) -> int:
    """Delete files under ``root`` not modified for ``age`` seconds (root-level staging files after
    ``staging_age``) and the folders this empties; returns the number of files deleted."""
    now, deleted = time.time(), 0
    for folder, _dirs, files in os.walk(root, topdown=False):
        limit = min(age, staging_age) if Path(folder) == root else age
        for name in files:
            path = os.path.join(folder, name)
            try:
                if now - os.lstat(path).st_mtime > limit:
                    os.remove(path)
                    deleted += 1
            except FileNotFoundError:  # deleted by Gradio or a request meanwhile
                continue
        if Path(folder) != root:
            try:
                os.rmdir(folder)  # only succeeds when empty
            except OSError:
                pass
    return deleted


class CacheSweeper(threading.Thread):
    """Every ``frequency`` seconds, :func:`sweep` ``root`` with ``age``; :meth:`stop` ends it."""

    def __init__(self, root: Path, frequency: float, age: float):
        super().__init__(name="cache-sweeper", daemon=True)
        self.root, self.frequency, self.age = Path(root), frequency, age
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.frequency):
            n = sweep(self.root, self.age)
            if n:
                logger.info("deleted %d cached file(s) older than %g s", n, self.age)

    def stop(self) -> None:
        self._stop_event.set()


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        logger.warning("could not delete the cache folder %s", folder)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, for its malloc controls; None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _trim_heap() -> None:
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def tune_malloc(
    mmap_threshold: int = 4 << 20, arenas: int = 2, trim_threshold: int = 64 << 20, top_pad: int = 16 << 20
) -> bool:
    """glibc only: blocks of ``mmap_threshold`` bytes and more that the heap cannot serve (decoded photos) go
    back to the system when freed, threads share ``arenas`` heaps, and each heap keeps up to
    ``trim_threshold`` bytes of freed memory (growing by ``top_pad`` extra) for the next request. False
    elsewhere.

    Without the first two, glibc raises its threshold after the first large free and a server that decoded
    a few 6000 px images kept a gigabyte it no longer used. Fixing the threshold also fixes glibc's trim
    threshold at 128 kB, so each prediction's freed activations went back to the system and the next one
    faulted them in again: 10 000 page faults and 18 ms of system CPU per answer, the server's CPU per
    request 1.6 x an in-process call instead of 1.25 x (``benchmarks/load.py``).
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = {-1: trim_threshold, -2: top_pad, -3: mmap_threshold, -8: arenas}  # M_* from glibc's malloc.h
    applied = [libc.mallopt(option, value) == 1 for option, value in settings.items()]  # each, even after a refusal
    return all(applied)


def install_shutdown(folder: Path) -> None:
    """SIGTERM stops the server like Ctrl-C (KeyboardInterrupt in the main thread), and ``folder``
    is deleted when the process exits either way. Call from the main thread."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit.register(_remove, folder)


# ----------------------------------------------------------------------------- settings and the server loop

# Our own settings: flag -> (environment variable, default, meaning). Address and share link are Gradio's.
SETTINGS = {
    "--weights": ("TUMOR_XAI_WEIGHTS", None, "weights folder (default: the repository's weights/)"),
    "--concurrency": ("TUMOR_XAI_CONCURRENCY", "2", "predictions at once, each with cores / N torch threads"),
    "--queue-size": ("TUMOR_XAI_QUEUE_SIZE", "64", "requests waiting beyond this are refused"),
    "--max-file-size": ("TUMOR_XAI_MAX_FILE_SIZE", "20mb", "upload limit"),
    "--cache-frequency": ("TUMOR_XAI_CACHE_FREQUENCY", "300", "seconds between sweeps of uploads and outputs"),
    "--cache-age": ("TUMOR_XAI_CACHE_AGE", "900", "seconds an upload or output is kept"),
    "--max-batch": ("TUMOR_XAI_MAX_BATCH", "32", "files per batch request"),
}


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def get_args_parser() -> argparse.ArgumentParser:
    """The flags; a flag's default is its environment variable's value, else the built-in default."""
    p = argparse.ArgumentParser(description="Serve the tumor-xai app (research demo, not a diagnostic device).")
    p.add_argument("--host", help="interface to listen on (default: GRADIO_SERVER_NAME, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: GRADIO_SERVER_PORT, else 7860)")
    p.add_argument("--share", action="store_true", default=None, help="also a public gradio.live link (GRADIO_SHARE)")
    for flag, (var, default, meaning) in SETTINGS.items():
        kind = str if flag in ("--weights", "--max-file-size") else _positive
        p.add_argument(flag, type=kind, default=os.environ.get(var, default), help=f"{meaning} (env {var})")
    return p


# Seconds a stop signal waits for open connections: an answer in flight finishes, while the event streams
# that idle browser tabs keep open do not hold the stop up (uvicorn waits for them until Gradio gives up
# after 5 s, and a container's grace period before SIGKILL is often 10 s).
STOP_GRACE_S = 1.0


def prepare_process(cache: Path, concurrency: int) -> None:
    """A serving process's set-up: stop signals that clean up ``cache``, glibc told to return large
    blocks, and torch threads shared among ``concurrency`` predictions (two 1-thread predictions beat
    one 2-thread one). Call from the main thread, once."""
    install_shutdown(cache)
    tune_malloc()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // concurrency))


def serve_forever(demo: Any, args: argparse.Namespace, cache: Path, **launch: Any) -> None:
    """Launch ``demo`` with the address, share link and upload limit of ``args`` and serve until SIGTERM
    or Ctrl-C, sweeping ``cache`` meanwhile (see :class:`CacheSweeper` and :func:`install_shutdown`)."""
    sweeper = CacheSweeper(cache, args.cache_frequency, args.cache_age)
    sweeper.start()
    try:
        # quiet: Gradio's own start-up lines tell the user to set share=True in launch(), not our --share.
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            max_file_size=args.max_file_size,
            prevent_thread_lock=True,
            quiet=True,
            **launch,
        )
        demo.server.config.timeout_graceful_shutdown = STOP_GRACE_S
        print(f"* Running on local URL:  {demo.local_url}", flush=True)
        if not demo.share_url:  # with a link, Gradio has printed it ("Running on public URL")
            print("* For a temporary public link, start with --share (or GRADIO_SHARE=true).", flush=True)
        _block_until_stopped(demo)
    finally:
        sweeper.stop()


def _block_until_stopped(demo: Any) -> None:
    """Gradio's ``block_thread`` with our own words: a stop signal is no "Keyboard interruption"."""
    try:
        while demo.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:  # SIGINT, and SIGTERM through install_shutdown
        print("stopping: closing the server and deleting its cache folder", flush=True)
        demo.close(verbose=False)
        from gradio.tunneling import CURRENT_TUNNELS  # the --share link's tunnel, if any

        for tunnel in CURRENT_TUNNELS:
            tunnel.kill()


# ----------------------------------------------------------------------------- requests


class RequestError(Exception):
    """A request the server cannot serve, with a short ``title`` and a ``message`` that says why."""

    def __init__(self, message: str, title: str):
        super().__init__(message)
        self.message, self.title = message, title


def cache_root() -> Path:
    """Gradio's cache folder, as Gradio itself resolves it."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def request_path(file: Any) -> str:
    """The server path of an uploaded file (a path, or Gradio's FileData as a dict or object)."""
    path = file.get("path") if isinstance(file, dict) else getattr(file, "path", file)
    if not path:
        raise RequestError("Send an image or DICOM file.", "No file")
    if not Path(path).is_file():
        raise RequestError("This upload is no longer on the server; upload the file again.", "Upload expired")
    return str(path)


def request_options(method: Any, target: Any, alpha: Any, methods: Sequence[str], predicted: str) -> dict:
    """``predict`` keyword arguments from untrusted values; ``target == predicted`` explains the top class."""
    if method in SLOW_METHODS and method not in methods:
        raise RequestError(f"{method} takes seconds per image: the /explain endpoint runs it, one at a time", "Slow")
    if method not in methods:
        raise RequestError(f"method must be one of {', '.join(methods)}; got {method!r}", "Invalid option")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise RequestError(
            f"alpha (heatmap opacity) must be a number in [0, 1]; got {alpha!r}", "Invalid option"
        ) from None
    return {"method": method, "target": None if target in (None, "", predicted) else target, "alpha": alpha}


def _pixels(path: str) -> int:
    """Width x height from the file's header (0 when Pillow cannot read it, e.g. DICOM); decodes nothing."""
    try:
        with Image.open(path) as im:
            return im.width * im.height
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0


def _lower_priority() -> None:
    try:  # Linux: a thread's own nice value; elsewhere the whole process's, so leave it
        if sys.platform == "linux":
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SLOW_NICE)
    except OSError:
        logger.warning("could not lower the priority of the slow-explanation thread")


# Slow explanations run on one thread of their own at a lower CPU priority: when the cores are busy,
# the scheduler serves plain Grad-CAM requests first instead of splitting the cores evenly.
SLOW_NICE = 10
_SLOW_LANE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slow-explanations", initializer=_lower_priority)


def predict_request(predictor: Predictor, path: str, **options: Any) -> Prediction:
    """``predictor.predict`` (explained when options are given) with every client-caused failure a RequestError.

    Images over :data:`LARGE_PIXELS` take turns, so concurrent uploads of huge photos cannot add up
    their decoding peaks; slow methods (ScoreCAM) run on the low-priority slow-explanation thread.
    """
    large = _pixels(path) > LARGE_PIXELS
    try:
        if large:
            _LARGE_DECODE.acquire()
        if options.get("method") in SLOW_METHODS:
            return _SLOW_LANE.submit(predictor.predict, path, explain=True, **options).result()
        return predictor.predict(path, explain=bool(options), **options)
    except InvalidImageError as exc:  # the message names the server's temporary path: show the file's name
        raise RequestError(str(exc).replace(path, Path(path).name), "Cannot read this file") from None
    except ValueError as exc:  # an option outside the predictor's choices
        raise RequestError(str(exc), "Invalid option") from None
    except ExplanationTimeout as exc:
        raise RequestError(str(exc), "Explanation took too long") from None
    finally:
        if large:
            _trim_heap()  # hand the photo's freed buffers back before the next one arrives
            _LARGE_DECODE.release()


def save_jpeg(img: Image.Image | None) -> str | None:
    """``img`` as a JPEG file of its own in the cache root (Gradio serves a copy; the sweep deletes this one).

    JPEG, not PNG: a tenth of the encoding time and of the bytes sent for an overlay.
    """
    if img is None:
        return None
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".jpg", prefix="out-", dir=root)
    with os.fdopen(fd, "wb") as f:
        img.convert("RGB").save(f, format="JPEG", quality=90)
    return path


def slice_image(pred: Prediction) -> Image.Image:
    """The decoded slice exactly as the model read it (DICOM never renders otherwise)."""
    return Image.fromarray(np.round(np.clip(pred.image.gray, 0.0, 1.0) * 255.0).astype(np.uint8))


def batch_request(
    predictor: Predictor, files: list[Any] | None, options: dict, max_batch: int, gallery: bool = True
) -> tuple[list[str], list[dict], list[tuple[str, str]], str]:
    """Classify ``files``: (columns, rows, overlays as (path, caption), CSV path); bad files are rows.

    ``gallery=False`` skips writing the overlays (the API returns none).
    """
    paths = [request_path(f) for f in files or []]
    if not paths:
        raise RequestError("Add one or more image or DICOM files first.", "No files")
    if len(paths) > max_batch:
        raise RequestError(f"{len(paths)} files is more than the {max_batch} taken at once; split them.", "Too many")
    names, rows, overlays = predictor.class_names, [], []
    for path in paths:
        name = Path(path).name
        try:
            pred = predict_request(predictor, path, **options)
        except RequestError as exc:
            rows.append(report.batch_row(name, names, None, error=exc.message))
            continue
        rows.append(report.batch_row(name, names, pred))
        if gallery and pred.in_distribution:
            overlays.append((save_jpeg(pred.overlay), f"{name}: {pred.label} {pred.probabilities[pred.label]:.0%}"))
    columns = report.batch_columns(names)
    csv_path = Path(tempfile.mkdtemp(dir=cache_root())) / "tumor-xai-results.csv"
    report.write_csv(csv_path, rows, columns)
    return columns, rows, overlays, str(csv_path)
