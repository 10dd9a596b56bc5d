"""Mask-guided attention: mask loading, the CAM-in-mask loss, a synthetic shortcut it must beat, and the CLI flags."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES
from PIL import Image
from torch import nn

from tumor_xai import Predictor
from tumor_xai.attention import (
    cam_mask_loss,
    class_activation_map,
    heat_in_mask,
    load_training_masks,
    pointing_hits,
)
from tumor_xai.data import DataError, discover
from tumor_xai.schedule import guidance_ramp
from tumor_xai.train import main

SMOKE = ["--epochs", "1", "--image-size", "64", "--batch-size", "8", "--device", "cpu", "--arch", "resnet_tiny"]


def write_masks(data: Path, out: Path) -> Path:
    """Masks for every tumour image of a synthetic dataset: its bright blob (the only pixels above 170)."""
    rows = []
    for split in ("Training", "Testing"):
        for name in CLASSES:
            if name == "notumor":
                continue
            for p in sorted((data / split / name).iterdir()):
                blob = np.asarray(Image.open(p).convert("L")) > 170
                dest = out / split / name / f"{p.stem}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(blob.astype(np.uint8) * 255).save(dest)
                rows.append({"image": f"{split}/{name}/{p.name}", "mask": f"{split}/{name}/{p.stem}.png"})
    with open(out / "masks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="module")
def tiny_masks(tiny_dataset, tmp_path_factory) -> Path:
    return write_masks(tiny_dataset, tmp_path_factory.mktemp("tiny-masks"))


# ----------------------------------------------------------------------------------- masks on disk


def test_masks_are_matched_and_fitted_like_their_images(tiny_dataset, tiny_masks):
    paths = [s.path for s in discover(tiny_dataset).splits["Training"]]
    loaded = load_training_masks(tiny_masks, tiny_dataset, paths, 32)
    labels = np.array([CLASSES.index(p.parent.name) for p in paths])
    assert loaded.masks.shape == (len(paths), 32, 32) and loaded.masks.dtype == np.uint8
    assert loaded.count == 30 and not loaded.has_mask[labels == CLASSES.index("notumor")].any()
    assert (loaded.masks[~loaded.has_mask] == 0).all() and (loaded.masks[loaded.has_mask].max((1, 2)) > 127).all()
    i = int(np.flatnonzero(loaded.has_mask)[0])  # the mask sits on the image's bright blob at 32 px too
    image = np.asarray(Image.open(paths[i]).convert("L").resize((32, 32), Image.BILINEAR)).astype(float)
    assert image[loaded.masks[i] > 127].mean() > image[loaded.masks[i] == 0].mean() + 60


def test_bad_masks_are_named(tiny_dataset, tiny_masks, tmp_path):
    paths = [s.path for s in discover(tiny_dataset).splits["Training"]]
    with pytest.raises(DataError, match="No masks.csv"):
        load_training_masks(tmp_path, tiny_dataset, paths, 32)
    (tmp_path / "masks.csv").write_text("image,mask\nTraining/glioma/elsewhere.jpg,x.png\n")
    with pytest.raises(DataError, match="None of the masks"):
        load_training_masks(tmp_path, tiny_dataset, paths, 32)
    first = sorted((tiny_dataset / "Training" / "glioma").iterdir())[0]
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "masks.csv").write_text(f"image,mask\nTraining/glioma/{first.name},small.png\n")
    with pytest.raises(DataError, match=r"small.png is 12x10 but its image .* is 64x64"):
        load_training_masks(tmp_path, tiny_dataset, paths, 32)


# --------------------------------------------------------------------------------------- the loss


def _one_hot_cam(row: int, col: int, size: int = 4) -> torch.Tensor:
    """A ``(1, 1, size, size)`` feature map that is 1 at one cell, with fc weight 1: its CAM is that cell."""
    fmap = torch.zeros(1, 1, size, size)
    fmap[0, 0, row, col] = 1.0
    return fmap


@pytest.mark.parametrize("mode", ["mass", "kl"])
def test_loss_is_lower_when_the_map_sits_in_the_mask(mode):
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 0:8, 0:8] = 1.0  # the top-left cell of a 4 x 4 map
    w, t = torch.ones(1, 1), torch.tensor([0])
    inside = cam_mask_loss(_one_hot_cam(0, 0), w, t, mask, mode)
    outside = cam_mask_loss(_one_hot_cam(3, 3), w, t, mask, mode)
    assert torch.isfinite(inside).all() and inside.item() < outside.item()


def test_loss_has_gradients_even_for_an_empty_map():
    # A map with no positive evidence must not be a refuge: the loss still pushes heat into the mask.
    fmap = torch.full((1, 1, 4, 4), -1.0, requires_grad=True)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:16, 8:16] = 1.0
    cam_mask_loss(fmap, torch.ones(1, 1), torch.tensor([0]), mask).sum().backward()
    assert fmap.grad.abs().sum() > 0 and fmap.grad[0, 0, 1, 1] < 0
    with pytest.raises(ValueError, match="unknown CAM loss 'iou'"):
        cam_mask_loss(fmap, torch.ones(1, 1), torch.tensor([0]), mask, "iou")


def test_heat_in_mask_and_pointing():
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 0:8, 0:8] = 1.0
    cams = torch.zeros(2, 4, 4)
    cams[0, 0, 0] = 1.0  # on the lesion
    cams[1, 3, 3] = 1.0  # far away
    mass = heat_in_mask(cams, mask)
    assert mass[0] > 0.3 > 0.01 > mass[1]
    assert pointing_hits(cams, mask).tolist() == [True, False]
    assert heat_in_mask(torch.zeros(1, 4, 4), mask[:1]).item() == pytest.approx(64 / 1024), "empty map = uniform"


def test_guidance_ramp():
    assert guidance_ramp(0.0, 10) == 0 and guidance_ramp(5.0, 10) == 0
    assert guidance_ramp(7.5, 10) == pytest.approx(0.5) and guidance_ramp(12, 10) == 1
    assert guidance_ramp(0.0, 0) == 1


# ------------------------------------------------------------------------------ the shortcut case


def _shortcut_data(n: int, seed: int, size: int = 48):
    """Class 1 = a lesion at a random place in the head AND a bright square in the frame's corner.

    Both cues predict the class perfectly; the corner square is the easier one, so an unguided
    model's CAM peaks there. Returns images (N, 1, S, S) in [0, 1], lesion masks, labels.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    images = np.zeros((n, 1, size, size), np.float32)
    masks = np.zeros_like(images)
    labels = rng.integers(0, 2, n)
    for i in range(n):
        img = np.where((yy - c) ** 2 + (xx - c) ** 2 < (0.42 * size) ** 2, 0.35, 0.0) + rng.normal(
            0, 0.03, (size, size)
        )
        if labels[i]:
            a, r = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.22 * size)
            lesion = (yy - c - r * np.sin(a)) ** 2 + (xx - c - r * np.cos(a)) ** 2 < (0.07 * size) ** 2
            img[lesion] = 0.8
            masks[i, 0] = lesion
            img[2:10, 2:10] = 1.0
        images[i, 0] = np.clip(img, 0, 1)
    return torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(labels)


class _TinyCamNet(nn.Module):
    """Three convolutions (a 12 x 12 map at 48 px), global average pool, linear head: a ResNet in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        fmap = self.features(x)
        return fmap, self.fc(fmap.mean((2, 3)))


def _train_tiny(cam_weight: float, steps: int = 120) -> dict:
    torch.manual_seed(0)
    x, m, y = _shortcut_data(256, seed=0)
    net = _TinyCamNet()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        i = torch.randint(0, len(x), (16,), generator=g)  # batches of 16: half the time of 32, same margins
        fmap, logits = net(x[i])
        loss = F.cross_entropy(logits, y[i])
        if cam_weight:
            # the same warm-up as training: classifier first, then the map (tumor_xai.schedule.guidance_ramp)
            per = cam_mask_loss(fmap, net.fc.weight, y[i], m[i])
            sel = y[i] == 1
            loss = loss + guidance_ramp(step / 40, 2.0) * cam_weight * (per * sel).sum() / sel.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, mt, yt = _shortcut_data(64, seed=99)
    with torch.no_grad():
        fmap, logits = net(xt)
        tumour = yt == 1
        cam = class_activation_map(fmap[tumour], net.fc.weight, yt[tumour])
        return {
            "accuracy": (logits.argmax(1) == yt).float().mean().item(),
            "pointing": pointing_hits(cam, mt[tumour]).float().mean().item(),
            "mass": heat_in_mask(cam, mt[tumour]).mean().item(),
        }


@pytest.mark.slow
def test_cam_loss_moves_the_map_from_the_shortcut_to_the_lesion():
    plain, guided = _train_tiny(0.0), _train_tiny(1.0)  # one intra-op thread (conftest): tiny convolutions
    assert plain["accuracy"] >= 0.95 and guided["accuracy"] >= 0.95
    assert plain["pointing"] <= 0.3, f"the synthetic shortcut should attract an unguided model: {plain}"
    assert guided["pointing"] >= 0.9 and guided["mass"] > plain["mass"] + 0.2, (plain, guided)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_guided_run_writes_a_loadable_folder_and_records_the_flags(tiny_dataset, tiny_masks, tmp_path):
    out = tmp_path / "guided"
    args = [
        "--data",
        str(tiny_dataset),
        "--out",
        str(out),
        *SMOKE,
        "--masks",
        str(tiny_masks),
        "--cam-loss-weight",
        "0.5",
        "--cam-warmup-epochs",
        "0",
        "--head-loss-weight",
        "0.2",
        "--lesion-erase",
        "0.3",
        "--aug",
        "strong",
    ]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    training = json.loads((out / "model.json").read_text())["training"]
    for record in (config, training):
        assert record["masks"] == str(tiny_masks) and record["cam_loss_weight"] == 0.5 and record["cam_loss"] == "mass"
        assert (
            record["head_loss_weight"] == 0.2 and record["lesion_erase"] == 0.3 and record["erase_target"] == "uniform"
        )
        assert record["aug"] == "strong" and record["augment"]["invert"] > 0
    log = json.loads((out / "log.json").read_text())
    assert {"train_cam_loss", "train_head_loss", "val_pointing", "val_heat_in_mask"} <= set(log[0])
    pred = Predictor.from_pretrained(out).predict(next((tiny_dataset / "Testing" / "glioma").iterdir()))
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--cam-loss-weight", "1"], "need --masks"),
        (["--lesion-erase", "0.5"], "need --masks"),
        (["--masks", "MASKS"], "only used by"),
        (["--masks", "NOWHERE", "--cam-loss-weight", "1"], "no masks.csv"),
        (["--masks", "MASKS", "--lesion-erase", "1.5"], "probability"),
        (["--cam-loss-weight", "-1"], ">= 0"),
    ],
)
def test_bad_guidance_flags_fail_before_any_work(tiny_dataset, tiny_masks, tmp_path, capsys, extra, message):
    extra = [str(tiny_masks) if e == "MASKS" else str(tmp_path / "nowhere") if e == "NOWHERE" else e for e in extra]
    out = tmp_path / "out"
    assert main(["--data", str(tiny_dataset), "--out", str(out), *SMOKE, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_rejects_an_unknown_augmentation_setting(tiny_dataset, tmp_path, capsys):
    assert main(["--data", str(tiny_dataset), "--out", str(tmp_path / "o"), *SMOKE, "--aug-set", "sharpness=1"]) == 2
    assert "unknown augmentation setting" in capsys.readouterr().err
