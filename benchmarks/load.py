"""Load and start-up benchmark for the Gradio app: N concurrent gradio_client users x R requests.

Steps, all on this machine:

1. The reference rate: ``Predictor.predict(path, explain=True)`` timed in this process, one call
   after another, on the same example slices (the best a single process can do on these cores).
2. Cold start: ``python app.py`` is started as a subprocess; the time from process start to its first
   answered ``/predict`` request.
3. Load: ``--users`` threads, each with its own ``gradio_client.Client``, send ``--requests``
   ``/predict`` calls each, as fast as answers come back, cycling through the example slices and
   (``--large``, default 2) 6000 px images among them: a 6000 x 6000 JPEG and a 6000 x 6000 RGBA PNG.
   Reported: p50/p95/max latency, throughput, failed requests (the app answered with an error or the
   queue refused), dropped connections (the transport broke: "peer closed connection", resets,
   timeouts), the server's resident memory (VmRSS and its peak VmHWM from /proc/<pid>/status) and the
   server's own CPU time per request (from /proc/<pid>/stat, so the load generator does not count)
   against the CPU time of one in-process ``predict(explain=True)`` on the same images.
4. Slow explanations (``--scorecam N``, default 2): one client's Grad-CAM ``/predict`` p95, first on an
   idle server, then while N clients keep ``/explain`` busy with ScoreCAM (its own queue of one).

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
connections, throughput >= 70 % of what the cores allow with the load generator on them (cores / the
server's and the clients' CPU per request: the reference rate assumes the cores are the server's
alone), peak RSS <= 1.5 GB, server CPU per request
<= 1.5 x an in-process prediction's, Grad-CAM p95 under ScoreCAM load <= 2 x idle, cold start <= 20 s.
The exit status is 1 when a bar is missed, so CI can use it.
"""

from __future__ import annotations

import argparse
import contextlib
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

BARS = {
    "throughput_ratio": 0.70,
    "rss_mb": 1536.0,
    "cold_start_s": 20.0,
    "server_cpu_ratio": 1.5,
    "scorecam_p95_ratio": 2.0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (``state`` is field 0)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time that process ``pid`` has used so far."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minor_faults(pid: int) -> int:
    """Minor page faults of process ``pid`` so far (memory handed back to the system and touched again)."""
    return int(_stat(pid)[7])


def vm_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of ``pid`` in MB, read from /proc (psutil is not a dependency)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024.0  # kB -> MB
    return out


def reference_rate(
    weights: str | None, images: list[Path], n: int, warmup: int = 5
) -> tuple[float, dict[int, float], float]:
    """The best sequential in-process ``predict(explain=True)`` rate (calls per second), the rate per
    thread count, and the CPU seconds one call costs with one thread (the server runs one per request).

    Timed with one torch thread and with one per core (whichever is faster is the reference, so the
    bar is as strict as it can be), each as 1 / median call time: on a shared machine other
    processes' bursts inflate single calls, and the median ignores them.
    """
    import torch

    from tumor_xai import Predictor

    predictor = Predictor.from_pretrained(weights)
    before = torch.get_num_threads()
    rates, cpu_per_call = {}, float("nan")
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        torch.set_num_threads(threads)
        for i in range(warmup):  # oneDNN builds its kernels during the first calls
            predictor.predict(images[i % len(images)], explain=True)
        times = []
        cpu0 = time.process_time()
        for i in range(n):
            t0 = time.perf_counter()
            predictor.predict(images[i % len(images)], explain=True)
            times.append(time.perf_counter() - t0)
        if threads == 1:
            cpu_per_call = (time.process_time() - cpu0) / n
        rates[threads] = 1.0 / statistics.median(times)
    torch.set_num_threads(before)
    return max(rates.values()), rates, cpu_per_call


def reference_cpu(predictor, images: list[Path]) -> float:
    """CPU seconds of one in-process ``predict(explain=True)`` with one torch thread, over ``images`` once."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    for image in images:
        predictor.predict(image, explain=True)
    cpu = (time.process_time() - cpu0) / len(images)
    torch.set_num_threads(before)
    return cpu


def large_images(folder: Path, source: Path, size: int = 6000) -> list[Path]:
    """A ``size`` px JPEG and a ``size`` px RGBA PNG made from ``source``: what people upload by mistake."""
    from PIL import Image

    with Image.open(source) as im:
        big = im.convert("L").resize((size, size), Image.BILINEAR)
    jpeg, png = folder / f"large_{size}.jpg", folder / f"large_{size}_rgba.png"
    big.save(jpeg, quality=90)
    big.convert("RGBA").save(png, optimize=False, compress_level=1)
    return [jpeg, png]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_server(args: argparse.Namespace, port: int, cache_dir: str) -> subprocess.Popen:
    cmd = [sys.executable, str(args.app), "--port", str(port), "--host", "127.0.0.1"]
    if args.weights:
        cmd += ["--weights", args.weights]
    if args.concurrency:
        cmd += ["--concurrency", str(args.concurrency)]
    env = dict(os.environ, GRADIO_TEMP_DIR=cache_dir, PYTHONUNBUFFERED="1")
    log = open(Path(cache_dir) / "server.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def client_temp(work: str):
    """gradio_client downloads every output through a new folder in the temp dir and leaves the folder
    behind (one per answer): keep those inside ``work``, which the caller removes, while this is open."""
    tempfile.tempdir = str(Path(work) / "client")
    Path(tempfile.tempdir).mkdir()
    try:
        yield
    finally:
        tempfile.tempdir = None


def make_client(url: str):
    """A client with gradio_client's default settings, as a user's script would have."""
    from gradio_client import Client

    return Client(url, verbose=False, download_files=tempfile.gettempdir())


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


def gradcam_p95_under_scorecam(url: str, image: Path, n: int, scorecam_users: int) -> tuple[float, float, int]:
    """One client's Grad-CAM p95 on an idle server, then while ``scorecam_users`` clients keep /explain busy."""
    from gradio_client import handle_file

    client = make_client(url)

    def p95() -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.predict(handle_file(str(image)), api_name="/predict")
            times.append(time.perf_counter() - t0)
        return percentile(times, 95)

    p95()  # warm-up
    idle = p95()
    stop, done = threading.Event(), []

    def slow() -> None:
        c = make_client(url)
        while not stop.is_set():
            c.predict(handle_file(str(image)), "scorecam", api_name="/explain")
            done.append(1)

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(scorecam_users)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # both ScoreCAM requests are in: one running, one waiting in its queue
    busy = p95()
    stop.set()
    for t in threads:
        t.join(timeout=120)
    return idle, busy, len(done)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="weights folder (default: the repository's weights/)")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--requests", type=int, default=20, help="requests per user")
    p.add_argument("--rounds", type=int, default=4, help="load rounds, with the in-process reference timed between")
    p.add_argument("--concurrency", type=int, default=None, help="passed to app.py --concurrency (default: the app's)")
    p.add_argument("--reference-calls", type=int, default=40, help="in-process predict calls for the reference rate")
    p.add_argument("--start-limit", type=float, default=120.0, help="seconds to wait for the server's first answer")
    p.add_argument("--large", type=int, default=2, help="6000 px images in the mix (0, 1: a JPEG, 2: + an RGBA PNG)")
    p.add_argument("--scorecam", type=int, default=2, help="ScoreCAM clients during the Grad-CAM p95 check (0: skip)")
    p.add_argument("--slow-checks", type=int, default=20, help="Grad-CAM requests per p95 in that check")
    p.add_argument(
        "--app", type=Path, default=REPO / "app.py", help="the app to serve (e.g. an older app.py to compare)"
    )
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    examples = sorted(EXAMPLES.glob("*.jpg"))
    if not examples:
        raise SystemExit(f"no example slices in {EXAMPLES}")
    print(f"{len(os.sched_getaffinity(0))} CPUs, load average {load_average()} before the run", flush=True)
    with tempfile.TemporaryDirectory(prefix="tumor-xai-load-") as work, client_temp(work):
        images = examples + large_images(Path(work), examples[0])[: args.large]
        ref, by_threads, ref_cpu = reference_rate(args.weights, images, args.reference_calls)
        detail = ", ".join(f"{t} thread(s): {r:.2f}/s" for t, r in by_threads.items())
        print(
            f"reference: in-process predict(explain=True) on the same mix, best of [{detail}]: {ref:.2f} images/s; "
            f"{1000 * ref_cpu:.0f} ms CPU per call with one thread",
            flush=True,
        )
        figures = serve_and_load(args, images, examples[0], work)
    lat, res = figures.pop("latencies"), figures.pop("result")
    total = figures["requests"]
    cpus = len(os.sched_getaffinity(0))
    per_request_ms = figures["server_cpu_ms_per_request"] + figures["client_cpu_ms_per_request"]
    figures.update(
        reference_per_s=ref,
        reference_by_threads=by_threads,
        throughput_of_reference=figures["throughput_per_s"] / ref,
        capacity_per_s=cpus * 1000.0 / per_request_ms,  # both sides on these cores
        throughput_ratio=figures["throughput_per_s"] * per_request_ms / (cpus * 1000.0),
        server_cpu_ratio=figures["server_cpu_ms_per_request"] / figures["reference_cpu_ms"],
        cpus=cpus,
        load_average_after=load_average(),
    )
    print(
        f"{args.users} users x {args.requests} requests ({len(images) - len(examples)} of every {len(images)} images "
        f"6000 px): {len(lat)}/{total} answered, {figures['failed']} failed, {figures['dropped']} dropped connections\n"
        f"latency p50 {figures['p50_s']:.2f} s, p95 {figures['p95_s']:.2f} s, max {figures['max_s']:.2f} s\n"
        f"throughput {figures['throughput_per_s']:.2f} images/s = {figures['throughput_of_reference']:.0%} of the in-process "
        f"rate, {figures['throughput_ratio']:.0%} of the {figures['capacity_per_s']:.2f}/s the cores allow with the clients "
        f"on them\n"
        f"server RSS after the run {figures['rss_mb']:.0f} MB (peak {figures['peak_rss_mb']:.0f} MB)\n"
        f"CPU per request: server {figures['server_cpu_ms_per_request']:.0f} ms = {figures['server_cpu_ratio']:.2f} x "
        f"the in-process call ({figures['reference_cpu_ms']:.0f} ms CPU, mean of {len(figures['reference_cpu_ms_rounds'])} "
        f"timings around the {args.rounds} load rounds); per round {figures['server_cpu_ratio_rounds']}; gradio_client users "
        f"{figures['client_cpu_ms_per_request']:.0f} ms\n"
        f"load average after the run {figures['load_average_after']}"
    )
    if args.scorecam:
        print(
            f"Grad-CAM p95, one client: idle {figures['gradcam_p95_idle_s']:.3f} s, with {args.scorecam} ScoreCAM "
            f"clients {figures['gradcam_p95_scorecam_s']:.3f} s ({figures['scorecam_p95_ratio']:.2f} x; "
            f"{figures['scorecam_answers']} ScoreCAM answers meanwhile)"
        )
    for kind in ("failures", "dropped"):
        for msg in sorted(set(res[kind]))[:5]:
            print(f"  {kind}: {msg}")
    if res["failures"] or res["dropped"]:
        print("--- server log (last 40 lines) ---\n" + "\n".join(figures["log"].splitlines()[-40:]))
    figures.pop("log")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")

    missed = []
    if figures["failed"] or figures["dropped"]:
        missed.append("failed or dropped requests")
    if figures["throughput_ratio"] < BARS["throughput_ratio"]:
        missed.append(f"throughput below {BARS['throughput_ratio']:.0%} of what the cores allow")
    if figures["peak_rss_mb"] > BARS["rss_mb"]:
        missed.append(f"peak RSS above {BARS['rss_mb']:.0f} MB")
    if figures["server_cpu_ratio"] > BARS["server_cpu_ratio"]:
        missed.append(f"server CPU per request above {BARS['server_cpu_ratio']} x the in-process call")
    if args.scorecam and figures["scorecam_p95_ratio"] > BARS["scorecam_p95_ratio"]:
        missed.append(f"Grad-CAM p95 under ScoreCAM above {BARS['scorecam_p95_ratio']} x idle")
    if figures["cold_start_s"] > BARS["cold_start_s"]:
        missed.append(f"cold start above {BARS['cold_start_s']:.0f} s")
    print("bars: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


def serve_and_load(args: argparse.Namespace, images: list[Path], probe: Path, work: str) -> dict:
    """Start the server, time its cold start, run the load and the ScoreCAM check, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cache_dir = Path(work) / "cache"
    cache_dir.mkdir()
    t_start = time.perf_counter()
    proc = start_server(args, port, str(cache_dir))
    try:
        cold = wait_first_answer(url, proc, probe, t_start, args.start_limit)
        print(f"cold start (process start -> first answer): {cold:.1f} s", flush=True)
        # Other processes on a shared machine inflate CPU time per call as much as the server's own work:
        # the in-process reference is timed before each load round and after the last, and the ratio is
        # taken against the mean, so a busy spell cannot fall on one side only.
        from tumor_xai import Predictor

        predictor = Predictor.from_pretrained(args.weights)
        reference_cpu(predictor, images[:3])  # warm-up
        refs, rounds, round_cpus = [reference_cpu(predictor, images)], [], []
        server_cpu = client_cpu = 0.0
        for _ in range(args.rounds):
            server_cpu0, client_cpu0 = cpu_seconds(proc.pid), time.process_time()
            rounds.append(run_load(url, images, args.users, max(1, args.requests // args.rounds)))
            round_server = cpu_seconds(proc.pid) - server_cpu0
            round_cpus.append(round_server)
            server_cpu, client_cpu = server_cpu + round_server, client_cpu + time.process_time() - client_cpu0
            refs.append(reference_cpu(predictor, images))
            per_request = round_server / max(1, len(rounds[-1]["latencies"]))
            mem = vm_status(proc.pid)
            print(
                f"round {len(rounds)}: server {1000 * per_request:.0f} ms CPU per request, "
                f"RSS {mem.get('VmRSS', float('nan')):.0f} MB (peak {mem.get('VmHWM', float('nan')):.0f} MB)",
                flush=True,
            )
        res = {k: sum((r[k] for r in rounds), [] if k != "wall_s" else 0.0) for k in rounds[0]}
        mem = vm_status(proc.pid)
        slow = gradcam_p95_under_scorecam(url, probe, args.slow_checks, args.scorecam) if args.scorecam else None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log = (cache_dir / "server.log").read_text(errors="replace")
    lat = res["latencies"]
    figures = {
        "latencies": lat,
        "result": res,
        "log": log,
        "users": args.users,
        "requests_per_user": args.requests,
        "requests": args.users * max(1, args.requests // args.rounds) * args.rounds,
        "large_images": len(images) - len(sorted(EXAMPLES.glob("*.jpg"))),
        "answered": len(lat),
        "failed": len(res["failures"]),
        "dropped": len(res["dropped"]),
        "p50_s": percentile(lat, 50),
        "p95_s": percentile(lat, 95),
        "max_s": max(lat) if lat else float("nan"),
        "wall_s": res["wall_s"],
        "throughput_per_s": len(lat) / res["wall_s"],
        "rss_mb": mem.get("VmRSS", float("nan")),
        "peak_rss_mb": mem.get("VmHWM", float("nan")),
        "cold_start_s": cold,
        "server_cpu_ms_per_request": 1000 * server_cpu / max(1, len(lat)),
        "reference_cpu_ms": 1000 * statistics.mean(refs),
        "reference_cpu_ms_rounds": [round(1000 * r, 1) for r in refs],
        "server_cpu_ratio_rounds": [
            round(
                (cpu_round / max(1, len(r["latencies"]))) / ((refs[i] + refs[i + 1]) / 2),
                2,
            )
            for i, (r, cpu_round) in enumerate(zip(rounds, round_cpus, strict=True))
        ],
        "client_cpu_ms_per_request": 1000 * client_cpu / max(1, len(lat)),
    }
    if slow:
        figures.update(
            gradcam_p95_idle_s=slow[0],
            gradcam_p95_scorecam_s=slow[1],
            scorecam_p95_ratio=slow[1] / slow[0],
            scorecam_answers=slow[2],
        )
    return figures


if __name__ == "__main__":
    sys.exit(main())
