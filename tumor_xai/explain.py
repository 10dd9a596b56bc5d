"""Class-activation heatmaps: a hook-free Grad-CAM fast path plus pytorch-grad-cam's methods.

Every map is computed on the exact tensor the model classified (the output of
:func:`tumor_xai.preprocess.prepare`), min-max normalised to [0, 1] at the feature map's resolution and
resized bilinearly to the model's square input, as pytorch-grad-cam does; then smoothed with a Gaussian
of a fifth of a feature-map cell (:func:`smooth_heatmaps`), so that a 7 x 7 map reads as a region rather
than the four-pointed stars and ridges of bilinear interpolation between cell centres. The caller maps it back onto
the original pixels with :meth:`tumor_xai.preprocess.Geometry.to_original`.

Fast path (:func:`tumor_xai.inference.class_activation_map`): a ResNet ends in global average
pooling and one linear layer, so the gradient of logit ``c`` with respect to the last block's map
``A`` (``k`` channels, ``h x w`` cells) is ``W[c, k] / (h*w)`` at every cell. Grad-CAM on the last
block is therefore ``ReLU(sum_k W[c, k] A_k)`` up to a positive scale that normalisation removes: no
backward pass, no hooks, and it reuses the forward pass that produced the prediction.

Library methods register hooks on the model and keep activations on the CAM object, so two
concurrent calls on one model would mix each other's tensors (and a plain forward running at the same
time would trip the hooks too). :func:`explain_batch` therefore runs them under one process-wide lock,
with hooks registered only for the duration of the call; :class:`tumor_xai.predictor.Predictor` gives
them a private copy of the model so its hook-free forwards never meet a hook.
"""

from __future__ import annotations

import copy
import threading
import time
import weakref

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from tumor_xai.inference import class_activation_map
from tumor_xai.model import features_and_logits

__all__ = [
    "COLORMAPS",
    "DEFAULT_ALPHA",
    "DEFAULT_COLORMAP",
    "DEFAULT_LAYER",
    "DEFAULT_METHOD",
    "METHODS",
    "SMOOTH_SIGMA_CELLS",
    "SLOW_METHODS",
    "ExplanationTimeout",
    "check_colormap",
    "check_method",
    "explain_batch",
    "head_mask",
    "is_fast_path",
    "layer_stride",
    "normalize_cams",
    "overlay",
    "resolve_layer",
    "scorecam",
    "smooth_heatmaps",
    "drawn_heatmaps",
]


# Method name -> pytorch-grad-cam class name. The library is imported on first use: it pulls in
# scikit-learn and more, seconds of start-up that the default (hook-free) Grad-CAM never needs.
METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}
DEFAULT_METHOD = "gradcam"
DEFAULT_LAYER = "layer4"
# ScoreCAM runs one forward pass per channel it scores. The library scores every channel of the
# target layer (512 on layer4: about a minute on one CPU thread); here only the SCORECAM_CHANNELS
# most active ones (the channel selection of Faster Score-CAM), in batches, and a request that still
# runs past SCORECAM_BUDGET_S seconds stops with ExplanationTimeout instead of holding the server.
SCORECAM_BATCH = 32
SCORECAM_CHANNELS = 64
SCORECAM_BUDGET_S = 30.0
# Methods that take over a second per image on a CPU thread: the app runs them in a queue of their own.
SLOW_METHODS = ("scorecam",)

COLORMAPS = {name[len("COLORMAP_") :].lower(): getattr(cv2, name) for name in dir(cv2) if name.startswith("COLORMAP_")}

# One lock for every hook-based CAM in the process: hooks live on modules, not threads.
_HOOK_LOCK = threading.Lock()
_HOOK_FREE_COPIES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


class ExplanationTimeout(RuntimeError):
    """An explanation ran past its time budget; the message says which method and what to use instead."""


def check_method(method: str) -> str:
    """Return ``method`` if it is a known CAM method, else raise ``ValueError`` listing them."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def check_colormap(name: str) -> int:
    """The OpenCV colormap constant for ``name`` (e.g. "jet"); ``ValueError`` listing valid names."""
    key = name.lower()
    if key not in COLORMAPS:
        raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(sorted(COLORMAPS))}")
    return COLORMAPS[key]


def _layer_names(model: nn.Module) -> list[str]:
    names = []
    for i in range(1, 5):
        stage = getattr(model, f"layer{i}", None)
        if isinstance(stage, nn.Sequential):
            names.append(f"layer{i}")
            names.extend(f"layer{i}.{j}" for j in range(len(stage)))
    return names


def resolve_layer(model: nn.Module, name: str | None = None) -> nn.Module:
    """The module a layer name points at: "layer4" is the stage's last block, "layer4.0" its first."""
    name = name or DEFAULT_LAYER
    valid = _layer_names(model)
    if name not in valid:
        raise ValueError(f"unknown target layer {name!r}; choose one of {', '.join(valid)}")
    module = model.get_submodule(name)
    return module[-1] if isinstance(module, nn.Sequential) else module


def is_fast_path(model: nn.Module, method: str, layer: str | None = None) -> bool:
    """True when ``method`` on ``layer`` is plain Grad-CAM on the last block (computable without hooks)."""
    return method == "gradcam" and resolve_layer(model, layer) is model.layer4[-1]


def normalize_cams(cams: np.ndarray, size: int) -> np.ndarray:
    """Min-max normalise maps ``(N, h, w)`` and resize them bilinearly to ``(N, size, size)``.

    Mirrors pytorch-grad-cam's ``scale_cam_image`` (normalise, then ``cv2.resize``), so both paths
    produce the same numbers. A flat or non-finite map becomes zeros.
    """
    out = np.empty((len(cams), size, size), dtype=np.float32)
    for i, cam in enumerate(np.asarray(cams, dtype=np.float32)):
        cam = np.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0)
        cam = np.maximum(cam, 0.0)
        cam = cam - cam.min()
        peak = cam.max()
        cam = cam / peak if peak > 0 else np.zeros_like(cam)
        if cam.shape != (size, size):
            cam = cv2.resize(cam, (size, size), interpolation=cv2.INTER_LINEAR)
        out[i] = np.clip(cam, 0.0, 1.0)
    return out


# The Gaussian that smooths an upsampled map, in cells of the feature map (32 px at 224 for layer4). A fifth
# of a cell is the narrowest that makes the levels of a one-cell peak round (within 3 % along the diagonal;
# bilinear alone: 18 % short); wider spreads the heat beyond the tumour (benchmarks/heatmap_smoothing.py).
SMOOTH_SIGMA_CELLS = 0.2


def layer_stride(name: str | None) -> int:
    """Input pixels per feature-map cell of a ResNet layer ("layer4" and its blocks: 32; layer1: 4)."""
    stage = int((name or DEFAULT_LAYER)[len("layer")])
    return 2 ** (stage + 1)


def smooth_heatmaps(maps: np.ndarray, cell: float, sigma_cells: float = SMOOTH_SIGMA_CELLS) -> np.ndarray:
    """Maps ``(N, S, S)`` in [0, 1], upsampled from cells of ``cell`` pixels, blurred with a Gaussian of
    ``sigma_cells`` cells and min-max normalised again (a flat map stays flat). ``sigma_cells`` 0: as given."""
    if sigma_cells <= 0:
        return maps
    out = np.empty_like(maps, dtype=np.float32)
    for i, m in enumerate(maps.astype(np.float32)):
        m = cv2.GaussianBlur(m, (0, 0), sigmaX=sigma_cells * cell, borderType=cv2.BORDER_REPLICATE)
        lo, hi = float(m.min()), float(m.max())
        out[i] = (m - lo) / (hi - lo) if hi - lo > 1e-6 else np.zeros_like(m)
    return out


def drawn_heatmaps(cams: np.ndarray, size: int, smooth: float = SMOOTH_SIGMA_CELLS) -> np.ndarray:
    """Low-resolution class activation maps ``(N, h, w)`` -> the heatmaps the app draws ``(N, size, size)``:
    upsampled and normalised (:func:`normalize_cams`), then smoothed over cells of ``size / w`` pixels."""
    return smooth_heatmaps(normalize_cams(cams, size), size / cams.shape[-1], smooth)


def _activations(model: nn.Module, x: torch.Tensor, layer: str | None) -> torch.Tensor:
    """The output of ``layer`` (a ResNet stage or block) by running the stem and stages up to it: no hooks."""
    target = resolve_layer(model, layer)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for i in range(1, 5):
        for block in getattr(model, f"layer{i}"):
            x = block(x)
            if block is target:
                return x
    raise ValueError(f"layer {layer!r} is not a block of this model")  # resolve_layer accepted it, so unreachable


def scorecam(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None = None,
    channels: int | None = SCORECAM_CHANNELS,
    budget_s: float | None = SCORECAM_BUDGET_S,
    batch_size: int = SCORECAM_BATCH,
) -> np.ndarray:
    """Score-CAM (Wang et al. 2020) as pytorch-grad-cam computes it, on the ``channels`` most active channels.

    Each channel's map, upsampled and min-max scaled, masks the input; the target logit of the masked
    input scores the channel, and the heatmap is the channels' maps weighted by the softmax of their
    scores. ``channels=None`` scores every channel (the library's numbers); a channel left out of the
    top ``channels`` by mean activation gets weight 0. Hook-free and read-only on ``model``, so it needs
    no lock. Raises :class:`ExplanationTimeout` when it runs past ``budget_s`` seconds.
    """
    start = time.monotonic()
    size = x.shape[-2:]
    cams = []
    with torch.inference_mode():
        acts = _activations(model, x, layer)
        for xi, act, t in zip(x, acts, targets.tolist(), strict=True):
            keep = act.mean(dim=(1, 2)).argsort(descending=True)[:channels] if channels else torch.arange(len(act))
            up = torch.nn.functional.interpolate(act[keep][None], size=size, mode="bilinear", align_corners=True)[0]
            lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
            masks = (up - lo) / (hi - lo + 1e-8)
            scores = []
            for i in range(0, len(masks), batch_size):
                if budget_s is not None and time.monotonic() - start > budget_s:
                    raise ExplanationTimeout(
                        f"scorecam stopped after {budget_s:.0f} s (it runs one forward pass per channel); "
                        "use gradcam or another method for this image"
                    )
                scores.append(model(xi[None] * masks[i : i + batch_size, None])[:, t])
            weights = torch.softmax(torch.cat(scores).float(), dim=0)
            cams.append(torch.einsum("k,khw->hw", weights, act[keep].float()))
    return normalize_cams(torch.stack(cams).clamp_min(0).numpy(), x.shape[-1])


def _hook_free_copy(model: nn.Module) -> nn.Module:
    # ScoreCAM takes no lock, so it must never run through a model that a locked method has hooked:
    # it gets a copy of its own, made under the lock (when no hooks are on ``model``) and kept.
    with _HOOK_LOCK:
        if model not in _HOOK_FREE_COPIES:
            _HOOK_FREE_COPIES[model] = copy.deepcopy(model).eval()
        return _HOOK_FREE_COPIES[model]


def _library_cams(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, method: str, layer: str | None
) -> np.ndarray:
    if method == "scorecam":
        return scorecam(_hook_free_copy(model), x, targets, layer)
    # Gradients are needed (except for EigenCAM/ScoreCAM), and an inference-mode tensor cannot enter
    # autograd: clone it into an ordinary tensor first.
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = x.detach().clone()
    target_module = resolve_layer(model, layer)
    with _HOOK_LOCK, torch.enable_grad():
        cam = getattr(pytorch_grad_cam, METHODS[method])(model=model, target_layers=[target_module])
        try:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        finally:
            cam.activations_and_grads.release()  # remove the hooks before anyone else runs the model
            model.zero_grad(set_to_none=True)
    # The library already normalised and resized; normalise again only to scrub NaNs and flat maps.
    return normalize_cams(maps, x.shape[-1])


def explain_batch(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    method: str = DEFAULT_METHOD,
    layer: str = DEFAULT_LAYER,
    smooth: float = SMOOTH_SIGMA_CELLS,
) -> np.ndarray:
    """Heatmaps ``(N, S, S)`` in [0, 1] for a preprocessed batch ``x`` ``(N, 1, S, S)`` and classes ``targets``.

    Grad-CAM on the last block takes the hook-free fast path; other methods and layers go through
    pytorch-grad-cam one call at a time (see the module docstring). ``smooth`` is the Gaussian's width in
    feature-map cells (:func:`smooth_heatmaps`); 0 gives the library's bilinear maps.
    """
    check_method(method)
    targets = torch.as_tensor(targets).long().reshape(-1)
    if len(targets) != len(x):
        raise ValueError(f"got {len(targets)} targets for {len(x)} images")
    if is_fast_path(model, method, layer):
        with torch.inference_mode():
            fmap, _ = features_and_logits(model, x)
            cams = class_activation_map(fmap, model.fc.weight, targets)
        return drawn_heatmaps(cams.float().cpu().numpy(), x.shape[-1], smooth)
    return smooth_heatmaps(_library_cams(model, x, targets, method, layer), layer_stride(layer), smooth)


DEFAULT_COLORMAP = "inferno"
DEFAULT_ALPHA = 0.6
# Heat below FLOOR is not drawn and reaches full opacity at FLOOR + RAMP: the cool rest of the map would
# otherwise wash the whole slice in colour. OUTLINE marks the hottest region, where the model looked most.
FLOOR, RAMP, OUTLINE = 0.2, 0.4, 0.6


def head_mask(gray: np.ndarray, threshold: float = 0.04) -> np.ndarray:
    """Boolean (H, W) mask of the head: tissue above ``threshold``, smoothed, holes filled, specks dropped.

    Like :func:`tumor_xai.augment.head_region` for training, at the image's own resolution: the black frame,
    burnt-in text and scanner labels stay outside, the dark CSF and skull inside the head stay in.
    """
    h, w = gray.shape
    k = max(3, round(15 * min(h, w) / 224)) | 1
    density = cv2.blur((gray > threshold).astype(np.float32), (k, k))
    tissue = (density > 0.3).astype(np.uint8)
    contours, _ = cv2.findContours(tissue, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    keep = [c for c in contours if cv2.contourArea(c) >= 0.02 * h * w]
    mask = np.zeros((h, w), np.uint8)
    cv2.drawContours(mask, keep, -1, 1, thickness=cv2.FILLED)
    return mask.astype(bool)


def overlay(
    gray: np.ndarray,
    heatmap: np.ndarray,
    colormap: str = DEFAULT_COLORMAP,
    alpha: float = DEFAULT_ALPHA,
    *,
    outline: bool = True,
) -> Image.Image:
    """Draw ``heatmap`` (H x W in [0, 1]) over the slice ``gray`` (H x W in [0, 1]) as an RGB image.

    Heat is drawn only inside the head and only where it is warm: its opacity rises from 0 at
    ``FLOOR`` to ``alpha`` at ``FLOOR + RAMP``, so the slice stays readable around the hot spot. With
    ``outline`` the hottest region (heat >= ``OUTLINE``) is circled in cyan, which no colour map here uses
    for heat. ``alpha`` 0 shows the slice only. A slice with no head found (an empty or odd image) gets
    the heat everywhere, so a heatmap is never silently hidden.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (heatmap opacity) must be in [0, 1], got {alpha}")
    if gray.shape != heatmap.shape:
        raise ValueError(f"heatmap shape {heatmap.shape} differs from the image's {gray.shape}")
    cmap = check_colormap(colormap)
    heat = np.clip(np.nan_to_num(heatmap.astype(np.float32)), 0.0, 1.0)
    head = head_mask(gray)
    if not head.any():
        head = np.ones_like(head)
    heat = np.where(head, heat, 0.0)
    color = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cmap)
    color = cv2.cvtColor(color, cv2.COLOR_BGR2RGB).astype(np.float32)  # OpenCV colormaps are BGR
    base = np.repeat(np.clip(gray, 0, 1)[..., None].astype(np.float32) * 255.0, 3, axis=2)
    a = (alpha * np.clip((heat - FLOOR) / RAMP, 0.0, 1.0))[..., None]
    out = np.round((1.0 - a) * base + a * color).astype(np.uint8)
    if outline and alpha > 0:
        hot = (heat >= OUTLINE).astype(np.uint8)
        contours, _ = cv2.findContours(hot, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        thickness = max(1, round(min(gray.shape) / 224))
        cv2.drawContours(out, contours, -1, (0, 255, 255), thickness=thickness, lineType=cv2.LINE_AA)
    return Image.fromarray(out)
