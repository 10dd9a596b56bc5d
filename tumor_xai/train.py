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
import io
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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from tumor_xai import __version__, attention, inference
from tumor_xai.augment import PRESETS, AugmentConfig, augment, augment_pair, head_region, paste_lesions
from tumor_xai.checkpoint import NEGATIVE_CLASS, atomic_write_bytes, load_weights, save_weights
from tumor_xai.data import DataError, DecodedSplit, carve_out_seed, decode_samples, discover, split_train_val
from tumor_xai.model import (
    ARCHITECTURES,
    POOLINGS,
    build_model,
    check_input_size,
    features_and_logits,
    pooling_of,
    set_pooling,
    unwrap,
)
from tumor_xai.preprocess import PreprocessConfig, normalize
from tumor_xai.schedule import Schedule, parse_duration

__all__ = ["TrainConfig", "TrainingData", "get_args_parser", "load_training_data", "main", "train"]

logger = logging.getLogger(__name__)

PASTE_DONORS = ("uniform", "balanced")
FREEZE_STAGES = ("none", "stem", "layer1", "layer2", "layer3", "layer4")  # --freeze-through, in network order
LAST_EVERY_S = 30.0  # last/ (the --resume state) is written at most this often, and after the final epoch


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
    split_seed: int | None = None  # seed of the validation carve-out (None: seed), so several seeds can share one
    val_fraction: float = 0.1
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast: "auto" (on where the device supports it), "bf16", "off"
    intensity: str = "percentile"
    skip_unreadable: bool = False
    screening_sensitivity: float = 0.995
    screening_specificity: float = 0.98  # the flag may spend this much of validation no-tumour specificity (0: off)
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
    ema: float = 0.0  # per-step decay of a moving average of the weights (0: off); validation and best/ use it
    lesion_paste: float = 0.0  # probability per no-tumour image of pasting a masked lesion into it
    paste_twins: bool = False  # a pasted slice joins the batch beside its unpasted original instead of replacing it
    paste_donors: str = "uniform"  # "uniform" over the masked slices, or "balanced" over their classes
    time_budget: float = 0.0  # seconds of training (and its validation); 0: --epochs decides the length
    low_res_size: int = 0  # progressive resizing: train at this size (growing to 1.25x) before the full size
    full_res_fraction: float = 0.25  # with low_res_size: the last share of the run at the full size
    freeze_through: str = "none"  # keep the stem and the stages up to this one fixed (see FREEZE_STAGES)
    pooling: str = "avg"  # the classifier's input (tumor_xai.model.POOLINGS): "avgmax" adds each channel's maximum


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
    if not 0.0 <= cfg.screening_specificity <= 1.0:
        raise ValueError(f"--screening-specificity is a share in [0, 1] (0: off), got {cfg.screening_specificity}")
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(
            f"--ema is a decay per step in [0, 1) (0: off; 0.999 averages about 1000 steps), got {cfg.ema}"
        )
    if not 0.0 <= cfg.lesion_erase <= 1.0:
        raise ValueError(f"--lesion-erase is a probability in [0, 1], got {cfg.lesion_erase}")
    if not 0.0 <= cfg.lesion_paste <= 1.0:
        raise ValueError(f"--lesion-paste is a probability in [0, 1], got {cfg.lesion_paste}")
    if not cfg.time_budget >= 0:
        raise ValueError(f"--time-budget must be a positive duration (e.g. 2h, 90m), got {cfg.time_budget}")
    if cfg.low_res_size:
        check_input_size(cfg.low_res_size)
        if cfg.low_res_size >= cfg.image_size:
            raise ValueError(f"--low-res-size {cfg.low_res_size} must be below --image-size {cfg.image_size}")
        if not 0.0 < cfg.full_res_fraction <= 1.0:
            raise ValueError(f"--full-res-fraction must be in (0, 1], got {cfg.full_res_fraction}")
    if cfg.cam_loss not in attention.CAM_LOSSES:
        raise ValueError(f"--cam-loss must be one of {attention.CAM_LOSSES}, got {cfg.cam_loss!r}")
    if cfg.paste_donors not in PASTE_DONORS:
        raise ValueError(f"--paste-donors must be one of {PASTE_DONORS}, got {cfg.paste_donors!r}")
    if (cfg.paste_twins or cfg.paste_donors != "uniform") and not cfg.lesion_paste > 0:
        raise ValueError("--paste-twins and --paste-donors shape --lesion-paste; add --lesion-paste P")
    if cfg.erase_target not in ("uniform", "notumor"):
        raise ValueError(f"--erase-target must be uniform or notumor, got {cfg.erase_target!r}")
    needs_masks = cfg.cam_loss_weight > 0 or cfg.lesion_erase > 0 or cfg.lesion_paste > 0
    if needs_masks and not cfg.masks:
        raise ValueError(
            "--cam-loss-weight, --lesion-erase and --lesion-paste need --masks DIR (the brain-tumor-mri-masks folder)"
        )
    if cfg.masks and not needs_masks:
        raise ValueError(
            "--masks is only used by --cam-loss-weight, --lesion-erase or --lesion-paste; add one or drop --masks"
        )
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
    if cfg.freeze_through not in FREEZE_STAGES:
        raise ValueError(f"--freeze-through must be one of {FREEZE_STAGES}, got {cfg.freeze_through!r}")
    if cfg.freeze_through != "none" and not (cfg.init or cfg.pretrained):
        raise ValueError("--freeze-through keeps layers as they start: give --init WEIGHTS (or --pretrained)")
    if cfg.init and cfg.pretrained:
        raise ValueError("--init and --pretrained both choose the starting weights; pass one of them")
    if cfg.init:
        check_init(cfg)
    out = Path(cfg.out)
    if cfg.resume:
        if not (out / "last" / "train_state.pt").is_file():
            raise ValueError(f"--resume: {out}/last/train_state.pt not found; start without --resume")
        try:
            saved = json.loads((out / "config.json").read_text())
        except (OSError, ValueError):
            saved = None
        kept = None if saved is None else saved.get("ema", 0.0)
        if kept is not None and (kept > 0) != (cfg.ema > 0):
            raise ValueError(f"--resume: {out} was trained with --ema {kept}; resume it with --ema {kept}")
        pooled = None if saved is None else saved.get("pooling", "avg")
        if pooled is not None and pooled != cfg.pooling:
            raise ValueError(f"--resume: {out} was trained with --pooling {pooled}; resume it with --pooling {pooled}")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} is not empty; choose a new --out or pass --resume")


def frozen_modules(model: nn.Module, through: str) -> list[nn.Module]:
    """The ResNet's stem and stages up to ``through`` (one of :data:`FREEZE_STAGES`, which
    :func:`check_config` enforces), in order; [] for "none"."""
    stages = [nn.ModuleList([model.conv1, model.bn1])] + [getattr(model, f"layer{i}") for i in range(1, 5)]
    return stages[: FREEZE_STAGES.index(through)]


def freeze(model: nn.Module, through: str) -> list[nn.Module]:
    """``--freeze-through``: stop the gradient of the stem and the stages up to ``through`` (their BatchNorm
    statistics stay as they are too: :func:`train_one_epoch` keeps them in eval mode). Nothing before the first
    trainable stage is differentiated, so a step costs a forward pass plus the trainable part's backward."""
    frozen = frozen_modules(model, through)
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def check_init(cfg: TrainConfig) -> None:
    """``--init`` weights must fit the model and share this run's validation carve-out (else it would leak).

    Reads only their ``model.json``: the weights themselves are loaded, and checked, once, by :func:`create_model`.
    """
    from tumor_xai.checkpoint import METADATA_FILE

    try:
        meta = json.loads((Path(cfg.init) / METADATA_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"--init {cfg.init}: no readable {METADATA_FILE} ({exc}); point it at a weights folder"
        ) from None
    if meta.get("arch") != cfg.arch:
        raise ValueError(f"--init {cfg.init} holds a {meta.get('arch')}, but --arch is {cfg.arch}")
    if meta.get("members", 1) > 1:
        members = [m.get("folder") for m in (meta.get("ensemble") or {}).get("members", [])]
        raise ValueError(
            f"--init {cfg.init} is an ensemble of {meta['members']} networks (python -m tumor_xai.ensemble): "
            f"fine-tune one of its members ({', '.join(map(str, members)) or 'see its model.json'}) instead"
        )
    if meta.get("pooling", "avg") != "avg" and cfg.pooling == "avg":
        raise ValueError(
            f"--init {cfg.init} has a {meta['pooling']} classifier, which cannot become an average-pooled one: "
            f"pass --pooling {meta['pooling']}"
        )
    trained = meta.get("training") or {}
    theirs, ours = carve_out_seed(trained), carve_out_seed(vars(cfg))
    if theirs != ours:
        raise ValueError(
            f"--init {cfg.init} kept out the validation carve-out of seed {theirs}, this run's is seed {ours}: "
            f"its validation images would be in this run's training set; use --seed {theirs} or --split-seed {theirs}"
        )
    if "val_fraction" in trained and trained["val_fraction"] != cfg.val_fraction:
        raise ValueError(
            f"--init {cfg.init} was trained with --val-fraction {trained['val_fraction']}, this run has "
            f"{cfg.val_fraction}: its validation images would be in this run's training set; "
            f"use --val-fraction {trained['val_fraction']}"
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


# --------------------------------------------------------------------------- the run


@dataclass
class RunContext:
    """What every step of one process's run needs: the configuration and where and how it runs."""

    cfg: TrainConfig
    pre: PreprocessConfig
    device: torch.device
    rank: int = 0
    world: int = 1
    bf16: bool = False
    negative: int | None = None  # index of the no-tumour class (erase target, masks), once the classes are known

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def start_run(cfg: TrainConfig) -> RunContext:
    """Pick the device, join the process group (under torchrun), seed the generators, set the backend flags."""
    device = resolve_device(cfg.device)
    rank, world = setup_distributed(device)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed)
    bf16 = use_bf16(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return RunContext(
        cfg, PreprocessConfig(input_size=cfg.image_size, intensity=cfg.intensity), device, rank, world, bf16
    )


def end_run(ctx: RunContext) -> None:
    if ctx.world > 1:
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- data


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


@dataclass
class Split:
    """Device-resident uint8 images ``(N, 1, S, S)`` and labels, with tumour masks where the run uses them."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None  # uint8 (N, 1, S, S); zeros where an image has none
    has_mask: torch.Tensor | None = None  # bool (N,)
    donors: torch.Tensor | None = None  # indices of the tumour slices with a mask (lesion paste donors)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RunData:
    """The Training split on the device, cut into this run's training set and validation carve-out."""

    class_names: list[str]
    fingerprint: str
    train_idx: np.ndarray
    val_idx: np.ndarray
    all: Split  # every image, for the final calibration and OOD fit
    train: Split
    val: Split
    val_masked: Split | None = None  # validation images with a tumour mask, for the localisation monitor


def place_data(ctx: RunContext, data: TrainingData) -> RunData:
    """Carve out the validation images and put images, labels (and masks) on the device as uint8."""
    cfg, decoded = ctx.cfg, data.decoded
    train_idx, val_idx = split_train_val(decoded.labels, decoded.thumbs, cfg.val_fraction, carve_out_seed(vars(cfg)))
    images = torch.from_numpy(decoded.images).unsqueeze(1).to(ctx.device)
    labels = torch.from_numpy(decoded.labels).to(ctx.device)
    run = RunData(
        data.class_names,
        data.fingerprint,
        train_idx,
        val_idx,
        all=Split(images, labels),
        train=Split(images[train_idx], labels[train_idx]),
        val=Split(images[val_idx], labels[val_idx]),
    )
    if ctx.main_process:
        logger.info(
            "data: %d train / %d validation images of %s (%d skipped), decoded in %.1fs; device %s, %d process(es), bf16 %s",
            len(train_idx),
            len(val_idx),
            data.class_names,
            len(decoded.skipped),
            data.seconds,
            ctx.device,
            ctx.world,
            ctx.bf16,
        )
    if cfg.masks:
        has = data.masks.has_mask.copy()
        if ctx.negative is not None:
            has &= decoded.labels != ctx.negative  # a lesion mask on a no-tumour image contradicts its label
        masks = torch.from_numpy(data.masks.masks).unsqueeze(1).to(ctx.device)
        has_t = torch.from_numpy(has).to(ctx.device)
        t_idx, v_idx = torch.from_numpy(train_idx).to(ctx.device), torch.from_numpy(val_idx).to(ctx.device)
        run.train.masks, run.train.has_mask = masks[t_idx], has_t[t_idx]
        run.train.donors = run.train.has_mask.nonzero().squeeze(1)
        v_sel = v_idx[has_t[v_idx]]
        if len(v_sel):
            run.val_masked = Split(images[v_sel], labels[v_sel], masks[v_sel])
        if ctx.main_process:
            logger.info(
                "masks: %d train / %d validation images have a tumour mask", has[train_idx].sum(), has[val_idx].sum()
            )
    return run


def _check_data(ctx: RunContext, data: TrainingData | None) -> TrainingData:
    cfg = ctx.cfg
    if data is None:
        data = load_training_data(cfg, fingerprint=ctx.main_process)
    elif data.image_size != cfg.image_size or (cfg.masks and data.masks is None):
        raise ValueError(
            f"the given TrainingData ({data.image_size} px, masks {data.masks is not None}) does not match the config"
        )
    names = data.class_names
    ctx.negative = names.index(NEGATIVE_CLASS) if NEGATIVE_CLASS in names else None
    if cfg.erase_target == "notumor" and cfg.lesion_erase > 0 and ctx.negative is None:
        raise ValueError(f"--erase-target notumor needs a {NEGATIVE_CLASS!r} class; the classes are {names}")
    if cfg.lesion_paste > 0 and ctx.negative is None:
        raise ValueError(f"--lesion-paste pastes into {NEGATIVE_CLASS!r} slices; the classes are {names}")
    return data


# --------------------------------------------------------------------------- model and optimiser


def create_model(ctx: RunContext, run: RunData) -> nn.Module:
    """The network, from scratch, from ImageNet or from ``--init`` weights, channels-last on the device."""
    cfg = ctx.cfg
    model = build_model(cfg.arch, len(run.class_names), in_chans=1, pretrained=cfg.pretrained)
    if cfg.init and not cfg.resume:
        start = load_weights(cfg.init)
        if list(start.class_names) != list(run.class_names):
            raise ValueError(f"--init {cfg.init} has classes {start.class_names}, the data has {run.class_names}")
        if run.fingerprint and start.metadata.get("data_fingerprint") not in (None, run.fingerprint):
            raise ValueError(
                f"--init {cfg.init} was trained on other data (fingerprint differs): its split would not hold"
            )
        set_pooling(model, pooling_of(start.model))
        model.load_state_dict({k: v.float() for k, v in start.model.state_dict().items()})
        if ctx.main_process:
            logger.info("starting from %s", cfg.init)
    set_pooling(model, cfg.pooling)  # avg -> avgmax keeps the start's answers: the maximum's weights start at zero
    if freeze(model, cfg.freeze_through) and ctx.main_process:
        logger.info("frozen through %s: training %s", cfg.freeze_through, _trainable_summary(model))
    return model.to(ctx.device).to(memory_format=torch.channels_last)


def _trainable_summary(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{n:,} of {sum(p.numel() for p in model.parameters()):,} parameters"


def build_optimizer(
    ctx: RunContext, model: nn.Module, n_train: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, Schedule]:
    """Nesterov SGD (no weight decay on biases and norms) at a learning rate scaled to the global batch,
    following the run's :class:`~tumor_xai.schedule.Schedule` (by steps, or by seconds with a time budget)."""
    cfg = ctx.cfg
    peak_lr = cfg.lr * cfg.batch_size * ctx.world / 128
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # --freeze-through leaves the rest out
            (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    steps_per_epoch = math.ceil((n_train // ctx.world) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, min(total_steps, int(cfg.warmup_epochs * steps_per_epoch)))
    schedule = Schedule(
        cfg.epochs,
        steps_per_epoch,
        warmup,
        time_budget=cfg.time_budget,
        full_size=cfg.image_size,
        low_res_size=cfg.low_res_size,
        full_res_fraction=cfg.full_res_fraction,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    return optimizer, scheduler, schedule


def make_average(cfg: TrainConfig, model: nn.Module) -> AveragedModel | None:
    """With ``--ema D``, an exponential moving average of the weights and BatchNorm statistics (decay D per step).

    The average is what validation scores and what ``best/`` and the shipped weights hold: it sits in the
    middle of the last few hundred steps' wander, which usually generalises better than the last step.
    """
    if cfg.ema <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)


class FeaturesAndLogits(nn.Module):
    """The ResNet's forward returning ``(layer4 map, logits)``, so DDP sees the pass the CAM loss uses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return features_and_logits(self.model, x)


def wrap_for_training(ctx: RunContext, model: nn.Module) -> nn.Module:
    net = FeaturesAndLogits(model)
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    return net


# --------------------------------------------------------------------------- one step


@dataclass
class Batch:
    """One augmented training batch; the tumour and head masks went through the images' warp."""

    x: torch.Tensor  # normalised model input, channels-last
    y: torch.Tensor
    lesion: torch.Tensor | None = None  # (N, 1, S, S) in [0, 1]
    has_mask: torch.Tensor | None = None  # bool (N,)
    erased: torch.Tensor | None = None  # bool (N,): the lesion was inpainted
    head: torch.Tensor | None = None  # (N, 1, S, S) in [0, 1]


def draw_donors(ctx: RunContext, data: Split, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` donor indices: uniform over the masked tumour slices, or (``--paste-donors balanced``) each
    tumour class equally likely, so the few masked gliomas are pasted as often as the many pituitaries."""
    dev = data.donors.device
    if ctx.cfg.paste_donors == "balanced":
        classes = data.labels[data.donors]
        weight = 1.0 / torch.bincount(classes).float().clamp_min(1.0)[classes]
        return data.donors[torch.multinomial(weight, n, replacement=True, generator=gen)]
    return data.donors[torch.randint(len(data.donors), (n,), generator=gen, device=dev)]


def paste_into_batch(
    ctx: RunContext, data: Split, batch: Batch, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``--lesion-paste P``: a random masked tumour slice's lesion pasted into each no-tumour image with
    probability P (:func:`~tumor_xai.augment.paste_lesions`); the image takes the donor's class and mask.
    With ``--paste-twins`` the pasted slice is added to the batch and its original stays, so the batch
    holds the same slice with and without the lesion and keeps every no-tumour slice it drew.

    Returns the batch's images and tumour masks as floats in [0, 1]; updates ``batch``'s labels and ``has_mask``.
    """
    images, masks = batch.x.float().div(255.0), batch.lesion.float().div(255.0)
    n, dev = len(batch.y), images.device
    hosts = (batch.y == ctx.negative) & (torch.rand(n, generator=gen, device=dev) < ctx.cfg.lesion_paste)
    donors = draw_donors(ctx, data, n, gen)
    if not hosts.any():
        return images, masks
    h = hosts.nonzero().squeeze(1)
    d = donors[h]
    pasted_x, pasted_m, ok = paste_lesions(
        images[h], data.images[d].float().div(255.0), data.masks[d].float().div(255.0), gen
    )
    h, d = h[ok], d[ok]
    labels, has_mask = batch.y.clone(), batch.has_mask.clone()
    if ctx.cfg.paste_twins:
        images, masks = torch.cat([images, pasted_x[ok]]), torch.cat([masks, pasted_m[ok]])
        labels = torch.cat([labels, data.labels[d]])
        has_mask = torch.cat([has_mask, torch.ones_like(h, dtype=torch.bool)])
    else:
        images[h], masks[h] = pasted_x[ok], pasted_m[ok]
        labels[h], has_mask[h] = data.labels[d], True
    batch.y, batch.has_mask = labels, has_mask
    return images, masks


def make_batch(
    ctx: RunContext, data: Split, idx: torch.Tensor, aug: AugmentConfig, gen: torch.Generator, size: int | None = None
) -> Batch:
    """Augment the images at ``idx`` on the device (drawing from ``gen`` in a fixed order, so a seed repeats),
    resized to ``size`` (progressive resizing) when it is below the stored size."""
    cfg = ctx.cfg
    use_masks, use_head = data.masks is not None, cfg.head_loss_weight > 0
    images = data.images[idx]
    batch = Batch(x=images, y=data.labels[idx])
    if not (use_masks or use_head):
        x01 = augment(images, aug, gen, labels=batch.y)
    else:
        channels = []
        if use_masks:
            batch.has_mask = data.has_mask[idx]
            lesions = data.masks[idx]
            if cfg.lesion_paste > 0:
                batch.x, batch.lesion = images, lesions
                images, lesions = paste_into_batch(ctx, data, batch, gen)
            channels.append(lesions)
            if cfg.lesion_erase > 0:
                draw = torch.rand(len(batch.y), generator=gen, device=images.device)
                batch.erased = batch.has_mask & (draw < cfg.lesion_erase)
        if use_head:
            channels.append(head_region(images.float().div(255.0) if images.dtype == torch.uint8 else images))
        masks = torch.cat([c.float().div(255.0) if c.dtype == torch.uint8 else c.float() for c in channels], 1)
        x01, warped = augment_pair(images, masks, aug, gen, erase=batch.erased, labels=batch.y)
        if size and size < x01.shape[-1]:
            warped = F.interpolate(warped, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        batch.lesion = warped[:, :1] if use_masks else None
        batch.head = warped[:, -1:] if use_head else None
    if size and size < x01.shape[-1]:
        x01 = F.interpolate(x01, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    batch.x = normalize(x01, ctx.pre).contiguous(memory_format=torch.channels_last)
    return batch


def _cam_term(fmap, fc_weight, batch: Batch, masks: torch.Tensor, sel: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean CAM-in-mask loss of the true class over the selected images (0 when none is selected)."""
    per = attention.cam_mask_loss(fmap, fc_weight, batch.y, masks, mode)
    return (per * sel).sum() / sel.sum().clamp_min(1)


def compute_loss(
    ctx: RunContext, batch: Batch, fmap: torch.Tensor, logits: torch.Tensor, fc_weight: torch.Tensor, ramp: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy (uniform or no-tumour target for erased images) plus the weighted, ramped CAM losses."""
    cfg, y, erased = ctx.cfg, batch.y, batch.erased
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing, reduction="none")
    if erased is not None:
        if cfg.erase_target == "uniform":
            other = -F.log_softmax(logits, dim=1).mean(1)
        else:
            target = torch.full_like(y, ctx.negative)
            other = F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing, reduction="none")
        ce = torch.where(erased, other, ce)
    loss, parts = ce.mean(), {}
    kept = ~erased if erased is not None else torch.ones_like(y, dtype=torch.bool)
    if cfg.cam_loss_weight > 0:
        parts["cam"] = _cam_term(fmap, fc_weight, batch, batch.lesion, batch.has_mask & kept, cfg.cam_loss)
        loss = loss + ramp * cfg.cam_loss_weight * parts["cam"]
    if cfg.head_loss_weight > 0:
        unmasked = ~batch.has_mask if batch.has_mask is not None else torch.ones_like(y, dtype=torch.bool)
        parts["head"] = _cam_term(fmap, fc_weight, batch, batch.head, unmasked & kept, cfg.cam_loss)
        loss = loss + ramp * cfg.head_loss_weight * parts["head"]
    return loss, {k: v.detach() for k, v in parts.items()}


# --------------------------------------------------------------------------- one epoch


class EpochMeter:
    """Sums of the loss, the correct answers and the guidance losses over an epoch, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.parts: dict[str, torch.Tensor] = {}
        self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.loss += loss.detach() * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, torch.zeros((), device=self.device)) + v * len(y)
        self.seen += len(y)

    def postfix(self) -> dict[str, str]:
        return {"loss": f"{self.loss.item() / self.seen:.3f}", "acc": f"{self.correct.item() / self.seen:.3f}"}

    def result(self, world: int) -> dict[str, float]:
        """The epoch's means over every process."""
        keys = sorted(self.parts)
        seen = torch.tensor(float(self.seen), device=self.device)
        stats = torch.stack([self.loss, self.correct, seen, *(self.parts[k] for k in keys)])
        if world > 1:
            dist.all_reduce(stats)
        out = {"train_loss": (stats[0] / stats[2]).item(), "train_acc": (stats[1] / stats[2]).item()}
        out.update({f"train_{k}_loss": (stats[3 + j] / stats[2]).item() for j, k in enumerate(keys)})
        return out


def shard_order(ctx: RunContext, n: int, epoch: int) -> torch.Tensor:
    """This process's share of the epoch's shuffled order (the same permutation on every process)."""
    g = torch.Generator(device="cpu").manual_seed(ctx.cfg.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = n // ctx.world
    return perm[ctx.rank * per_rank : (ctx.rank + 1) * per_rank].to(ctx.device)


def train_one_epoch(
    ctx: RunContext,
    model: nn.Module,
    optimizer,
    scheduler,
    data: Split,
    epoch: int,
    average: AveragedModel | None = None,
    schedule: Schedule | None = None,
) -> dict:
    """One pass over this process's shard; ``model`` returns ``(layer4 map, logits)`` (:func:`wrap_for_training`).

    The schedule sets each step's input size and guidance weight; with a time budget the pass stops
    early when the budget is spent.
    """
    cfg = ctx.cfg
    if schedule is None:
        schedule = Schedule(cfg.epochs, math.ceil(len(data) / cfg.batch_size), 1, full_size=cfg.image_size)
    model.train()
    base = unwrap(model).model
    for module in frozen_modules(base, cfg.freeze_through):
        module.eval()  # frozen BatchNorm keeps its statistics
    mine = shard_order(ctx, len(data), epoch)
    aug_g = torch.Generator(device=ctx.device).manual_seed(cfg.seed * 1_000_003 + epoch * 101 + ctx.rank)
    aug = AugmentConfig(**cfg.augment)
    fc_weight = base.fc.weight
    steps = math.ceil(len(mine) / cfg.batch_size)
    meter = EpochMeter(ctx.device)
    desc = f"epoch {epoch + 1}" + ("" if cfg.time_budget else f"/{cfg.epochs}")
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not ctx.main_process, dynamic_ncols=True)
    size = schedule.image_size(schedule.progress(scheduler.last_epoch))
    for i in bar:
        progress = schedule.progress(scheduler.last_epoch)
        if cfg.time_budget and progress >= 1.0:
            break
        size = schedule.image_size(progress)
        batch = make_batch(ctx, data, mine[i * cfg.batch_size : (i + 1) * cfg.batch_size], aug, aug_g, size)
        with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
            fmap, logits = model(batch.x)
        logits = logits.float()
        ramp = schedule.guidance(progress, epoch + i / steps, cfg.cam_warmup_epochs)
        loss, parts = compute_loss(ctx, batch, fmap, logits, fc_weight, ramp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update_parameters(base)
        meter.add(loss, logits, batch.y, parts)
        if ctx.main_process and (i % 10 == 0 or i == steps - 1):
            bar.set_postfix(size=size, **meter.postfix())
    return {**meter.result(ctx.world), "image_size": size}


def evaluate(ctx: RunContext, model: nn.Module, data: Split) -> dict:
    """Validation loss and accuracy; each process scores its shard and the counts are summed."""
    if len(data) == 0:
        return {}
    shard = slice(ctx.rank, None, ctx.world)
    logits = inference.forward(
        model, data.images[shard], ctx.pre, ctx.cfg.batch_size, bf16=ctx.bf16, channels_last=True
    ).logits
    y = data.labels[shard].cpu()
    stats = torch.tensor(
        [F.cross_entropy(logits, y, reduction="sum").item(), (logits.argmax(1) == y).sum().item(), float(len(y))],
        device=data.images.device,
    )
    if ctx.world > 1:
        dist.all_reduce(stats)
    return {"val_loss": (stats[0] / stats[2]).item(), "val_acc": (stats[1] / stats[2]).item()}


@torch.no_grad()
def monitor_localization(ctx: RunContext, model: nn.Module, data: Split) -> dict:
    """Approximate pointing game and heat-in-mask of the true class's CAM on masked validation images."""
    hits, mass = [], []
    batches = inference.forward_batches(
        model, data.images, ctx.pre, ctx.cfg.batch_size, bf16=ctx.bf16, channels_last=True
    )
    for sl, fmap, _ in batches:
        cam = inference.class_activation_map(fmap, model.fc.weight, data.labels[sl])
        m = data.masks[sl].float().div_(255.0)
        hits.append(attention.pointing_hits(cam, m).float().cpu())
        mass.append(attention.heat_in_mask(cam, m).cpu())
    return {"val_pointing": torch.cat(hits).mean().item(), "val_heat_in_mask": torch.cat(mass).mean().item()}


def run_epoch(
    ctx: RunContext,
    net: nn.Module,
    model: nn.Module,
    optimizer,
    scheduler,
    run: RunData,
    epoch: int,
    average: AveragedModel | None = None,
    schedule: Schedule | None = None,
) -> dict:
    """Train one epoch, then score the validation carve-out (and the heatmaps of its masked images).

    With a weight average the figures are the average's; the trained weights' own accuracy is ``val_acc_raw``.
    Epochs of the low-resolution phase of progressive resizing are not validated (``validated``: false):
    the best epoch is chosen among those trained at the size the model is used at.
    """
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.time()
    stats = train_one_epoch(ctx, net, optimizer, scheduler, run.train, epoch, average, schedule)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t
    if schedule is not None and not schedule.full_size_phase(schedule.progress(scheduler.last_epoch)):
        stats.update(epoch=epoch + 1, seconds=round(dt, 2), lr=optimizer.param_groups[0]["lr"], validated=False)
        return stats
    scored = model if average is None else average.module
    stats.update(evaluate(ctx, scored, run.val))
    if average is not None and len(run.val):
        stats["val_acc_raw"] = evaluate(ctx, model, run.val)["val_acc"]
    if ctx.main_process and run.val_masked is not None:
        stats.update(monitor_localization(ctx, scored, run.val_masked))
    stats.update(
        epoch=epoch + 1,
        seconds=round(dt, 2),
        images_per_s=round((len(run.train) // ctx.world) * ctx.world / dt, 1),
        lr=optimizer.param_groups[0]["lr"],
    )
    return stats


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Progress:
    """Where a run stands: the next epoch, the best epoch so far and the per-epoch log (``log.json``)."""

    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "val_loss": float("inf"), "epoch": -1})
    log: list = field(default_factory=list)
    spent: float = 0.0  # seconds of the time budget used (training and validation)


def resume(ctx: RunContext, model: nn.Module, optimizer, scheduler, average: AveragedModel | None) -> Progress:
    """With ``--resume``, load ``OUT/last``'s weights, optimiser, schedule, average and log; else a fresh start."""
    if not ctx.cfg.resume:
        return Progress()
    last = ctx.out / "last"
    model.load_state_dict(load_weights(last, device=ctx.device).model.state_dict())
    state = torch.load(last / "train_state.pt", map_location=ctx.device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if average is not None:  # check_config made sure the run kept one
        average.load_state_dict(state["average"])
    progress = Progress(state["epoch"] + 1, state["best"], state["log"], state.get("spent", 0.0))
    if ctx.main_process:
        logger.info("resuming after epoch %d (best val acc %.4f)", progress.start_epoch, progress.best["val_acc"])
    return progress


def save_state(
    path: Path,
    optimizer,
    scheduler,
    epoch: int,
    best: dict,
    log: list,
    average: AveragedModel | None = None,
    spent: float = 0.0,
) -> None:
    """Optimiser, schedule and average state for --resume (tensors and plain values only: loads with weights_only)."""
    buf = io.BytesIO()
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best": best,
        "log": log,
        "spent": spent,
    }
    if average is not None:
        state["average"] = average.state_dict()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _improved(stats: dict, best: dict) -> bool:
    # Without a validation split both are 0.0, so every epoch counts as the best (the last one is kept).
    acc, loss = stats.get("val_acc", 0.0), stats.get("val_loss", 0.0)
    return acc > best["val_acc"] or (acc == best["val_acc"] and loss <= best["val_loss"])


def save_checkpoint(
    ctx: RunContext,
    model: nn.Module,
    optimizer,
    scheduler,
    progress: Progress,
    meta: dict,
    average: AveragedModel | None = None,
    write_last: bool = True,
) -> None:
    """After an epoch: ``best/`` when validation improved, ``last/`` with the state for --resume, ``log.json``.

    ``best/`` holds the weights validation scored: the average when there is one. ``write_last`` False
    skips ``last/`` (short epochs on a GPU would otherwise write it a few times a second).
    """
    stats = progress.log[-1]
    epoch = stats["epoch"]
    if stats.get("validated", True) and _improved(stats, progress.best):
        progress.best = {"val_acc": stats.get("val_acc", 0.0), "val_loss": stats.get("val_loss", 0.0), "epoch": epoch}
        scored = model if average is None else average.module
        save_weights(scored, ctx.out / "best", {**meta, "metrics": {"best_epoch": progress.best}})
    if write_last:
        save_last(ctx, model, optimizer, scheduler, progress, meta, average)
    atomic_write_bytes(ctx.out / "log.json", (json.dumps(progress.log, indent=1) + "\n").encode())


def save_last(
    ctx: RunContext,
    model: nn.Module,
    optimizer,
    scheduler,
    progress: Progress,
    meta: dict,
    average: AveragedModel | None = None,
) -> None:
    """``last/``: the latest weights with the optimiser, schedule, average and log, for --resume."""
    epoch = progress.log[-1]["epoch"]
    save_weights(model, ctx.out / "last", {**meta, "metrics": {"epoch": epoch}})
    save_state(
        ctx.out / "last" / "train_state.pt",
        optimizer,
        scheduler,
        epoch - 1,
        progress.best,
        progress.log,
        average,
        spent=progress.spent,
    )


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


def finalize(ctx: RunContext, run: RunData) -> dict:
    """Calibrate the best checkpoint on the validation split, fit the OOD statistics, write OUT/.

    Runs in float32, as the app does: a threshold fitted on bf16 logits could sit on the wrong side
    of slices near it.
    """
    from tumor_xai import ood
    from tumor_xai.calibration import fit_decision

    best = load_weights(ctx.out / "best", device=ctx.device)
    meta = dict(best.metadata)

    def forward(idx: np.ndarray) -> inference.Forward:
        return inference.forward(best.model, run.all.images[idx], ctx.pre, ctx.cfg.batch_size, channels_last=True)

    if len(run.val_idx):
        val = forward(run.val_idx)
        fitted = fit_decision(
            val.logits,
            run.all.labels[run.val_idx].cpu(),
            ctx.negative,
            ctx.cfg.screening_sensitivity,
            ctx.cfg.screening_specificity or None,
        )
        meta.setdefault("metrics", {})["validation"] = fitted.pop("validation")
        meta.update(fitted)
    else:
        logger.warning("no validation split: temperature stays 1 and no screening threshold is stored")
    extras, meta["ood"] = ood.fit_model(
        best.model, run.all.images, run.all.labels, run.train_idx, run.val_idx, ctx.pre, ctx.cfg.batch_size,
        augment=AugmentConfig(**ctx.cfg.augment), seed=ctx.cfg.seed,
    )  # fmt: skip
    save_weights(best.model, ctx.out, meta, extras=extras, half=ctx.cfg.half)
    return meta


# --------------------------------------------------------------------------- main


def train(cfg: TrainConfig, data: TrainingData | None = None) -> Path:
    """Run training as configured (progress goes to the logger); returns the output folder.

    ``data`` (from :func:`load_training_data`) skips the decoding, for several runs on one dataset;
    it must match ``cfg`` (image size, and masks when the run uses them).
    """
    ctx = start_run(cfg)
    if cfg.time_budget and ctx.world > 1:
        raise ValueError("--time-budget runs in one process (each process's clock would end it at another step)")
    run = place_data(ctx, _check_data(ctx, data))
    model = create_model(ctx, run)
    optimizer, scheduler, schedule = build_optimizer(ctx, model, len(run.train))
    average = make_average(cfg, model)
    progress = resume(ctx, model, optimizer, scheduler, average)
    schedule.spent = progress.spent
    net = wrap_for_training(ctx, model)
    meta = weights_metadata(cfg, run.class_names, ctx.pre, run.fingerprint)
    meta["training"]["device"] = ctx.device.type  # what ran, not what was asked ("auto")
    if ctx.main_process:
        ctx.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(ctx.out / "config.json", (json.dumps(asdict(cfg), indent=2) + "\n").encode())

    schedule.start()
    epoch, saved = progress.start_epoch, time.monotonic()
    while not schedule.done(scheduler.last_epoch):
        progress.log.append(run_epoch(ctx, net, model, optimizer, scheduler, run, epoch, average, schedule))
        progress.spent = schedule.elapsed()
        epoch += 1
        if ctx.main_process:
            due = time.monotonic() - saved >= LAST_EVERY_S or schedule.done(scheduler.last_epoch)
            save_checkpoint(ctx, model, optimizer, scheduler, progress, meta, average, write_last=due)
            saved = time.monotonic() if due else saved
            stats = progress.log[-1].items()
            logger.info(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats))

    if ctx.main_process:
        final = finalize(ctx, run)
        summary = {
            "train_seconds": round(sum(s["seconds"] for s in progress.log[progress.start_epoch :]), 1),
            "best": progress.best,
            "calibration": final.get("calibration"),
            "screening": final.get("screening"),
            "ood": {k: v for k, v in final.get("ood", {}).items() if not isinstance(v, list)},
        }
        logger.info("finished: %s", json.dumps(summary))
    end_run(ctx)
    return ctx.out


# --------------------------------------------------------------------------- command line


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
    p.add_argument("--epochs", type=int, default=d.epochs, help="length of the run (without --time-budget)")
    p.add_argument(
        "--time-budget",
        type=_duration,
        default=d.time_budget,
        metavar="DURATION",
        help="train for this long (e.g. 2h, 90m, 300s; training and validation, not the final calibration): "
        "the learning rate follows the clock and reaches zero at the end; --epochs is then only the unit of "
        "--cam-warmup-epochs",
    )
    p.add_argument(
        "--low-res-size",
        type=int,
        default=d.low_res_size,
        help="progressive resizing: train at this size (growing to 1.25x) before the full --image-size (0: off)",
    )
    p.add_argument(
        "--full-res-fraction",
        type=float,
        default=d.full_res_fraction,
        help="with --low-res-size: the share of the run at the full size, at its end (guidance losses on there)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument(
        "--lr", type=float, default=d.lr, help="peak SGD learning rate for a global batch of 128 (scaled linearly)"
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seed of the validation carve-out (default: --seed); give several seeds one carve-out to compare them on",
    )
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
    p.add_argument(
        "--screening-specificity",
        type=float,
        default=d.screening_specificity,
        help="lower the screening threshold until this share of validation no-tumour slices is unflagged (0: off)",
    )
    p.add_argument("--half", action="store_true", help="store the final weights as float16 (half the size)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument(
        "--freeze-through",
        default=d.freeze_through,
        choices=FREEZE_STAGES,
        help="with --init: keep the stem and the stages up to this one as they are (layer4: only the classifier "
        "learns; each step then costs about a forward pass)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=d.ema,
        help="keep a moving average of the weights with this decay per step (e.g. 0.998) and ship it (0: off)",
    )
    p.add_argument(
        "--pooling",
        default=d.pooling,
        choices=POOLINGS,
        help="the classifier's input: each layer4 channel's average (avg), or its average and maximum side by side "
        "(avgmax: a small lesion is not outvoted by the rest of the slice); from avg --init weights the maximum's "
        "weights start at zero",
    )
    _add_guidance_arguments(p.add_argument_group("augmentation and attention guidance"), d)
    return p


def _add_guidance_arguments(g: argparse._ArgumentGroup, d: TrainConfig) -> None:
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
    g.add_argument(
        "--lesion-paste",
        type=float,
        default=d.lesion_paste,
        help="probability of pasting a masked lesion into a no-tumour image, which takes the lesion's class (0: off)",
    )
    g.add_argument(
        "--paste-twins",
        action="store_true",
        help="add each pasted slice to the batch beside its unpasted original instead of replacing it",
    )
    g.add_argument(
        "--paste-donors",
        default=d.paste_donors,
        choices=PASTE_DONORS,
        help="which lesions are pasted: uniform over the masked slices, or balanced over their classes",
    )


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    out = train(cfg)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
