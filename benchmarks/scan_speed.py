"""Speed and memory of whole scans: ``python benchmarks/scan_speed.py [--nifti PATH] [--app]``.

Two scans, end to end (read, window, every slice through the model in batches, the top 5 slices' overlays,
the per-slice CSV and the curve PNG, as ``python -m tumor_xai.predict`` writes them):

* a 256 x 256 x 24 NIfTI volume (``--nifti``, e.g. ``../shared/data/tcia-volumes-dev/PGBM-001/Pre_Scan_T1.nii.gz``;
  without it, one stacked from the example slices), bar 3 s;
* a 512 x 512 x 200 DICOM series of 200 files (16-bit MR, written here from the example slices), bar 20 s.

In process with ``--threads`` torch threads (default 2), median of ``--repeats``: wall time and the process's
CPU time (on a machine that other work keeps busy, ``--threads 1`` CPU time is the honest figure: what one
idle core would take), and the process's peak RSS. With ``--app`` it then starts ``python app.py`` (the shipped weights, default settings: two
predictions at once, one torch thread each), sends each scan to ``/predict_scan`` with ``gradio_client``
(the series as 200 files) once and then ``--repeats`` times, and prints the first request's wall time
and the later ones' median (the first pays the server's first calls), and the server's peak memory
(VmHWM), bar 1.5 GB.
Also times the Scan tab's path for the series (the same plus the browsable slices written to the cache) and
one slider step (one slice's overlay drawn on request).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pydicom
import torch
from load import cpu_seconds, free_port, vm_status  # benchmarks/load.py: the same /proc readings
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tumor_xai import Predictor
from tumor_xai.decode import load_image
from tumor_xai.scan import write_scan
from tumor_xai.volume import read_volume

REPO = Path(__file__).resolve().parent.parent


def examples(n: int, size: int) -> np.ndarray:
    """``n`` of the repository's example slices at ``size`` px, uint8 (N, size, size)."""
    files = sorted((REPO / "assets" / "examples").glob("*.jpg"))
    out = np.empty((n, size, size), np.uint8)
    for k in range(n):
        gray = np.round(load_image(files[k % len(files)]).gray * 255).astype(np.uint8)
        out[k] = np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR))
    return out


def nifti_256(path: Path) -> Path:
    """24 example slices at 256 px as an LPS NIfTI volume with 5 mm slices (as the TCIA files are laid out)."""
    data = np.transpose(examples(24, 256), (2, 1, 0)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 5.0, 1.0])), str(path))
    return path


def series_512(folder: Path, n: int = 200) -> list[Path]:
    """``n`` 512 x 512 12-bit MR slices (the example slices, upsampled, with noise): one axial DICOM series."""
    base = examples(12, 512).astype(np.float32) * 8
    rng = np.random.default_rng(0)
    uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        pixels = np.clip(base[k % 12] + rng.normal(0, 20, (512, 512)), 0, 4095).astype(np.uint16)
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.SOPClassUID = MRImageStorage, MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "MR", uid, k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-128, -128, float(k)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 512, 512, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        paths.append(folder / f"IM{k:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def end_to_end(predictor: Predictor, source, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one scan read, classified and written."""
    start, cpu = time.perf_counter(), time.process_time()
    scan = predictor.predict_volume(read_volume(source), top_k=5)
    write_scan(scan, out)
    return time.perf_counter() - start, time.process_time() - cpu


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s")


def app_run(cases: dict[str, list[Path]], tmp: Path, repeats: int = 3) -> None:
    from gradio_client import Client, handle_file

    port = free_port()
    cache = tmp / "cache"
    cache.mkdir()
    log = tmp / "app.log"
    env = dict(os.environ, GRADIO_TEMP_DIR=str(cache), PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(proc, url)
        print(f"app: resting peak memory (VmHWM) {vm_status(proc.pid)['VmHWM']:.0f} MB")
        client = Client(url, verbose=False, download_files=str(tmp / "downloads"))
        for name, files in cases.items():
            runs = []  # the first request of a kind pays the server's first calls (allocations, primitives)
            for _ in range(1 + repeats):
                start, cpu = time.perf_counter(), cpu_seconds(proc.pid)
                summary, *_ = client.predict([handle_file(str(p)) for p in files], "axial", 5, api_name="/predict_scan")
                runs.append((time.perf_counter() - start, cpu_seconds(proc.pid) - cpu))
            (first, first_cpu), warm = runs[0], runs[1:]
            print(
                f"app /predict_scan {name}, {summary['slices']} slices (upload included): first request "
                f"{first:.2f} s (server CPU {first_cpu:.2f} s); then median of {repeats} "
                f"{statistics.median(w for w, _ in warm):.2f} s (server CPU {statistics.median(c for _, c in warm):.2f} s); "
                f"server peak memory (VmHWM) so far {vm_status(proc.pid)['VmHWM']:.0f} MB (bar 1536 MB)"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nifti", type=Path, default=None, help="a 256 x 256 x ~24 NIfTI scan (default: made here)")
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--app", action="store_true", help="also measure the app's /predict_scan and its peak memory")
    p.add_argument("--app-only", action="store_true", help="measure only the app (implies --app)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    predictor = Predictor.from_pretrained(args.weights)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs visible, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        nifti = args.nifti or nifti_256(tmp / "scan.nii.gz")
        series = series_512(tmp / "series")
        cases = {"256x256x24 NIfTI": [nifti], "512x512x200 DICOM series": series}
        bars = {"256x256x24 NIfTI": 3.0, "512x512x200 DICOM series": 20.0}
        for name, files in cases.items() if not args.app_only else []:
            source = files[0] if len(files) == 1 else files
            end_to_end(predictor, source, tmp / "warm")  # warm-up: first calls allocate
            runs = [end_to_end(predictor, source, tmp / f"out{r}") for r in range(args.repeats)]
            times, cpus = [w for w, _ in runs], [c for _, c in runs]
            print(
                f"{name}: end to end {statistics.median(times):.2f} s wall, {statistics.median(cpus):.2f} s CPU, "
                f"median of {args.repeats} (wall {', '.join(f'{t:.2f}' for t in times)}), bar {bars[name]:g} s; "
                f"load average {os.getloadavg()[0]:.2f}"
            )
        if args.app_only:
            app_run(cases, tmp, args.repeats)
            return 0
        from tumor_xai.scan_ui import browse_slice, scan_request

        os.environ["GRADIO_TEMP_DIR"] = str(tmp / "tab")
        start = time.perf_counter()
        answer = scan_request(predictor, [str(f) for f in series], "axial", 5, browsable=True)
        tab = time.perf_counter() - start
        steps = []
        for i in range(0, 200, 20):
            start = time.perf_counter()
            browse_slice(answer.browse, i)
            steps.append(time.perf_counter() - start)
        print(
            f"Scan tab, 512x512x200 series: {tab:.2f} s to the first answer; one slider step "
            f"{1000 * statistics.median(steps):.0f} ms (median of {len(steps)})"
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"in-process peak RSS (this benchmark, test helpers and gradio included): {peak:.0f} MB")
        if args.app:
            app_run(cases, tmp, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
