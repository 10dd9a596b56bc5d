"""Where the server's CPU per answer goes, one request at a time (no concurrency to blur it).

    python benchmarks/server_overhead.py [--weights DIR] [--requests 60]

Prints, on the example slices: the server's CPU per ``/predict`` answer (requests sent one after another
by one ``gradio_client``) and its page faults per answer, the CPU of an in-process ``predict(explain=True)``
alone, and the same while another thread of the process keeps asking for the GIL, as the server's event
loop and Gradio's workers do. The forward pass makes many short torch calls, each of which releases the
GIL and has to take it back; the gap between the last two figures is what that costs. Thousands of page
faults per answer mean glibc hands each prediction's activations back to the system and the next one
touches them anew (see ``tumor_xai.serve.tune_malloc``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import load  # benchmarks/load.py: the server start-up, client and CPU readings

EXAMPLES = load.EXAMPLES


def predict_cpu_ms(predictor, images: list[Path], n: int) -> float:
    """Thread CPU time of one ``predict(explain=True)``, mean over ``n`` calls after a warm-up."""
    for path in images[:3]:
        predictor.predict(path, explain=True)
    start = time.thread_time()
    for i in range(n):
        predictor.predict(images[i % len(images)], explain=True)
    return 1000 * (time.thread_time() - start) / n


def with_gil_contention(fn):
    """Run ``fn()`` while another thread spins in Python (it holds the GIL whenever it can)."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        return fn()
    finally:
        stop.set()
        spinner.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="weights folder (default: the repository's weights/)")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--app", type=Path, default=load.REPO / "app.py")
    p.set_defaults(concurrency=None)  # load.start_server: the app's own default
    args = p.parse_args(argv)
    images = sorted(EXAMPLES.glob("*.jpg"))

    import torch
    from gradio_client import handle_file

    from tumor_xai.predictor import Predictor

    with tempfile.TemporaryDirectory(prefix="tumor-xai-overhead-") as work, load.client_temp(work):
        port = load.free_port()
        proc = load.start_server(args, port, work)
        try:
            url = f"http://127.0.0.1:{port}/"
            load.wait_first_answer(url, proc, images[0], time.perf_counter(), 120.0)
            client = load.make_client(url)
            for path in images[:3]:
                client.predict(handle_file(str(path)), api_name="/predict")
            before, faults = load.cpu_seconds(proc.pid), load.minor_faults(proc.pid)
            for i in range(args.requests):
                client.predict(handle_file(str(images[i % len(images)])), api_name="/predict")
            server_ms = 1000 * (load.cpu_seconds(proc.pid) - before) / args.requests
            faults = (load.minor_faults(proc.pid) - faults) / args.requests
        finally:
            proc.terminate()
            proc.wait()

    torch.set_num_threads(1)  # as each of the server's two prediction workers
    predictor = Predictor.from_pretrained(args.weights)
    alone = predict_cpu_ms(predictor, images, args.requests)
    contended = with_gil_contention(lambda: predict_cpu_ms(predictor, images, args.requests))
    print(f"server CPU per /predict answer, one request at a time: {server_ms:.1f} ms ({faults:.0f} page faults)")
    print(f"in-process predict(explain=True), one thread:          {alone:.1f} ms CPU")
    print(f"the same while another thread wants the GIL:           {contended:.1f} ms CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
