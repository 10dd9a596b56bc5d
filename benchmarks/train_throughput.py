"""Training throughput (images/s) of the real training step: on-device augmentation, bf16 autocast,
channels-last, SGD; on whatever device is available.

    python benchmarks/train_throughput.py [--device auto] [--image-size 224] [--batch-size 128] [--steps 20]
    python benchmarks/train_throughput.py --data DIR --epochs 100   # time full epochs over the real Training set

Without --data it uses random uint8 images (throughput does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from tumor_xai.augment import AugmentConfig, augment
from tumor_xai.model import build_model
from tumor_xai.preprocess import PreprocessConfig, normalize
from tumor_xai.train import resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up) without --data")
    p.add_argument("--amp", default="bf16", choices=["bf16", "off"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--data", help="time whole epochs over this dataset's Training split instead")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    pre = PreprocessConfig(input_size=args.image_size)
    if args.data:
        from tumor_xai.data import decode_samples, discover

        ds = discover(args.data, splits=("Training",))
        dec = decode_samples(ds.splits["Training"], args.image_size)
        images = torch.from_numpy(dec.images).unsqueeze(1).to(device)
        labels = torch.from_numpy(dec.labels).to(device)
    else:
        n = args.batch_size * 4
        images = torch.randint(0, 256, (n, 1, args.image_size, args.image_size), dtype=torch.uint8, device=device)
        labels = torch.randint(0, 4, (n,), device=device)
    model = build_model(args.arch, 4).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator(device=device).manual_seed(0)
    aug = AugmentConfig()
    bf16 = args.amp == "bf16"

    def step(idx: torch.Tensor) -> None:
        x = normalize(augment(images[idx], aug, g), pre).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    for _ in range(3):  # warm-up (cudnn autotune, allocator)
        step(torch.arange(args.batch_size, device=device) % len(images))
    sync()
    t = time.perf_counter()
    seen = 0
    if args.data:
        for _ in range(args.epochs):
            perm = torch.randperm(len(images), device=device)
            for i in range(math.ceil(len(images) / args.batch_size)):
                idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
                step(idx)
                seen += len(idx)
    else:
        for i in range(args.steps):
            step(torch.arange(i * args.batch_size, (i + 1) * args.batch_size, device=device) % len(images))
            seen += args.batch_size
    sync()
    dt = time.perf_counter() - t
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}  arch {args.arch}  {args.image_size}px  batch {args.batch_size}  amp {args.amp}")
    print(f"train throughput: {seen / dt:.1f} images/s ({seen} images in {dt:.1f}s)")
    if args.data:
        per_epoch = dt / args.epochs
        print(f"epoch time: {per_epoch:.2f}s -> 100 epochs ~ {100 * per_epoch:.0f}s")


if __name__ == "__main__":
    main()
