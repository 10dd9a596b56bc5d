"""Time and peak memory of decoding (and predicting on) one very large image.

    python benchmarks/decode_large.py [--side 6300] [--format PNG|JPEG] [--predict] [--decoder FILE]

The image is a mostly black RGBA "slice" with a few shapes, so a 6300 px PNG is about 150 KB: the
kind of upload that costs far more to decode than to send. Each measurement runs in a fresh
subprocess and reports wall time and the growth of peak RSS over the process after imports.
``--decoder`` loads another copy of ``tumor_xai/decode.py`` (e.g. ``git show OLD:tumor_xai/decode.py``)
in place of the package's, to compare before and after.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_image(side: int, fmt: str) -> bytes:
    img = Image.new("RGBA" if fmt == "PNG" else "RGB", (side, side), (0, 0, 0, 255) if fmt == "PNG" else (0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.ellipse([side // 8, side // 10, side * 7 // 8, side * 9 // 10], fill=(90, 90, 90, 255)[: len(img.mode)])
    draw.ellipse([side // 3, side // 3, side // 2, side // 2], fill=(220, 220, 220, 255)[: len(img.mode)])
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"optimize": True} if fmt == "PNG" else {"quality": 90}))
    return buf.getvalue()


_CHILD = r"""
import importlib.util, json, resource, sys, time
path, decoder, predict = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
import numpy as np, torch
torch.set_num_threads(2)
from tumor_xai import predictor as P
if decoder:
    spec = importlib.util.spec_from_file_location("decode_under_test", decoder)
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
    load_image = mod.load_image
else:
    from tumor_xai.decode import load_image
pred = P.Predictor.from_pretrained() if predict else None
data = open(path, "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
decoded = load_image(data)
decoded = P.DecodedImage(decoded.gray, decoded.format, decoded.colorfulness, decoded.info)  # same class either way
out = {"decode_s": time.perf_counter() - t0, "decoded_size": list(decoded.size)}
if predict:
    t1 = time.perf_counter()
    r = pred.predict(decoded, explain=True)
    out["predict_s"] = time.perf_counter() - t1
    out["heatmap"] = list(r.heatmap.shape)
    out["overlay"] = list(r.overlay.size[::-1])
out["peak_extra_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=6300)
    p.add_argument("--format", choices=("PNG", "JPEG"), default="PNG")
    p.add_argument("--predict", action="store_true", help="also predict with a heatmap on the decoded image")
    p.add_argument("--decoder", type=Path, default=None, help="another decode.py to measure instead")
    p.add_argument("--out", type=Path, default=Path("/tmp/decode-large"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"large-{args.side}.{args.format.lower()}"
    path.write_bytes(make_image(args.side, args.format))
    print(f"{path}: {args.side} x {args.side} {args.format}, {path.stat().st_size / 1024:.0f} KB")
    cmd = [sys.executable, "-c", _CHILD, str(path), str(args.decoder or ""), "1" if args.predict else "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        print(res.stderr, file=sys.stderr)
        return 1
    out = json.loads(res.stdout.strip().splitlines()[-1])
    line = f"decode {out['decode_s']:.2f} s to {out['decoded_size'][1]} x {out['decoded_size'][0]}"
    if args.predict:
        line += f", predict+heatmap {out['predict_s']:.2f} s (heatmap {out['heatmap']}, overlay {out['overlay']})"
    print(f"{line}; peak RSS +{out['peak_extra_mb']:.0f} MB")
    assert np.isfinite(out["peak_extra_mb"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
