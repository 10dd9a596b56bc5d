"""Training throughput (images/s) of the real training step (:func:`tumor_xai.train.train_one_epoch`:
on-device augmentation, bf16 autocast where the hardware has it, channels-last, SGD) on whatever device is available.

    python benchmarks/train_throughput.py [--device auto] [--image-size 224] [--batch-size 128] [--steps 20] [--amp auto]
    python benchmarks/train_throughput.py --data DIR --epochs 100   # time full epochs over the real Training set

Without --data it uses random uint8 images (throughput does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import time

import torch

from tumor_xai.model import build_model
from tumor_xai.preprocess import PreprocessConfig
from tumor_xai.train import (
    RunContext,
    Split,
    TrainConfig,
    build_optimizer,
    resolve_device,
    train_one_epoch,
    use_bf16,
    wrap_for_training,
)


def load_split(args: argparse.Namespace, device: torch.device) -> Split:
    if args.data:
        from tumor_xai.data import decode_samples, discover

        ds = discover(args.data, splits=("Training",))
        dec = decode_samples(ds.splits["Training"], args.image_size)
        return Split(torch.from_numpy(dec.images).unsqueeze(1).to(device), torch.from_numpy(dec.labels).to(device))
    n = args.batch_size * args.steps
    images = torch.randint(0, 256, (n, 1, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    return Split(images, torch.randint(0, 4, (n,), device=device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up) without --data")
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "off"],
        help="bf16 autocast; auto: as training decides (on where the CPU or GPU computes bf16 natively)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--data", help="time whole epochs over this dataset's Training split instead")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    epochs = args.epochs if args.data else 1
    cfg = TrainConfig(
        arch=args.arch, image_size=args.image_size, batch_size=args.batch_size, epochs=epochs, amp=args.amp
    )
    bf16 = use_bf16(cfg, device)
    pre = PreprocessConfig(input_size=cfg.image_size, intensity=cfg.intensity)
    ctx = RunContext(cfg, pre, device, bf16=bf16)
    data = load_split(args, device)
    model = build_model(args.arch, 4).to(device).to(memory_format=torch.channels_last)
    optimizer, scheduler, _ = build_optimizer(ctx, model, len(data))
    net = wrap_for_training(ctx, model)
    warm = Split(data.images[: 3 * args.batch_size], data.labels[: 3 * args.batch_size])
    train_one_epoch(ctx, net, optimizer, scheduler, warm, 0)  # warm-up (cudnn autotune, allocator)

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t = time.perf_counter()
    for epoch in range(epochs):
        train_one_epoch(ctx, net, optimizer, scheduler, data, epoch)
    sync()
    dt = time.perf_counter() - t
    seen = epochs * len(data)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(
        f"device: {name}  arch {args.arch}  {args.image_size}px  batch {args.batch_size}  amp {'bf16' if bf16 else 'off'}"
    )
    print(f"train throughput: {seen / dt:.1f} images/s ({seen} images in {dt:.1f}s)")
    if args.data:
        per_epoch = dt / epochs
        print(f"epoch time: {per_epoch:.2f}s -> 100 epochs ~ {100 * per_epoch:.0f}s")


if __name__ == "__main__":
    main()
