"""Inference latency on CPU: bare forward vs ``predict`` with and without explanations.

    python benchmarks/latency.py [--weights DIR] [--threads 2] [--repeats 30] [--methods gradcam,gradcam++]

Times, per input (a decoded 224 x 224 slice and a 512 x 512 JPEG file): the bare model forward on the
prepared tensor, the inference core on the uint8 square (:func:`tumor_xai.inference.forward`), ``predict(explain=False)`` and ``predict(explain=True)`` for each method. Prints p50
and p95 in milliseconds and the ratio the bar is about: default-method ``predict(explain=True)`` p50
over the bare forward p50 (bar <= 2.0, target 1.0-1.3).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as app.py runs: see the note there

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tumor_xai import inference
from tumor_xai.decode import load_image
from tumor_xai.explain import DEFAULT_METHOD, METHODS
from tumor_xai.predictor import Predictor
from tumor_xai.preprocess import to_square_u8

REPO = Path(__file__).resolve().parent.parent


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = sorted(t * 1000 for t in times)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]


def sample_slice() -> np.ndarray:
    """A real example slice if the repository ships one, else a synthetic head-like slice (uint8)."""
    examples = sorted((REPO / "assets" / "examples").glob("*.jpg"))
    if examples:
        return np.round(load_image(examples[0]).gray * 255).astype(np.uint8)
    yy, xx = np.mgrid[:224, :224]
    img = np.where((yy - 112) ** 2 + (xx - 112) ** 2 < 95**2, 100.0, 0.0)
    img += np.random.default_rng(0).normal(0, 10, img.shape)
    img[(yy - 80) ** 2 + (xx - 140) ** 2 < 15**2] = 230
    return np.clip(img, 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="weights folder (default: the repository's weights/)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if m != "scorecam"),
        help="comma-separated explanation methods to time (scorecam: one forward per channel, slow)",
    )
    p.add_argument("--channels-last", action="store_true", help="convert the model to channels_last first")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    predictor = Predictor.from_pretrained(args.weights)
    if args.channels_last:
        predictor.model.to(memory_format=torch.channels_last)
    size = predictor.preprocess.input_size
    print(
        f"weights {predictor.weights.path} ({predictor.weights.metadata['arch']}, {size} px), torch {torch.__version__}, "
        f"{args.threads} thread(s), {args.repeats} repeats, channels_last={args.channels_last}"
    )

    base = sample_slice()
    decoded224 = load_image(np.asarray(Image.fromarray(base).resize((224, 224))))
    with tempfile.TemporaryDirectory() as tmp:
        jpeg = Path(tmp) / "slice512.jpg"
        Image.fromarray(base).resize((512, 512), Image.BILINEAR).save(jpeg, quality=92)
        jpeg_bytes = jpeg.read_bytes()
        inputs = {"decoded 224x224": decoded224, "512x512 JPEG file": jpeg}

        squares = to_square_u8(decoded224.gray, predictor.preprocess)[0][None]
        x = inference.to_input(squares, predictor.preprocess, channels_last=args.channels_last)

        def bare():
            with torch.inference_mode():
                predictor.model(x)

        cases = {
            "bare forward (prepared tensor)": bare,
            "inference.forward (uint8 square)": lambda: inference.forward(
                predictor.model, squares, predictor.preprocess
            ),
        }
        for name, src in inputs.items():
            cases[f"{name}: predict(explain=False)"] = lambda src=src: predictor.predict(src)
            for m in methods:
                cases[f"{name}: predict(explain=True, {m})"] = lambda src=src, m=m: predictor.predict(
                    src, explain=True, method=m
                )
        cases["512x512 JPEG: decode only"] = lambda: load_image(jpeg_bytes)
        # Round-robin: every case runs once per round, so a busy machine slows all of them alike
        # and the ratios stay comparable.
        times: dict[str, list[float]] = {k: [] for k in cases}
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        rows = [(name, percentiles(ts)) for name, ts in times.items()]

    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'p50 ms':>8}  {'p95 ms':>8}")
    for name, (p50, p95) in rows:
        print(f"{name:{width}}  {p50:8.1f}  {p95:8.1f}")
    bare50 = rows[0][1][0]
    for name in inputs:
        explained = dict(rows)[f"{name}: predict(explain=True, {DEFAULT_METHOD})"][0]
        print(
            f"ratio {name}: predict(explain=True, {DEFAULT_METHOD}) p50 / bare forward p50 = {explained / bare50:.2f} (bar <= 2.0)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
