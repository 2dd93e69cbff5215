"""BYOL's two-view augmentation, batched, with per-sample random parameters, on any device.

Why hand-written: torchvision's v2 transforms draw one parameter set per call, so applied
to a batch every image gets the same crop, flip and jitter; the lightly/PIL route draws per
sample but runs in DataLoader workers on the CPU and leaves a GPU idle. Here every
parameter is drawn per sample from one `torch.Generator` on the images' device, and the
whole view is a handful of batched tensor ops (one `grid_sample` for crop + flip + resize,
elementwise colour ops, one grouped convolution pair for the blur): no Python loop over the
batch, no PIL, no workers, no `.item()` or other host synchronisation, so it runs on the GPU
next to the model step (and on the CPU, with the same definition, for tests and CPU runs).

Parameters are BYOL's (Grill et al. 2020, Appendix B, Table 6): random resized crop with
area scale in [0.08, 1] and aspect ratio in [3/4, 4/3], horizontal flip p=0.5, colour jitter
p=0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), grayscale p=0.2, Gaussian
blur p=1.0 / 0.1 (view 1 / view 2, sigma in [0.1, 2], kernel 10% of the side), solarize
p=0.0 / 0.2.

Order per view: crop + flip + resize -> colour jitter -> grayscale -> blur -> solarize.
Each op follows the definition of its torchvision counterpart (`RandomResizedCrop.get_params`,
`adjust_brightness/contrast/saturation/hue`, `rgb_to_grayscale`, `gaussian_blur`,
`solarize`), which tests/test_augment.py checks against torchvision sample by sample.

Randomness is split from the arithmetic: `sample_view_params` draws every random number
(two `torch.rand` calls per view), `apply_view` is a pure tensor function of the images and
those parameters (what byol and distill hand to `torch.compile` where they compile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AugmentConfig",
    "augment_view",
    "two_view_augment",
    "eval_view",
    "sample_crop_boxes",
    "sample_view_params",
    "crop_flip_resize",
    "apply_view",
    "blur_kernel_size",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "gaussian_blur",
    "solarize",
    "normalize",
]

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale (which writes 0.2989 for 0.299;
# the difference is < 1e-4 of a [0, 1] pixel).
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_CROP_TRIES = 10  # as torchvision's RandomResizedCrop.get_params


@dataclass
class AugmentConfig:
    """BYOL augmentation parameters (Grill et al. 2020, Table 6). Only float fields, so it
    nests in an OmegaConf structured config."""

    crop_scale_min: float = 0.08
    crop_scale_max: float = 1.0
    crop_ratio_min: float = 3 / 4
    crop_ratio_max: float = 4 / 3
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p1: float = 1.0  # BYOL's asymmetric views (Grill et al. 2020, Table 6)
    blur_p2: float = 0.1
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    blur_kernel_frac: float = 0.1  # kernel size ~ 10% of the output side, made odd, >= 3
    solarize_p1: float = 0.0
    solarize_p2: float = 0.2


def supervised_aug() -> AugmentConfig:
    """Fine-tuning views (prune's recovery, QAT, finetune): random resized crop (scale >= 0.5) and
    flip; BYOL's colour jitter, grayscale, blur and solarize off. One view a step."""
    return AugmentConfig(crop_scale_min=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p1=0.0, blur_p2=0.0,
                         solarize_p1=0.0, solarize_p2=0.0)


def one_view(images: Tensor, out_size: int, cfg: AugmentConfig, generator: torch.Generator, mean: Sequence[float],
             std: Sequence[float]) -> Tensor:
    """One normalised augmented view (view 1's blur/solarize probabilities), for the stages
    that train on a single view."""
    return normalize(augment_view(images, out_size, cfg, cfg.blur_p1, cfg.solarize_p1, generator), mean, std)


# --------------------------------------------------------------------------- random parameters


def _uniform(u: Tensor, low: float, high: float) -> Tensor:
    return u * (high - low) + low


def sample_crop_boxes(
    batch: int, height: int, width: int, cfg: AugmentConfig, generator: torch.Generator, device
) -> Tensor:
    """Random resized crop boxes, int64 [B, 4] = (top, left, h, w) in pixels.

    Same definition as torchvision's `RandomResizedCrop.get_params`, vectorised: per sample,
    up to 10 tries of (area fraction ~ U[scale_min, scale_max], aspect ratio w/h log-uniform
    in [ratio_min, ratio_max], w and h rounded); the first try that fits the image is kept,
    with top/left uniform over the valid positions; if none fits, the centre crop of the
    largest box with an in-range aspect ratio (torchvision's fallback). All tries are drawn
    at once, so the number of random draws is fixed and nothing waits on the device.
    """
    u = torch.rand(batch, 2 * _CROP_TRIES + 2, generator=generator, device=device)
    area = float(height * width)
    log_r0, log_r1 = math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max)
    target = area * _uniform(u[:, :_CROP_TRIES], cfg.crop_scale_min, cfg.crop_scale_max)
    ratio = torch.exp(_uniform(u[:, _CROP_TRIES : 2 * _CROP_TRIES], log_r0, log_r1))
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    tries = torch.arange(_CROP_TRIES, device=device).expand(batch, _CROP_TRIES)
    first = torch.where(fits, tries, _CROP_TRIES).amin(dim=1, keepdim=True)  # first fitting try
    found = first.squeeze(1) < _CROP_TRIES
    first = first.clamp(max=_CROP_TRIES - 1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # torchvision's fallback: centre crop, whole image unless its aspect is out of range.
    in_ratio = width / height
    ratio_lo, ratio_hi = min(cfg.crop_ratio_min, cfg.crop_ratio_max), max(cfg.crop_ratio_min, cfg.crop_ratio_max)
    if in_ratio < ratio_lo:
        fw, fh = width, int(round(width / ratio_lo))
    elif in_ratio > ratio_hi:
        fw, fh = int(round(height * ratio_hi)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, float(fw))
    h = torch.where(found, h, float(fh))
    # torch.randint(0, n + 1) equivalent: floor(u * (n + 1)), clamped against u * (n+1) == n+1.
    top = torch.minimum(torch.floor(u[:, -2] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, -1] * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fh) // 2))
    left = torch.where(found, left, float((width - fw) // 2))
    return torch.stack((top, left, h, w), dim=1).to(torch.int64)


def blur_kernel_size(out_size: int, cfg: AugmentConfig) -> int:
    """Gaussian kernel side: `blur_kernel_frac` of the output side, made odd, at least 3
    (23 at 224 px as in BYOL, 3 at 32 px)."""
    k = int(round(cfg.blur_kernel_frac * out_size))
    if k % 2 == 0:
        k += 1
    return max(k, 3)


def sample_view_params(
    batch: int,
    height: int,
    width: int,
    cfg: AugmentConfig,
    blur_p: float,
    solarize_p: float,
    generator: torch.Generator,
    device,
) -> Dict[str, Tensor]:
    """Every random number one view needs, per sample ([B] tensors, boxes [B, 4]).

    Samples that skip an op get its identity parameter (factor 1, hue shift 0, no flip), so
    `apply_view` needs no per-sample branching; the applies-masks are returned too.
    """
    boxes = sample_crop_boxes(batch, height, width, cfg, generator, device)
    u = torch.rand(batch, 10, generator=generator, device=device)
    jitter = u[:, 1] < cfg.jitter_p
    one = torch.ones((), device=device)

    def factor(v: Tensor, x: float) -> Tensor:  # torchvision ColorJitter: U[max(0, 1 - x), 1 + x]
        return torch.where(jitter, _uniform(v, max(0.0, 1.0 - x), 1.0 + x), one)

    blur = u[:, 7] < blur_p
    return {
        "boxes": boxes,
        "flip": u[:, 0] < cfg.flip_p,
        "jitter": jitter,
        "brightness": factor(u[:, 2], cfg.brightness),
        "contrast": factor(u[:, 3], cfg.contrast),
        "saturation": factor(u[:, 4], cfg.saturation),
        "hue": torch.where(jitter, _uniform(u[:, 5], -cfg.hue, cfg.hue), torch.zeros((), device=device)),
        "grayscale": u[:, 6] < cfg.grayscale_p,
        "blur": blur,
        "sigma": _uniform(u[:, 8], cfg.blur_sigma_min, cfg.blur_sigma_max),
        "solarize": u[:, 9] < solarize_p,
    }


# --------------------------------------------------------------------------- geometric


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got {tuple(images.shape)}")


def crop_flip_resize(images: Tensor, boxes: Tensor, flip: Tensor, out_size: int) -> Tensor:
    """Per-sample crop box + horizontal flip + bilinear resize to out_size, in one grid_sample.

    The sampling grid is the one `F.interpolate(crop, out_size, mode="bilinear",
    align_corners=False, antialias=False)` uses (half-pixel centres, clamped to the crop's
    edge pixels), mirrored for flipped samples; i.e. torchvision's `resized_crop` then
    `horizontal_flip`. Returns float32 in the input's scale.
    """
    x = images if images.is_floating_point() else images.to(torch.float32)
    _, _, height, width = x.shape
    b = boxes.to(torch.float32)
    top, left, h, w = b.unbind(1)
    # Output pixel centres in normalised [-1, 1] coordinates (align_corners=False).
    base = (torch.arange(out_size, device=x.device, dtype=torch.float32) * 2 + 1) / out_size - 1
    sx = torch.where(flip, -w, w) / width
    gx = sx[:, None] * base + ((2 * left + w) / width - 1)[:, None]  # [B, S]
    gy = (h / height)[:, None] * base + ((2 * top + h) / height - 1)[:, None]  # [B, S]
    # Clamp to the centres of the crop's edge pixels: resizing a crop never reads the
    # pixels just outside it (exactly torchvision's resized_crop).
    gx = torch.clamp(gx, ((2 * left + 1) / width - 1)[:, None], ((2 * (left + w) - 1) / width - 1)[:, None])
    gy = torch.clamp(gy, ((2 * top + 1) / height - 1)[:, None], ((2 * (top + h) - 1) / height - 1)[:, None])
    n = x.shape[0]
    grid = torch.stack(
        (gx[:, None, :].expand(n, out_size, out_size), gy[:, :, None].expand(n, out_size, out_size)),
        dim=-1,
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------- colour
# All take float [B, 3, H, W] in [0, 1] and per-sample parameters [B].


def _per_sample(v: Tensor) -> Tensor:
    return v.to(torch.float32).view(-1, 1, 1, 1)


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """ITU-R 601 luma, [B, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision adjust_brightness with a per-sample factor: clamp(f * x, 0, 1)."""
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def _blend(x: Tensor, y: Tensor, factor: Tensor) -> Tensor:
    # f * x + (1 - f) * y, clamped: torchvision's _blend with a per-sample ratio.
    return torch.lerp(y.expand_as(x), x, _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision adjust_contrast per sample: blend with the mean of the image's grayscale."""
    # mean of the grayscale image = the 601-weighted sum of the channel means (one pass less)
    cm = x.mean(dim=(2, 3))
    mean = cm[:, 0] * _GRAY_WEIGHTS[0] + cm[:, 1] * _GRAY_WEIGHTS[1] + cm[:, 2] * _GRAY_WEIGHTS[2]
    return _blend(x, mean.view(-1, 1, 1, 1), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision adjust_saturation per sample: blend with the per-pixel grayscale."""
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision adjust_hue per sample: RGB -> HSV, h <- (h + shift) mod 1, HSV -> RGB.

    Vectorised and table-free. With v = max, c = max - min (chroma, = v * s) and h in
    sixths, the inverse is channel_n = v - c * clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6h) mod 6 and n = 5, 3, 1 for R, G, B (the standard closed form, equal to
    torchvision's sector lookup). Grey pixels (c = 0) stay exactly as they are.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)
    is_r = maxc == r
    is_g = maxc == g
    # Sector offset and signed position within it, torchvision's tie order (r, then g, then b).
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    offset = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    h6 = offset + num / chroma.clamp_min(1e-12)  # chroma == 0 implies num == 0: h = 0, no NaN
    h6 = (h6 + 6.0 * _per_sample(shift).squeeze(1)).unsqueeze(1)
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h6, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int, apply: Tensor | None = None) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma, reflect padding (torchvision's
    gaussian_blur definition), as two grouped convolutions over the whole batch.
    Samples with apply == False get a unit impulse kernel, i.e. stay exactly unchanged."""
    n, c, height, width = x.shape
    half = kernel_size // 2
    t = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - half
    kern = torch.exp(-0.5 * (t / sigma.to(torch.float32)[:, None]) ** 2)
    kern = kern / kern.sum(dim=1, keepdim=True)  # [B, k]
    if apply is not None:
        kern = torch.where(apply[:, None], kern, (t == 0).to(kern.dtype))
    kern = kern.repeat_interleave(c, dim=0)  # [B*C, k], one kernel per (sample, channel)
    y = F.pad(x.reshape(1, n * c, height, width), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, 1, kernel_size), groups=n * c)  # along W
    y = F.conv2d(y, kern.view(n * c, 1, kernel_size, 1), groups=n * c)  # along H
    return y.view(n, c, height, width)


def solarize(x: Tensor, apply: Tensor, threshold: float = 0.5) -> Tensor:
    """torchvision solarize (x -> 1 - x where x >= threshold) for samples with apply."""
    return torch.where(apply.view(-1, 1, 1, 1) & (x >= threshold), 1.0 - x, x)


def _channel_constant(values: Sequence[float], like: Tensor) -> Tensor:
    # Built with fill kernels on the device: no host-to-device copy, so no sync.
    return torch.stack([torch.full((), float(v), device=like.device, dtype=like.dtype) for v in values]).view(
        1, -1, 1, 1
    )


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel, for float [B, C, H, W]."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"mean/std need {x.shape[1]} values, got {len(mean)}/{len(std)}")
    scale = _channel_constant([1.0 / float(s) for s in std], x)
    shift = _channel_constant([-float(m) / float(s) for m, s in zip(mean, std)], x)
    return torch.addcmul(shift, x, scale)


# --------------------------------------------------------------------------- views


def apply_view(
    images: Tensor,
    params: Dict[str, Tensor],
    out_size: int,
    cfg: AugmentConfig,
    blur_p: float = 1.0,
    solarize_p: float = 1.0,
) -> Tensor:
    """One view from drawn parameters: float32 [B, 3, out_size, out_size] in [0, 1].

    Pure tensor code (no random draws, no host syncs). `blur_p` / `solarize_p` only switch
    an op off statically when it is 0 (no sample can get it); who gets it is in `params`.
    """
    _check_images(images)
    x = crop_flip_resize(images, params["boxes"], params["flip"], out_size)
    if not images.is_floating_point():
        x = x * (1.0 / 255.0)
    if x.shape[1] == 1:  # grayscale input: repeat to 3 channels (after the resize: cheaper)
        x = x.expand(-1, 3, -1, -1).contiguous()
    # Colour jitter in BYOL's fixed order (brightness, contrast, saturation, hue), as in the
    # paper's reference code; torchvision's ColorJitter shuffles the order per call.
    if cfg.jitter_p > 0:
        if cfg.brightness > 0:
            x = adjust_brightness(x, params["brightness"])
        if cfg.contrast > 0:
            x = adjust_contrast(x, params["contrast"])
        if cfg.saturation > 0:
            x = adjust_saturation(x, params["saturation"])
        if cfg.hue > 0:
            # The RGB->HSV->RGB round trip is exact only to ~1e-7: keep un-jittered samples as is.
            x = torch.where(params["jitter"].view(-1, 1, 1, 1), adjust_hue(x, params["hue"]), x)
    if cfg.grayscale_p > 0:
        x = torch.where(params["grayscale"].view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
    if blur_p > 0:
        x = gaussian_blur(x, params["sigma"], blur_kernel_size(out_size, cfg), params["blur"])
    if solarize_p > 0:
        x = solarize(x, params["solarize"])
    # Interpolation and blur weights sum to 1 only up to rounding: keep [0, 1] exact.
    return x.clamp_(0.0, 1.0)


def augment_view(
    images: Tensor,
    out_size: int,
    cfg: AugmentConfig,
    blur_p: float,
    solarize_p: float,
    generator: torch.Generator,
    apply=apply_view,
) -> Tensor:
    """One BYOL view of a batch, every parameter drawn per sample from `generator`.

    images: uint8 [B, 1 or 3, H, W] on any device (1 channel is repeated to 3; a float input
    is taken as already in [0, 1]); generator on the same device. Returns float32
    [B, 3, out_size, out_size] in [0, 1], not normalised. `apply`: apply_view, or a compiled
    apply_view (engine.maybe_compile: the training loops compile it on CUDA).
    """
    n, _, height, width = images.shape
    params = sample_view_params(n, height, width, cfg, blur_p, solarize_p, generator, images.device)
    return apply(images, params, out_size, cfg, blur_p, solarize_p)


def two_view_augment(
    images: Tensor,
    out_size: int,
    cfg: AugmentConfig,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
    apply=apply_view,
) -> Tuple[Tensor, Tensor]:
    """BYOL's two asymmetric views (view 1: blur_p1 / solarize_p1, view 2: blur_p2 /
    solarize_p2), each normalised with mean/std. Float32 [B, 3, out_size, out_size] each."""
    v1 = augment_view(images, out_size, cfg, cfg.blur_p1, cfg.solarize_p1, generator, apply)
    v2 = augment_view(images, out_size, cfg, cfg.blur_p2, cfg.solarize_p2, generator, apply)
    return normalize(v1, mean, std), normalize(v2, mean, std)


def eval_view(images: Tensor, out_size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Deterministic view for features and probes: whole image resized to out_size
    (bilinear, align_corners=False, no antialias), scaled to [0, 1], normalised."""
    _check_images(images)
    x = images.to(torch.float32)
    if x.shape[-2:] != (out_size, out_size):
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=False)
    if not images.is_floating_point():
        x = x * (1.0 / 255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return normalize(x, mean, std)
