"""Batch augmentation on whatever device holds the data (GPU or CPU), one code path for both.

The training set lives on the device as uint8 squares; each batch is turned into floats in [0, 1]
and augmented here, so no image is decoded twice and the GPU never waits for a data loader.

Two recipes (:meth:`AugmentConfig.preset`): ``basic`` (the default: mild rotation, zoom, shift, flip,
brightness, contrast and gamma) and ``strong``, which adds what differs between scanners, sequences
and exports so that the model cannot tell the classes apart by acquisition: framing (crops, black
padding, aspect), tone curves, inversions inside the head (a T2-like contrast from a T1 slice),
smooth multiplicative bias fields, resolution loss, blur and noise. Every strength is a field of
:class:`AugmentConfig`; 0 switches that transform off. The random draws of a transform happen only
when it is on, so the basic recipe draws exactly the numbers it always drew.

Masks (tumour masks, head regions) go through the SAME random affine as their image
(:func:`augment_pair`), and :func:`erase_lesions` inpaints a masked lesion from its surroundings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F

__all__ = [
    "PRESETS",
    "AugmentConfig",
    "appearance",
    "augment",
    "augment_pair",
    "erase_lesions",
    "gaussian_blur",
    "geometric",
    "head_region",
    "histogram_match",
    "jpeg_roundtrip",
    "paste_lesions",
    "photometric",
    "random_affine",
]

# The strong intensity transforms each hit a random half of the batch, with a strength drawn
# uniformly up to the configured maximum, so clean-looking images stay in the training mix.
APPLY_PROBABILITY = 0.5
# Sizes of blur, dilation and head smoothing are given in pixels of a 224 px input and scaled.
REFERENCE_SIZE = 224


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; 0 switches a transform off."""

    rotate_deg: float = 15.0
    scale: float = 0.10  # zoom factor drawn from [1 - scale, 1 + scale]
    translate: float = 0.08  # fraction of the side
    hflip: float = 0.5  # probability
    brightness: float = 0.10  # additive shift drawn from [-b, b]
    contrast: float = 0.25  # factor drawn log-uniformly from [1/(1+c), 1+c], around the image mean
    gamma: float = 0.35  # exponent drawn log-uniformly from [1/(1+g), 1+g]
    # Framing (part of the same affine, so masks follow): zoom drawn log-uniformly from
    # [1/(1+f), 1+f] on top of ``scale`` (above 1 crops into the head, below 1 pads with black),
    # and an x/y stretch drawn log-uniformly from [1/(1+a), 1+a].
    frame: float = 0.0
    aspect: float = 0.0
    # Intensity (acquisition): see photometric().
    curve: float = 0.0  # tone curve: 3 inner control points moved by up to curve x their spacing
    invert: float = 0.0  # probability of inverting the intensities inside the head
    bias_field: float = 0.0  # max log-amplitude of a smooth multiplicative field
    resolution: float = 0.0  # down-then-up sampling by a factor drawn from [1, 1 + resolution]
    blur: float = 0.0  # max Gaussian sigma, px at 224
    noise: float = 0.0  # max std of additive Gaussian noise, intensity units
    # Across collections (see :func:`appearance`): the look of another slice, and another export.
    hist_match: float = 0.0  # probability of mapping the head's intensities onto another class's slice's
    jpeg: float = 0.0  # probability of a JPEG re-compression at a quality drawn from [30, 95]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def preset(cls, name: str) -> AugmentConfig:
        """The named recipe: ``basic`` (default), ``strong`` or ``none``."""
        if name not in PRESETS:
            raise ValueError(f"unknown augmentation recipe {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    def with_overrides(self, overrides: dict[str, float]) -> AugmentConfig:
        """A copy with some strengths changed; unknown names raise ``ValueError`` listing the valid ones."""
        valid = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s) {unknown}; valid: {', '.join(sorted(valid))}")
        bad = {k: v for k, v in overrides.items() if not (float(v) >= 0 and math.isfinite(float(v)))}
        if bad:
            raise ValueError(f"augmentation strengths must be finite and >= 0, got {bad}")
        return replace(self, **{k: float(v) for k, v in overrides.items()})


PRESETS: dict[str, AugmentConfig] = {
    "basic": AugmentConfig(),
    "strong": AugmentConfig(
        scale=0.10,
        translate=0.10,
        brightness=0.10,
        contrast=0.5,
        gamma=0.8,
        frame=0.25,
        aspect=0.10,
        curve=0.6,
        invert=0.2,
        bias_field=0.4,
        resolution=2.0,
        blur=1.5,
        noise=0.04,
    ),
    # The shipped recipe's acquisition part plus the look of other collections: another slice's
    # histogram, T2-like inversion, tone curves, JPEG re-export and resampling (resolution).
    "collections": AugmentConfig(
        resolution=3.0,
        noise=0.06,
        blur=1.0,
        curve=0.5,
        invert=0.15,
        hist_match=0.3,
        jpeg=0.3,
    ),
    "none": AugmentConfig(rotate_deg=0.0, scale=0.0, translate=0.0, hflip=0.0, brightness=0.0, contrast=0.0, gamma=0.0),
}


# --------------------------------------------------------------------------------------- random draws


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _log_uniform(n: int, spread: float, g: torch.Generator, device) -> torch.Tensor:
    r = math.log1p(spread)
    return torch.exp(_uniform(n, -r, r, g, device))


def _sometimes(n: int, maximum: float, g: torch.Generator, device) -> torch.Tensor:
    """Per-image strength: uniform in [0, maximum] for a random half of the batch, 0 for the rest."""
    strength = _uniform(n, 0.0, maximum, g, device)
    return strength * (torch.rand(n, generator=g, device=device) < APPLY_PROBABILITY)


def _px(pixels_at_224: float, size: int) -> float:
    return pixels_at_224 * size / REFERENCE_SIZE


# ------------------------------------------------------------------------------------------ geometry


def random_affine(n: int, cfg: AugmentConfig, g: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Random ``(n, 2, 3)`` affine matrices for ``F.affine_grid``: rotation, zoom, framing, shift, flip."""
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, g, device) * (math.pi / 180.0)
    zoom = _uniform(n, 1.0 - cfg.scale, 1.0 + cfg.scale, g, device)
    flip = torch.where(torch.rand(n, generator=g, device=device) < cfg.hflip, -1.0, 1.0)
    tx = _uniform(n, -cfg.translate, cfg.translate, g, device) * 2.0
    ty = _uniform(n, -cfg.translate, cfg.translate, g, device) * 2.0
    zx = zy = zoom
    if cfg.frame:
        zoom = zoom * _log_uniform(n, cfg.frame, g, device)
        zx = zy = zoom
    if cfg.aspect:
        stretch = _log_uniform(n, cfg.aspect, g, device)
        zx, zy = zoom * stretch, zoom / stretch
    cos, sin = torch.cos(angle), torch.sin(angle)
    # input coordinates = R @ diag(flip / zx, 1 / zy) @ output coordinates + t
    theta = torch.stack(
        [torch.stack([cos * flip / zx, -sin / zy, tx], 1), torch.stack([sin * flip / zx, cos / zy, ty], 1)], 1
    )
    return theta.to(dtype)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def geometric(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random rotation, zoom, framing, translation and horizontal flip of a batch ``(N, C, H, W)``."""
    return _warp(x, random_affine(x.shape[0], cfg, g, x.device, x.dtype))


# ------------------------------------------------------------------------------------------ intensity


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``(N, 1, H, W)`` with its own ``sigma`` (pixels, ``(N,)``; 0 leaves it as is)."""
    n, c, h, w = x.shape
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    d = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (d[None, :] / s) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, 2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.view(n, c, h, w)


def head_region(x: torch.Tensor, threshold: float = 0.04) -> torch.Tensor:
    """Soft head (foreground) region of ``(N, 1, H, W)`` images in [0, 1]: 1 inside, 0 in the black frame.

    Thresholding finds tissue; smoothing over ~15 px at 224 fills the dark CSF and skull inside the
    head and drops specks and text in the frame.
    """
    k = int(_px(15, x.shape[-1])) | 1
    # A box filter is separable: two 1-D passes cost 2k per pixel instead of k^2 (7x less at 224 px).
    density = F.avg_pool2d((x > threshold).to(x.dtype), (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=False)
    density = F.avg_pool2d(density, (1, k), stride=1, padding=(0, k // 2), count_include_pad=False)
    return ((density - 0.3) / 0.4).clamp(0.0, 1.0)


def _tone_curve(x: torch.Tensor, strength: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Monotone piecewise-linear curve per image through (0, 0), 3 jittered inner points and (1, 1)."""
    n, knots = x.shape[0], 5
    base = torch.linspace(0.0, 1.0, knots, device=x.device, dtype=x.dtype)
    jitter = (torch.rand(n, knots, generator=g, device=x.device) * 2 - 1).to(x.dtype) / (knots - 1)
    jitter[:, 0] = jitter[:, -1] = 0.0
    ys = (base[None] + jitter * strength[:, None].to(x.dtype)).clamp(0.0, 1.0).sort(dim=1).values
    flat = x.reshape(n, -1).clamp(0.0, 1.0) * (knots - 1)
    i = flat.floor().long().clamp(max=knots - 2)
    lo, hi = ys.gather(1, i), ys.gather(1, i + 1)
    return (lo + (flat - i) * (hi - lo)).view_as(x)


def _bias_field(x: torch.Tensor, strength: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Multiply by ``exp(strength * f)``, ``f`` a smooth random field (4 x 4 normals, bicubic)."""
    coarse = torch.randn(x.shape[0], 1, 4, 4, generator=g, device=x.device).to(x.dtype)
    field = F.interpolate(coarse, size=x.shape[-2:], mode="bicubic", align_corners=False)
    return x * torch.exp(strength.to(x.dtype).view(-1, 1, 1, 1) * field)


def _down_up(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Area-downsample by each image's factor (rounded to 0.25) and enlarge back bilinearly."""
    size = x.shape[-2:]
    steps = torch.round((factor - 1.0) * 4.0)
    out = x.clone()
    for step in steps.unique().tolist():  # a handful of factors per batch
        if step <= 0:
            continue
        sel = steps == step
        f = 1.0 + step / 4.0
        small = F.interpolate(x[sel], size=(max(1, round(size[0] / f)), max(1, round(size[1] / f))), mode="area")
        out[sel] = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    return out


def photometric(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Random intensity changes of a batch ``(N, 1, H, W)`` in [0, 1]; stays in [0, 1].

    Order: inversion inside the head, gamma, tone curve, contrast, brightness (the scanner's and the
    export's intensity mapping), bias field (coil sensitivity), resolution loss and blur (the point
    spread), noise.
    """
    n, dev = x.shape[0], x.device
    shape = (n, 1, 1, 1)
    if cfg.invert:
        flip = (torch.rand(n, generator=g, device=dev) < cfg.invert).view(shape)
        x = torch.where(flip, head_region(x) * (1.0 - x), x)
    if cfg.gamma:
        x = x.clamp_min(1e-6) ** _log_uniform(n, cfg.gamma, g, dev).view(shape)
    if cfg.curve:
        x = _tone_curve(x, _sometimes(n, cfg.curve, g, dev), g)
    if cfg.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _log_uniform(n, cfg.contrast, g, dev).view(shape) + mean
    if cfg.brightness:
        x = x + _uniform(n, -cfg.brightness, cfg.brightness, g, dev).view(shape)
    if cfg.bias_field:
        x = _bias_field(x.clamp(0.0, 1.0), _sometimes(n, cfg.bias_field, g, dev), g)
    if cfg.resolution:
        x = _down_up(x, 1.0 + _sometimes(n, cfg.resolution, g, dev))
    if cfg.blur:
        x = gaussian_blur(x, _sometimes(n, _px(cfg.blur, x.shape[-1]), g, dev))
    if cfg.noise:
        sigma = _sometimes(n, cfg.noise, g, dev).to(x.dtype).view(shape)
        x = x + sigma * torch.randn(x.shape, generator=g, device=dev, dtype=x.dtype)
    return x.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------ lesions


def _push_pull(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Fill where ``weights`` is 0 from the surroundings: pull averages down a pyramid, push them back up."""
    if min(values.shape[-2:]) <= 2 or values.shape[-1] % 2 or values.shape[-2] % 2:
        return (
            values.sum((2, 3), keepdim=True)
            / weights.sum((2, 3), keepdim=True).clamp_min(1e-6)
            * torch.ones_like(values)
        )
    coarse = _push_pull(F.avg_pool2d(values, 2), F.avg_pool2d(weights, 2))
    up = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
    fine = values / weights.clamp_min(1e-6)
    return weights * fine + (1.0 - weights) * up


def erase_lesions(x: torch.Tensor, masks: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Inpaint the masked lesion of each image of ``(N, 1, H, W)`` in [0, 1] from the tissue around it.

    The mask is dilated by 4 px at 224 (hand-drawn borders sit on the lesion's rim), filled by a
    push-pull pyramid (a smooth interpolation of the surrounding intensities, not black), given
    noise matching the image's own fine texture so the patch is not a smooth tell-tale, and
    feathered into the image.
    """
    r = max(1, round(_px(4, x.shape[-1])))
    region = F.max_pool2d(masks.to(x.dtype), 2 * r + 1, stride=1, padding=r).clamp(0.0, 1.0)
    keep = 1.0 - region
    fill = _push_pull(x * keep, keep)
    sigma1 = torch.full((x.shape[0],), _px(1.5, x.shape[-1]), device=x.device)
    detail = x - gaussian_blur(x, sigma1)
    inside = head_region(x) * keep
    texture = ((detail**2 * inside).sum((1, 2, 3)) / inside.sum((1, 2, 3)).clamp_min(1.0)).sqrt().view(-1, 1, 1, 1)
    fill = fill + texture * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    soft = gaussian_blur(region, sigma1)
    return (x * (1.0 - soft) + fill * soft).clamp(0.0, 1.0)


def _brain_mean(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return (x * where).sum((1, 2, 3)) / where.sum((1, 2, 3)).clamp_min(1.0)


def _translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Move each image of ``x`` by ``shift`` ``(N, 2)`` (dy, dx, in pixels); zeros come in at the edges."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * shift[:, 1].to(x.dtype) / w
    theta[:, 1, 2] = -2.0 * shift[:, 0].to(x.dtype) / h
    return _warp(x, theta)


def paste_lesions(
    hosts: torch.Tensor,
    donors: torch.Tensor,
    donor_masks: torch.Tensor,
    g: torch.Generator,
    tries: int = 8,
    inside: float = 0.97,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste each donor's expert-masked lesion into the brain of its host (all ``(N, 1, H, W)`` in [0, 1]).

    The lesion region is the mask dilated by 5 px at 224 and feathered (Gaussian, 2.5 px); its
    intensities are scaled so the donor brain's mean matches the host brain's (times a random 0.85-1.2);
    it goes where at least ``inside`` of it falls in the host's head (the first of ``tries`` random
    places that does). Every slice of no-tumour training data comes from one collection: pasting
    tumours into them takes away the shortcut "that collection's look means no tumour".

    Returns ``(images, lesion masks where they now are, pasted)`` with ``pasted`` bool ``(N,)``: a host
    with no place that fits keeps its image (and an empty mask).
    """
    n, _, h, w = hosts.shape
    dev, dt = hosts.device, hosts.dtype
    r = max(1, round(_px(5, w)))
    core = (donor_masks > 0.5).to(dt)
    region = F.max_pool2d(core, 2 * r + 1, stride=1, padding=r)
    alpha = gaussian_blur(region, torch.full((n,), _px(2.5, w), device=dev)).clamp(0.0, 1.0)
    host_head, donor_head = head_region(hosts) > 0.5, head_region(donors) > 0.5
    scale = _brain_mean(hosts, host_head.to(dt)) / _brain_mean(donors, (donor_head & (region < 0.5)).to(dt))
    scale = (scale * _uniform(n, 0.85, 1.2, g, dev)).clamp(0.2, 5.0).view(-1, 1, 1, 1)
    # Candidate places: the lesion's centre moved to random points of the central 70 % of the image.
    ys, xs = torch.arange(h, device=dev, dtype=dt), torch.arange(w, device=dev, dtype=dt)
    weight = core.sum((1, 2, 3)).clamp_min(1.0)
    centre = torch.stack([(core.sum(3)[:, 0] * ys).sum(1), (core.sum(2)[:, 0] * xs).sum(1)], 1) / weight[:, None]
    target = torch.stack(
        [_uniform(n * tries, 0.15 * h, 0.85 * h, g, dev), _uniform(n * tries, 0.15 * w, 0.85 * w, g, dev)], 1
    )
    shifts = (target.view(n, tries, 2) - centre[:, None]).round()
    moved = _translate(alpha.repeat_interleave(tries, 0), shifts.view(-1, 2)).view(n, tries, h, w)
    fits = (moved * host_head).sum((2, 3)) / moved.sum((2, 3)).clamp_min(1e-6) >= inside  # (n, tries)
    pasted = fits.any(1) & (core.sum((1, 2, 3)) > 0)
    first = fits.to(torch.int8).argmax(1)
    shift = shifts[torch.arange(n, device=dev), first]
    moved = _translate(torch.cat([(donors * scale).clamp(0.0, 1.0), alpha, core], 1), shift)
    lesion, a, mask = moved[:, :1], moved[:, 1:2], moved[:, 2:3]
    keep = pasted.view(-1, 1, 1, 1)
    images = torch.where(keep, hosts * (1.0 - a) + lesion * a, hosts)
    return images, torch.where(keep, mask.clamp(0.0, 1.0), torch.zeros_like(mask)), pasted


# ------------------------------------------------------------------------------------ other collections


def histogram_match(x: torch.Tensor, reference: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Map the intensities inside each head of ``x`` onto the distribution inside ``reference``'s head.

    Both ``(N, 1, H, W)`` in [0, 1]; a monotone lookup per image (quantile mapping over ``bins`` levels),
    so anatomy and lesion stay where they are and only the look of the other slice's sequence and
    export comes over. The black frame is left as it is.
    """
    n = x.shape[0]
    head_x, head_r = head_region(x), head_region(reference)

    def cdf(img: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        idx = (img.clamp(0.0, 1.0) * (bins - 1)).round().long().flatten(1)
        hist = torch.zeros(n, bins, device=img.device, dtype=img.dtype).scatter_add_(1, idx, weight.flatten(1))
        c = hist.cumsum(1)
        return c / c[:, -1:].clamp_min(1e-6)

    src, ref = cdf(x, head_x), cdf(reference, head_r)
    # Inverse of the reference CDF at each source quantile, interpolated between its levels.
    hi = torch.searchsorted(ref.contiguous(), src.contiguous()).clamp(1, bins - 1)
    c_lo, c_hi = ref.gather(1, hi - 1), ref.gather(1, hi)
    within = ((src - c_lo) / (c_hi - c_lo).clamp_min(1e-6)).clamp(0.0, 1.0)
    lut = (hi - 1 + within).to(x.dtype) / (bins - 1)  # (N, bins): source level -> reference level
    pos = x.clamp(0.0, 1.0).flatten(1) * (bins - 1)
    i0 = pos.floor().long().clamp(max=bins - 2)
    frac = pos - i0
    mapped = (lut.gather(1, i0) * (1 - frac) + lut.gather(1, i0 + 1) * frac).view_as(x)
    return head_x * mapped + (1.0 - head_x) * x


def jpeg_roundtrip(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG-encode and decode each image of ``(N, 1, H, W)`` in [0, 1] at its ``quality`` (on the CPU)."""
    from torchvision.io import decode_jpeg, encode_jpeg

    u8 = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()
    out = torch.stack(
        [decode_jpeg(encode_jpeg(img, quality=int(q))) for img, q in zip(u8, quality.tolist(), strict=True)]
    )
    return out.to(x.device).to(x.dtype).div_(255.0)


def _other_class(labels: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image, a random index of an image of another class in the batch, and whether one exists."""
    other = labels[:, None] != labels[None, :]
    score = torch.rand(other.shape, generator=g, device=labels.device) + other.to(torch.float32)
    return score.argmax(1), other.any(1)


def appearance(x: torch.Tensor, labels: torch.Tensor | None, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Histogram matching to a slice of ANOTHER class of the batch (so no class keeps its collection's look)."""
    if not cfg.hist_match or labels is None:
        return x
    n, dev = x.shape[0], x.device
    ref, exists = _other_class(labels, g)
    apply = exists & (torch.rand(n, generator=g, device=dev) < cfg.hist_match)
    if not apply.any():
        return x
    out = x.clone()
    out[apply] = histogram_match(x[apply], x[ref[apply]])
    return out


def export(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """The last step of an image's life before upload: a lossy JPEG re-compression for some of the batch."""
    if not cfg.jpeg:
        return x
    n, dev = x.shape[0], x.device
    apply = torch.rand(n, generator=g, device=dev) < cfg.jpeg
    quality = _uniform(n, 30.0, 95.0, g, dev).round()
    if not apply.any():
        return x
    out = x.clone()
    out[apply] = jpeg_roundtrip(x[apply], quality[apply])
    return out


# ------------------------------------------------------------------------------------------ batches


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def augment(
    images_u8: torch.Tensor, cfg: AugmentConfig, g: torch.Generator, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 (or [0, 1] float) batch ``(N, 1, S, S)`` -> augmented float batch in [0, 1] on the same device.

    ``labels`` lets histogram matching pick a reference slice of another class.
    """
    x = geometric(_as_float(images_u8), cfg, g)
    return export(photometric(appearance(x, labels, cfg, g), cfg, g), cfg, g)


def augment_pair(
    images_u8: torch.Tensor,
    masks: torch.Tensor,
    cfg: AugmentConfig,
    g: torch.Generator,
    erase: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images ``(N, 1, S, S)`` uint8 with their masks ``(N, C, S, S)`` (uint8 0-255 or float in [0, 1]).

    One random affine moves each image and all its mask channels together (bilinear, so the warped
    masks are soft, in [0, 1]). Images flagged in ``erase`` (bool ``(N,)``) get their lesion (mask
    channel 0) inpainted before the intensity changes, so the patch is augmented like the rest.
    Returns ``(images float in [0, 1], masks float in [0, 1])``.
    """
    x, m = _as_float(images_u8), _as_float(masks)
    theta = random_affine(x.shape[0], cfg, g, x.device, x.dtype)
    both = _warp(torch.cat([x, m], 1), theta)
    x, m = both[:, :1], both[:, 1:].clamp(0.0, 1.0)
    if erase is not None:
        x = torch.where(erase.view(-1, 1, 1, 1), erase_lesions(x, m[:, :1], g), x)
    return export(photometric(appearance(x, labels, cfg, g), cfg, g), cfg, g), m
