"""Train a four-class ResNet on the Kaggle Brain Tumor MRI layout: one command on CPU, one GPU or many.

    python -m tumor_xai.train --data DIR --out DIR [--epochs 100 --device auto ...]
    torchrun --nproc_per_node=N -m tumor_xai.train --data DIR --out DIR   # data-parallel (NCCL / gloo)

The Training split is decoded once (the same decoding and square-fitting that prediction uses) and
held on the device as uint8; batches are augmented on that device (``--aug basic|strong|none``,
single strengths with ``--aug-set NAME=VALUE``; see :mod:`tumor_xai.augment`).

With ``--masks DIR`` (the brain-tumor-mri-masks folder) the expert tumour masks ride along on the
device and through the same random affine as their images, for two optional signals
(:mod:`tumor_xai.attention`): ``--cam-loss-weight W`` adds W x a loss that pulls the true class's
activation map (the app's default heatmap) into the mask, and ``--lesion-erase P`` inpaints the lesion
of a masked image with probability P and trains it towards "not confident" (a uniform target) rather
than towards "no tumour": an erased glioma slice is not a clean no-tumour slice (oedema and mass
effect stay, and it comes from another collection than the no-tumour class), but its remaining
evidence should not support a confident tumour class either. ``--head-loss-weight W`` applies the
CAM loss with the head region as the mask to every image without a tumour mask (no-tumour images
included), so their evidence comes from the brain rather than the black frame. Output folder::

    OUT/model.safetensors, OUT/model.json   best epoch, calibrated: load with Predictor.from_pretrained(OUT)
    OUT/last/                               last epoch + optimiser state, for --resume
    OUT/config.json, OUT/log.json           the run's configuration and per-epoch metrics
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tumor_xai import __version__, attention, inference
from tumor_xai.augment import PRESETS, AugmentConfig, augment, augment_pair, head_region
from tumor_xai.checkpoint import NEGATIVE_CLASS, atomic_write_bytes, load_weights, save_weights
from tumor_xai.data import DataError, DecodedSplit, decode_samples, discover, split_train_val
from tumor_xai.model import ARCHITECTURES, build_model, check_input_size, features_and_logits
from tumor_xai.preprocess import PreprocessConfig, normalize

__all__ = ["TrainConfig", "TrainingData", "get_args_parser", "load_training_data", "main", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` and inside the weights' metadata."""

    data: str = ""
    out: str = ""
    arch: str = "resnet18"
    pretrained: str | None = None
    init: str | None = None  # weights folder to start from (fine-tuning); the run's schedule starts afresh
    epochs: int = 100
    batch_size: int = 128
    image_size: int = 224
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 3.0
    label_smoothing: float = 0.1
    seed: int = 0
    val_fraction: float = 0.1
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast: "auto" (on where the device supports it), "bf16", "off"
    intensity: str = "percentile"
    skip_unreadable: bool = False
    screening_sensitivity: float = 0.995
    half: bool = False  # store the final weights as float16
    resume: bool = False
    augment: dict = field(default_factory=lambda: AugmentConfig().to_dict())  # the strengths in effect
    aug: str = "basic"  # the recipe ``augment`` started from (before --aug-set overrides)
    masks: str | None = None  # brain-tumor-mri-masks folder
    cam_loss_weight: float = 0.0
    cam_loss: str = "mass"  # see tumor_xai.attention.CAM_LOSSES
    cam_warmup_epochs: float = 10.0  # guidance losses off for the first half, then ramped up linearly
    head_loss_weight: float = 0.0
    lesion_erase: float = 0.0  # probability per masked image
    erase_target: str = "uniform"  # "uniform" (not confident) or "notumor"


def get_args_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m tumor_xai.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset root holding Training/<class>/*")
    p.add_argument("--out", required=True, help="output folder for the weights, logs and config")
    p.add_argument("--arch", default=d.arch, choices=sorted(ARCHITECTURES))
    p.add_argument(
        "--pretrained", default=None, choices=["imagenet"], help="start from ImageNet weights (needs internet)"
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="WEIGHTS",
        help="start from this weights folder (e.g. weights/) with a fresh schedule; it must have been trained "
        "with the same --seed, --val-fraction and data, so its validation images stay out of training",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument(
        "--lr", type=float, default=d.lr, help="peak SGD learning rate for a global batch of 128 (scaled linearly)"
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default=d.amp, choices=["auto", "bf16", "off"])
    p.add_argument(
        "--intensity", default=d.intensity, choices=["percentile", "none"], help="per-image intensity normalisation"
    )
    p.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave unreadable images out (listed in the log) instead of stopping",
    )
    p.add_argument("--screening-sensitivity", type=float, default=d.screening_sensitivity)
    p.add_argument("--half", action="store_true", help="store the final weights as float16 (half the size)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    g = p.add_argument_group("augmentation and attention guidance")
    g.add_argument("--aug", default=d.aug, choices=sorted(PRESETS), help="augmentation recipe (default: basic)")
    g.add_argument(
        "--aug-set",
        action="append",
        default=[],
        type=_override,
        metavar="NAME=VALUE",
        help="override one strength of the recipe, e.g. --aug-set invert=0.3 (repeatable; names: "
        + ", ".join(f.name for f in fields(AugmentConfig))
        + ")",
    )
    g.add_argument("--masks", default=None, help="tumour masks folder (masks.csv + <split>/<class>/<stem>.png)")
    g.add_argument(
        "--cam-loss-weight", type=float, default=d.cam_loss_weight, help="weight of the CAM-in-mask loss (0: off)"
    )
    g.add_argument(
        "--cam-loss",
        default=d.cam_loss,
        choices=attention.CAM_LOSSES,
        help="mass: -log heat in mask; kl: KL(mask || CAM)",
    )
    g.add_argument(
        "--cam-warmup-epochs",
        type=float,
        default=d.cam_warmup_epochs,
        help="the CAM and head losses are off for the first half of this many epochs and ramp up over the second half",
    )
    g.add_argument(
        "--head-loss-weight",
        type=float,
        default=d.head_loss_weight,
        help="weight of the CAM-in-head loss for images without a tumour mask (0: off)",
    )
    g.add_argument(
        "--lesion-erase", type=float, default=d.lesion_erase, help="probability of inpainting a masked lesion (0: off)"
    )
    g.add_argument(
        "--erase-target", default=d.erase_target, choices=["uniform", "notumor"], help="target of an erased image"
    )
    return p


def _override(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip().replace("-", "_"), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration; raises ``ValueError`` for an unknown ``--aug-set`` name or a negative strength."""
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["augment"] = AugmentConfig.preset(args.aug).with_overrides(dict(args.aug_set)).to_dict()
    return TrainConfig(**values)


# --------------------------------------------------------------------------- set-up


def check_config(cfg: TrainConfig) -> None:
    """Fail before any work on arguments that cannot run; raises ``ValueError`` with what to change."""
    if cfg.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if not 0.0 <= cfg.val_fraction < 0.5:
        raise ValueError(f"--val-fraction must be in [0, 0.5), got {cfg.val_fraction}")
    check_input_size(cfg.image_size)
    for flag, value in (("--cam-loss-weight", cfg.cam_loss_weight), ("--head-loss-weight", cfg.head_loss_weight)):
        if not value >= 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if not cfg.cam_warmup_epochs >= 0:
        raise ValueError(f"--cam-warmup-epochs must be >= 0, got {cfg.cam_warmup_epochs}")
    if not 0.0 <= cfg.lesion_erase <= 1.0:
        raise ValueError(f"--lesion-erase is a probability in [0, 1], got {cfg.lesion_erase}")
    if cfg.cam_loss not in attention.CAM_LOSSES:
        raise ValueError(f"--cam-loss must be one of {attention.CAM_LOSSES}, got {cfg.cam_loss!r}")
    if cfg.erase_target not in ("uniform", "notumor"):
        raise ValueError(f"--erase-target must be uniform or notumor, got {cfg.erase_target!r}")
    needs_masks = cfg.cam_loss_weight > 0 or cfg.lesion_erase > 0
    if needs_masks and not cfg.masks:
        raise ValueError("--cam-loss-weight and --lesion-erase need --masks DIR (the brain-tumor-mri-masks folder)")
    if cfg.masks and not needs_masks:
        raise ValueError("--masks is only used by --cam-loss-weight or --lesion-erase; add one of them or drop --masks")
    if cfg.masks and not (Path(cfg.masks) / "masks.csv").is_file():
        raise ValueError(f"--masks {cfg.masks}: no masks.csv there; point it at the brain-tumor-mri-masks folder")
    try:
        AugmentConfig(**cfg.augment)  # an unknown key in a hand-made config fails here, not mid-run
    except TypeError as exc:
        raise ValueError(f"bad augmentation settings {cfg.augment}: {exc}") from None
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if cfg.amp == "bf16" and resolve_device(cfg.device).type == "cpu" and not _cpu_has_bf16():
        raise ValueError("--amp bf16 needs a CPU with bf16 support; use --amp off")
    if cfg.init and cfg.pretrained:
        raise ValueError("--init and --pretrained both choose the starting weights; pass one of them")
    if cfg.init:
        check_init(cfg)
    out = Path(cfg.out)
    if cfg.resume:
        if not (out / "last" / "train_state.pt").is_file():
            raise ValueError(f"--resume: {out}/last/train_state.pt not found; start without --resume")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} is not empty; choose a new --out or pass --resume")


def check_init(cfg: TrainConfig) -> None:
    """``--init`` weights must fit the model and share this run's validation carve-out (else it would leak)."""
    from tumor_xai.checkpoint import WeightsError

    try:
        meta = load_weights(cfg.init).metadata
    except WeightsError as exc:
        raise ValueError(f"--init: {exc}") from None
    if meta.get("arch") != cfg.arch:
        raise ValueError(f"--init {cfg.init} holds a {meta.get('arch')}, but --arch is {cfg.arch}")
    trained = meta.get("training") or {}
    for key, flag in (("seed", "--seed"), ("val_fraction", "--val-fraction")):
        if key in trained and trained[key] != getattr(cfg, key):
            raise ValueError(
                f"--init {cfg.init} was trained with {flag} {trained[key]}, this run has {getattr(cfg, key)}: "
                f"its validation images would be in this run's training set; use {flag} {trained[key]}"
            )


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.amp == "off":
        return False
    if cfg.amp == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return _cpu_has_bf16()


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group if launched under torchrun; returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return dist.get_rank(), world


def code_version() -> dict:
    commit = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "tumor_xai": __version__,
        "git_commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- loops


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class FeaturesAndLogits(nn.Module):
    """The ResNet's forward returning ``(layer4 map, logits)``, so DDP sees the pass the CAM loss uses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return features_and_logits(self.model, x)


@dataclass
class Guidance:
    """Device-resident tumour masks of the training images and the class index of "no tumour"."""

    masks: torch.Tensor | None  # uint8 (N, 1, S, S) or None
    has_mask: torch.Tensor | None  # bool (N,)
    notumor: int | None


def guidance_ramp(progress: float, warmup_epochs: float) -> float:
    """Factor on the CAM losses at ``progress`` epochs: 0 for the first half of the warm-up, then linear to 1.

    A CAM loss from the first step can win before the network has features to classify with (the
    map is shaped, the class never learned); the classifier gets a head start instead.
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, max(0.0, 2.0 * progress / warmup_epochs - 1.0))


def _guidance_losses(
    fmap, logits, y, fc_weight, lesion, has, erased, head, cfg, notumor, ramp
) -> tuple[torch.Tensor, dict]:
    """Cross-entropy (uniform or no-tumour target for erased images) plus the weighted CAM losses."""
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing, reduction="none")
    if erased is not None:
        if cfg.erase_target == "uniform":
            other = -F.log_softmax(logits, dim=1).mean(1)
        else:
            other = F.cross_entropy(
                logits, torch.full_like(y, notumor), label_smoothing=cfg.label_smoothing, reduction="none"
            )
        ce = torch.where(erased, other, ce)
    loss = ce.mean()
    parts = {}
    if cfg.cam_loss_weight > 0:
        sel = has & ~erased if erased is not None else has
        per = attention.cam_mask_loss(fmap, fc_weight, y, lesion, cfg.cam_loss)
        cam = (per * sel).sum() / sel.sum().clamp_min(1)
        loss = loss + ramp * cfg.cam_loss_weight * cam
        parts["cam"] = cam.detach()
    if cfg.head_loss_weight > 0:
        sel = ~has if has is not None else torch.ones_like(y, dtype=torch.bool)
        if erased is not None:
            sel = sel & ~erased
        per = attention.cam_mask_loss(fmap, fc_weight, y, head, cfg.cam_loss)
        hl = (per * sel).sum() / sel.sum().clamp_min(1)
        loss = loss + ramp * cfg.head_loss_weight * hl
        parts["head"] = hl.detach()
    return loss, parts


def train_one_epoch(
    model,
    optimizer,
    scheduler,
    images,
    labels,
    cfg,
    pre,
    epoch,
    rank,
    world,
    bf16,
    show,
    guidance: Guidance | None = None,
) -> dict:
    """One pass over this rank's shard; ``model`` returns ``(layer4 map, logits)`` (:class:`FeaturesAndLogits`)."""
    model.train()
    n = len(images)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = n // world
    mine = perm[rank * per_rank : (rank + 1) * per_rank].to(images.device)
    aug_g = torch.Generator(device=images.device).manual_seed(cfg.seed * 1_000_003 + epoch * 101 + rank)
    aug_cfg = AugmentConfig(**cfg.augment)
    guidance = guidance or Guidance(None, None, None)
    inner = model.module if hasattr(model, "module") else model
    fc_weight = inner.model.fc.weight
    use_masks = guidance.masks is not None
    use_head = cfg.head_loss_weight > 0
    steps = math.ceil(per_rank / cfg.batch_size)
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device)
    part_sums: dict[str, torch.Tensor] = {}
    seen = 0
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not show, dynamic_ncols=True)
    for i in bar:
        idx = mine[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        y = labels[idx]
        lesion = has = erased = head = None
        if use_masks or use_head:
            channels = []
            if use_masks:
                has = guidance.has_mask[idx]
                channels.append(guidance.masks[idx])
                if cfg.lesion_erase > 0:
                    erased = has & (torch.rand(len(idx), generator=aug_g, device=images.device) < cfg.lesion_erase)
            if use_head:
                channels.append(head_region(images[idx].float().div_(255.0)))
            masks = torch.cat([c.float().div(255.0) if c.dtype == torch.uint8 else c for c in channels], 1)
            x01, warped = augment_pair(images[idx], masks, aug_cfg, aug_g, erase=erased)
            lesion = warped[:, :1] if use_masks else None
            head = warped[:, -1:] if use_head else None
        else:
            x01 = augment(images[idx], aug_cfg, aug_g)
        x = normalize(x01, pre).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16):
            fmap, logits = model(x)
        logits = logits.float()
        ramp = guidance_ramp(epoch + i / steps, cfg.cam_warmup_epochs)
        loss, parts = _guidance_losses(
            fmap, logits, y, fc_weight, lesion, has, erased, head, cfg, guidance.notumor, ramp
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        for k, v in parts.items():
            part_sums[k] = part_sums.get(k, torch.zeros((), device=images.device)) + v * len(y)
        seen += len(y)
        if show and (i % 10 == 0 or i == steps - 1):
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
    keys = sorted(part_sums)
    stats = torch.stack(
        [total_loss, correct, torch.tensor(float(seen), device=images.device), *(part_sums[k] for k in keys)]
    )
    if world > 1:
        dist.all_reduce(stats)
    out = {"train_loss": (stats[0] / stats[2]).item(), "train_acc": (stats[1] / stats[2]).item()}
    out.update({f"train_{k}_loss": (stats[3 + j] / stats[2]).item() for j, k in enumerate(keys)})
    return out


def evaluate(model, images, labels, pre, cfg, rank, world, bf16) -> dict:
    """Validation loss and accuracy; each rank scores its shard and the counts are summed."""
    if len(images) == 0:
        return {}
    shard = slice(rank, None, world)
    logits = inference.forward(model, images[shard], pre, cfg.batch_size, bf16=bf16, channels_last=True).logits
    y = labels[shard].cpu()
    stats = torch.tensor(
        [F.cross_entropy(logits, y, reduction="sum").item(), (logits.argmax(1) == y).sum().item(), float(len(y))],
        device=images.device,
    )
    if world > 1:
        dist.all_reduce(stats)
    return {"val_loss": (stats[0] / stats[2]).item(), "val_acc": (stats[1] / stats[2]).item()}


@torch.no_grad()
def monitor_localization(model, images, labels, masks, pre, batch_size, bf16) -> dict:
    """Approximate pointing game and heat-in-mask of the true class's CAM on masked validation images."""
    module = model.module if hasattr(model, "module") else model
    hits, mass = [], []
    for sl, fmap, _ in inference.forward_batches(model, images, pre, batch_size, bf16=bf16, channels_last=True):
        cam = inference.class_activation_map(fmap, module.fc.weight, labels[sl])
        m = masks[sl].float().div_(255.0)
        hits.append(attention.pointing_hits(cam, m).float().cpu())
        mass.append(attention.heat_in_mask(cam, m).cpu())
    return {"val_pointing": torch.cat(hits).mean().item(), "val_heat_in_mask": torch.cat(mass).mean().item()}


# --------------------------------------------------------------------------- checkpoints


def save_state(path: Path, optimizer, scheduler, epoch: int, best: dict, log: list) -> None:
    """Optimiser and schedule state for --resume (tensors and plain values only: loads with weights_only)."""
    import io

    buf = io.BytesIO()
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best": best,
            "log": log,
        },
        buf,
    )
    atomic_write_bytes(path, buf.getvalue())


def weights_metadata(
    cfg: TrainConfig, class_names, pre: PreprocessConfig, fingerprint: str, extra: dict | None = None
) -> dict:
    meta = {
        "arch": cfg.arch,
        "class_names": list(class_names),
        "in_chans": 1,
        "preprocessing": pre.to_dict(),
        "training": asdict(cfg),
        "data_fingerprint": fingerprint,
        "code_version": code_version(),
    }
    meta.update(extra or {})
    return meta


def finalize(out: Path, cfg, data, train_idx, val_idx, class_names, device) -> dict:
    """Calibrate the best checkpoint on the validation split, fit the OOD statistics, write OUT/.

    Runs in float32, as the app does: a threshold fitted on bf16 logits could sit on the wrong side
    of slices near it.
    """
    from tumor_xai import calibration, ood

    best = load_weights(out / "best", device=device)
    pre = best.preprocess
    images = data["images"]
    labels = data["labels"]
    meta = dict(best.metadata)
    extras: dict[str, torch.Tensor] = {}
    train_feats = inference.forward(best.model, images[train_idx], pre, cfg.batch_size, channels_last=True).features
    if len(val_idx):
        val = inference.forward(best.model, images[val_idx], pre, cfg.batch_size, channels_last=True)
        val_logits, val_feats = val.logits, val.features
        y_val = labels[val_idx].cpu()
        temperature = calibration.fit_temperature(val_logits, y_val)
        probs = torch.softmax(val_logits / temperature, dim=1).numpy()
        meta["calibration"] = {
            "temperature": float(temperature),
            "fitted_on": "validation carve-out",
            "n": len(val_idx),
        }
        if NEGATIVE_CLASS in class_names:
            k = class_names.index(NEGATIVE_CLASS)
            threshold = calibration.choose_threshold(1.0 - probs[:, k], y_val.numpy() != k, cfg.screening_sensitivity)
            meta["screening"] = {
                "threshold": float(threshold),
                "negative_class": NEGATIVE_CLASS,
                "target_sensitivity": cfg.screening_sensitivity,
                "chosen_on": "validation carve-out",
                "definition": "tumour probability = 1 - P(notumor); positive when >= threshold",
            }
        meta.setdefault("metrics", {})["validation"] = {
            "accuracy": float((val_logits.argmax(1) == y_val).float().mean()),
            "n": len(val_idx),
        }
    else:
        val_feats = train_feats
        logger.warning("no validation split: temperature stays 1 and no screening threshold is stored")
    ood_extras, ood_meta = ood.fit(train_feats, labels[train_idx].cpu(), val_feats)
    extras.update(ood_extras)
    meta["ood"] = ood_meta
    save_weights(best.model, out, meta, extras=extras, half=cfg.half)
    return meta


# --------------------------------------------------------------------------- main


@dataclass
class TrainingData:
    """The decoded Training split (and its tumour masks) at one image size; reusable across runs."""

    root: Path
    class_names: list[str]
    decoded: DecodedSplit
    fingerprint: str
    masks: attention.TrainingMasks | None
    image_size: int
    seconds: float


def load_training_data(cfg: TrainConfig, fingerprint: bool = True) -> TrainingData:
    """Decode ``cfg.data``'s Training split at ``cfg.image_size`` and, with ``cfg.masks``, match its masks."""
    t0 = time.time()
    dataset = discover(cfg.data, splits=("Training",))
    decoded = decode_samples(dataset.splits["Training"], cfg.image_size, skip_unreadable=cfg.skip_unreadable)
    masks = attention.load_training_masks(cfg.masks, dataset.root, decoded.paths, cfg.image_size) if cfg.masks else None
    return TrainingData(
        root=dataset.root,
        class_names=dataset.class_names,
        decoded=decoded,
        fingerprint=dataset.fingerprint("Training") if fingerprint else "",
        masks=masks,
        image_size=cfg.image_size,
        seconds=time.time() - t0,
    )


def train(cfg: TrainConfig, data: TrainingData | None = None) -> Path:
    """Run training as configured; returns the output folder (rank 0) or ``cfg.out``.

    ``data`` (from :func:`load_training_data`) skips the decoding, for several runs on one dataset;
    it must match ``cfg`` (image size, and masks when the run uses them).
    """
    device = resolve_device(cfg.device)
    rank, world = setup_distributed(device)
    show = rank == 0
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed)
    bf16 = use_bf16(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if data is None:
        data = load_training_data(cfg, fingerprint=rank == 0)
    elif data.image_size != cfg.image_size or (cfg.masks and data.masks is None):
        raise ValueError(
            f"the given TrainingData ({data.image_size} px, masks {data.masks is not None}) does not match the config"
        )
    decoded, fingerprint = data.decoded, data.fingerprint
    class_names = data.class_names
    train_idx, val_idx = split_train_val(decoded.labels, decoded.thumbs, cfg.val_fraction, cfg.seed)
    images = torch.from_numpy(decoded.images).unsqueeze(1).to(device)
    labels = torch.from_numpy(decoded.labels).to(device)
    notumor = class_names.index(NEGATIVE_CLASS) if NEGATIVE_CLASS in class_names else None
    if cfg.erase_target == "notumor" and cfg.lesion_erase > 0 and notumor is None:
        raise ValueError(f"--erase-target notumor needs a {NEGATIVE_CLASS!r} class; the classes are {class_names}")
    guidance = Guidance(None, None, notumor)
    if cfg.masks:
        has = data.masks.has_mask.copy()
        if notumor is not None:
            has &= decoded.labels != notumor  # a lesion mask on a no-tumour image contradicts its label
        guidance = Guidance(
            torch.from_numpy(data.masks.masks).unsqueeze(1).to(device), torch.from_numpy(has).to(device), notumor
        )
    if show:
        print(
            f"data: {len(train_idx)} train / {len(val_idx)} validation images of {class_names} "
            f"({len(decoded.skipped)} skipped), decoded in {data.seconds:.1f}s; device {device}, "
            f"{world} process(es), bf16 {bf16}",
            flush=True,
        )
        if guidance.has_mask is not None:
            print(
                f"masks: {int(has[train_idx].sum())} train / {int(has[val_idx].sum())} validation images have a tumour mask",
                flush=True,
            )
    pre = PreprocessConfig(input_size=cfg.image_size, intensity=cfg.intensity)

    model = build_model(cfg.arch, len(class_names), in_chans=1, pretrained=cfg.pretrained)
    if cfg.init and not cfg.resume:
        start = load_weights(cfg.init)
        if list(start.class_names) != list(class_names):
            raise ValueError(f"--init {cfg.init} has classes {start.class_names}, the data has {class_names}")
        if fingerprint and start.metadata.get("data_fingerprint") not in (None, fingerprint):
            raise ValueError(
                f"--init {cfg.init} was trained on other data (fingerprint differs): its split would not hold"
            )
        model.load_state_dict({k: v.float() for k, v in start.model.state_dict().items()})
        if show:
            print(f"starting from {cfg.init}", flush=True)
    model = model.to(device).to(memory_format=torch.channels_last)
    global_batch = cfg.batch_size * world
    peak_lr = cfg.lr * global_batch / 128
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    steps_per_epoch = math.ceil((len(train_idx) // world) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(total_steps, int(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, max(1, warmup)))

    start_epoch, best, log = 0, {"val_acc": -1.0, "val_loss": float("inf"), "epoch": -1}, []
    if cfg.resume:
        last = load_weights(out / "last", device=device)
        model.load_state_dict(last.model.state_dict())
        state = torch.load(out / "last" / "train_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, log = state["epoch"] + 1, state["best"], state["log"]
        if show:
            print(f"resuming after epoch {start_epoch} (best val acc {best['val_acc']:.4f})", flush=True)

    ddp_model = FeaturesAndLogits(model)
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            ddp_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    train_images, train_labels = images[train_idx], labels[train_idx]
    val_images, val_labels = images[val_idx], labels[val_idx]
    train_guidance, val_masked = Guidance(None, None, notumor), None
    if guidance.masks is not None:
        t_idx, v_idx = torch.from_numpy(train_idx).to(device), torch.from_numpy(val_idx).to(device)
        train_guidance = Guidance(guidance.masks[t_idx], guidance.has_mask[t_idx], notumor)
        v_sel = v_idx[guidance.has_mask[v_idx]]
        if len(v_sel):
            val_masked = (images[v_sel], labels[v_sel], guidance.masks[v_sel])
        del guidance  # the full-size copy; the train subset holds what training needs
    if show:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", (json.dumps(asdict(cfg), indent=2) + "\n").encode())
    meta = weights_metadata(cfg, class_names, pre, fingerprint)
    meta["training"]["device"] = device.type  # what ran, not what was asked ("auto")

    train_time = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        stats = train_one_epoch(
            ddp_model,
            optimizer,
            scheduler,
            train_images,
            train_labels,
            cfg,
            pre,
            epoch,
            rank,
            world,
            bf16,
            show,
            guidance=train_guidance,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t
        train_time += dt
        stats.update(evaluate(model, val_images, val_labels, pre, cfg, rank, world, bf16))
        if show and val_masked is not None:
            stats.update(monitor_localization(model, *val_masked, pre, cfg.batch_size, bf16))
        stats.update(
            epoch=epoch + 1,
            seconds=round(dt, 2),
            images_per_s=round((len(train_idx) // world) * world / dt, 1),
            lr=optimizer.param_groups[0]["lr"],
        )
        log.append(stats)
        if show:
            improved = stats.get("val_acc", 0.0) > best["val_acc"] or (
                stats.get("val_acc", 0.0) == best["val_acc"] and stats.get("val_loss", 0.0) <= best["val_loss"]
            )
            if improved or not len(val_idx):
                best = {
                    "val_acc": stats.get("val_acc", 0.0),
                    "val_loss": stats.get("val_loss", 0.0),
                    "epoch": epoch + 1,
                }
                save_weights(model, out / "best", {**meta, "metrics": {"best_epoch": best}})
            save_weights(model, out / "last", {**meta, "metrics": {"epoch": epoch + 1}})
            save_state(out / "last" / "train_state.pt", optimizer, scheduler, epoch, best, log)
            atomic_write_bytes(out / "log.json", (json.dumps(log, indent=1) + "\n").encode())
            msg = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
            print(msg, flush=True)

    if show:
        final = finalize(out, cfg, {"images": images, "labels": labels}, train_idx, val_idx, class_names, device)
        summary = {
            "train_seconds": round(train_time, 1),
            "best": best,
            "calibration": final.get("calibration"),
            "screening": final.get("screening"),
            "ood": {k: v for k, v in final.get("ood", {}).items() if not isinstance(v, list)},
        }
        print(json.dumps(summary, indent=1), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_config(cfg)
        discover(cfg.data, splits=("Training",))  # a bad layout fails here, before anything is written
    except (ValueError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
