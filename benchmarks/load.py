"""Load and start-up benchmark for the Gradio app: N concurrent gradio_client users x R requests.

Steps, all on this machine:

1. The reference rate: ``Predictor.predict(path, explain=True)`` timed in this process, one call
   after another, on the same example slices (the best a single process can do on these cores).
2. Cold start: ``python app.py`` is started as a subprocess; the time from process start to its first
   answered ``/predict`` request.
3. Load: ``--users`` threads, each with its own ``gradio_client.Client``, send ``--requests``
   ``/predict`` calls each, as fast as answers come back. Reported: p50/p95/max latency, throughput,
   failed requests (the app answered with an error or the queue refused), dropped connections (the
   transport broke: "peer closed connection", resets, timeouts), and the server's resident memory
   (VmRSS and its peak VmHWM from /proc/<pid>/status) after the run.

Usage::

    python benchmarks/load.py --weights weights --users 16 --requests 20

On a 2-core machine the load generator competes with the server: each gradio_client request costs
the client about as much CPU as the server spends on it (uploads, a fresh httpx client per call, the
event stream, the overlay download), so the script also reports CPU per request on both sides.

Dropped connections ("peer closed connection without sending complete message body") came from
Gradio writing a PIL output to ``<cache>/<hash of its bytes>/image.png`` in place: two users who get
the same picture at once share that path and one truncates it while the other downloads it. The app
writes each answer's images to a file of its own (see ``app._save_png``).

The bars this project holds the app to on a 2-core machine: zero failed requests, zero dropped
connections, throughput >= 70 % of the reference rate, RSS <= 1.5 GB, cold start <= 20 s.
The exit status is 1 when a bar is missed, so CI can use it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "assets" / "examples"

BARS = {"throughput_ratio": 0.70, "rss_mb": 1536.0, "cold_start_s": 20.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time that process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of ``pid`` in MB, read from /proc (psutil is not a dependency)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024.0  # kB -> MB
    return out


def reference_rate(weights: str | None, images: list[Path], n: int, warmup: int = 5) -> tuple[float, dict[int, float]]:
    """The best sequential in-process ``predict(explain=True)`` rate, in calls per second.

    Timed with one torch thread and with one per core (whichever is faster is the reference, so the
    bar is as strict as it can be), each as 1 / median call time: on a shared machine other
    processes' bursts inflate single calls, and the median ignores them.
    """
    import torch

    sys.path.insert(0, str(REPO))
    from tumor_xai import Predictor

    predictor = Predictor.from_pretrained(weights)
    before = torch.get_num_threads()
    rates = {}
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        torch.set_num_threads(threads)
        for i in range(warmup):  # oneDNN builds its kernels during the first calls
            predictor.predict(images[i % len(images)], explain=True)
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            predictor.predict(images[i % len(images)], explain=True)
            times.append(time.perf_counter() - t0)
        rates[threads] = 1.0 / statistics.median(times)
    torch.set_num_threads(before)
    return max(rates.values()), rates


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_server(args: argparse.Namespace, port: int, cache_dir: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--host", "127.0.0.1", "--no-share"]
    if args.weights:
        cmd += ["--weights", args.weights]
    if args.concurrency:
        cmd += ["--concurrency", str(args.concurrency)]
    env = dict(os.environ, GRADIO_TEMP_DIR=cache_dir, PYTHONUNBUFFERED="1")
    log = open(Path(cache_dir) / "server.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def make_client(url: str):
    """A client with gradio_client's default settings, as a user's script would have."""
    from gradio_client import Client

    return Client(url, verbose=False)


def wait_first_answer(url: str, proc: subprocess.Popen, image: Path, t_start: float, limit: float) -> float:
    from gradio_client import handle_file

    while time.perf_counter() - t_start < limit:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before answering")
        try:
            make_client(url).predict(handle_file(str(image)), api_name="/predict")
            return time.perf_counter() - t_start
        except (httpx.TransportError, ValueError, ConnectionError):
            time.sleep(0.1)
    raise SystemExit(f"no answer from the server within {limit:.0f} s")


def is_dropped(exc: BaseException) -> bool:
    """A broken transport (as opposed to an error the app itself returned)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, (httpx.TransportError, ConnectionError)) or any(
        s in text for s in ("peer closed", "connection reset", "remoteprotocolerror", "timed out", "connection refused")
    )


def run_load(url: str, images: list[Path], users: int, requests: int) -> dict:
    from gradio_client import handle_file

    latencies: list[float] = []
    failures: list[str] = []
    dropped: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(users + 1)

    def user(idx: int) -> None:
        try:
            client = make_client(url)
        except Exception as exc:  # noqa: BLE001 - any failure to connect is a result to report
            with lock:
                (dropped if is_dropped(exc) else failures).extend([f"client setup: {exc!r}"] * requests)
            ready.wait()
            return
        ready.wait()
        for r in range(requests):
            image = images[(idx + r) % len(images)]
            t0 = time.perf_counter()
            try:
                out = client.predict(handle_file(str(image)), api_name="/predict")
                ok = isinstance(out, (list, tuple)) and isinstance(out[0], dict) and out[0].get("label")
            except Exception as exc:  # noqa: BLE001 - every kind of failure is counted
                with lock:
                    (dropped if is_dropped(exc) else failures).append(repr(exc)[:300])
                continue
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    failures.append(f"unexpected answer {str(out)[:200]}")

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    ready.wait()  # clients are connected: time only the requests
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "failures": failures, "dropped": dropped, "wall_s": wall}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="weights folder (default: the repository's weights/)")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--requests", type=int, default=20, help="requests per user")
    p.add_argument("--concurrency", type=int, default=None, help="passed to app.py --concurrency (default: the app's)")
    p.add_argument("--reference-calls", type=int, default=40, help="in-process predict calls for the reference rate")
    p.add_argument("--start-limit", type=float, default=120.0, help="seconds to wait for the server's first answer")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    images = sorted(EXAMPLES.glob("*.jpg"))
    if not images:
        raise SystemExit(f"no example slices in {EXAMPLES}")

    print(f"{len(os.sched_getaffinity(0))} CPUs, load average {load_average()} before the run", flush=True)
    ref, by_threads = reference_rate(args.weights, images, args.reference_calls)
    detail = ", ".join(f"{t} thread(s): {r:.2f}/s" for t, r in by_threads.items())
    print(f"reference: in-process predict(explain=True), best of [{detail}]: {ref:.2f} images/s", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="tumor-xai-load-") as cache_dir:
        t_start = time.perf_counter()
        proc = start_server(args, port, cache_dir)
        try:
            cold = wait_first_answer(url, proc, images[0], t_start, args.start_limit)
            print(f"cold start (process start -> first answer): {cold:.1f} s", flush=True)
            server_cpu0, client_cpu0 = cpu_seconds(proc.pid), time.process_time()
            res = run_load(url, images, args.users, args.requests)
            server_cpu, client_cpu = cpu_seconds(proc.pid) - server_cpu0, time.process_time() - client_cpu0
            mem = vm_status(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log = (Path(cache_dir) / "server.log").read_text(errors="replace")

    lat = res["latencies"]
    total = args.users * args.requests
    throughput = len(lat) / res["wall_s"]
    figures = {
        "users": args.users,
        "requests_per_user": args.requests,
        "requests": total,
        "answered": len(lat),
        "failed": len(res["failures"]),
        "dropped": len(res["dropped"]),
        "p50_s": percentile(lat, 50),
        "p95_s": percentile(lat, 95),
        "max_s": max(lat) if lat else float("nan"),
        "wall_s": res["wall_s"],
        "throughput_per_s": throughput,
        "reference_per_s": ref,
        "reference_by_threads": by_threads,
        "throughput_ratio": throughput / ref,
        "rss_mb": mem.get("VmRSS", float("nan")),
        "peak_rss_mb": mem.get("VmHWM", float("nan")),
        "cold_start_s": cold,
        "server_cpu_ms_per_request": 1000 * server_cpu / max(1, len(lat)),
        "client_cpu_ms_per_request": 1000 * client_cpu / max(1, len(lat)),
        "server_cpu_efficiency": (1000 / ref) / max(1e-9, 1000 * server_cpu / max(1, len(lat))),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_after": load_average(),
    }
    print(
        f"{args.users} users x {args.requests} requests: {len(lat)}/{total} answered, "
        f"{figures['failed']} failed, {figures['dropped']} dropped connections\n"
        f"latency p50 {figures['p50_s']:.2f} s, p95 {figures['p95_s']:.2f} s, max {figures['max_s']:.2f} s\n"
        f"throughput {throughput:.2f} images/s = {figures['throughput_ratio']:.0%} of the in-process rate\n"
        f"server RSS after the run {figures['rss_mb']:.0f} MB (peak {figures['peak_rss_mb']:.0f} MB)\n"
        f"CPU per request: server {figures['server_cpu_ms_per_request']:.0f} ms, these gradio_client users "
        f"{figures['client_cpu_ms_per_request']:.0f} ms (in-process predict: {1000 / ref:.0f} ms wall)\n"
        f"server CPU efficiency {figures['server_cpu_efficiency']:.0%} (in-process call time / server CPU per request; "
        f"unlike throughput, other processes on the machine, this script included, do not move it)\n"
        f"load average after the run {figures['load_average_after']}"
    )
    for kind in ("failures", "dropped"):
        for msg in sorted(set(res[kind]))[:5]:
            print(f"  {kind}: {msg}")
    if res["failures"] or res["dropped"]:
        print("--- server log (last 40 lines) ---\n" + "\n".join(log.splitlines()[-40:]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")

    missed = []
    if figures["failed"] or figures["dropped"]:
        missed.append("failed or dropped requests")
    if figures["throughput_ratio"] < BARS["throughput_ratio"]:
        missed.append(f"throughput below {BARS['throughput_ratio']:.0%} of the in-process rate")
    if figures["rss_mb"] > BARS["rss_mb"]:
        missed.append(f"RSS above {BARS['rss_mb']:.0f} MB")
    if cold > BARS["cold_start_s"]:
        missed.append(f"cold start above {BARS['cold_start_s']:.0f} s")
    print("bars: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
