"""core.augment against its definition: parameter ranges and distributions, per-sample
independence, determinism under a seed, and each op against torchvision's definition."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from core.augment import (
    AugmentConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_view,
    augment_view,
    blur_kernel_size,
    crop_flip_resize,
    eval_view,
    gaussian_blur,
    normalize,
    rgb_to_grayscale,
    sample_crop_boxes,
    sample_view_params,
    two_view_augment,
)

GRAY = (0.299, 0.587, 0.114)

# Everything off but what a test turns on; the crop is the whole image (scale 1, ratio 1).
PLAIN = AugmentConfig(
    crop_scale_min=1.0,
    crop_scale_max=1.0,
    crop_ratio_min=1.0,
    crop_ratio_max=1.0,
    flip_p=0.5,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p1=0.0,
    blur_p2=0.0,
    solarize_p1=0.0,
    solarize_p2=0.0,
)


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def rand_u8(*shape: int, seed: int = 0, low: int = 0, high: int = 256) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen(seed), dtype=torch.uint8)


def mirror_symmetric(x: torch.Tensor) -> torch.Tensor:
    """[..., W] -> [..., 2W], equal to its own horizontal flip (so a flip changes nothing)."""
    return torch.cat([x, x.flip(-1)], dim=-1)


def binomial_ok(count: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


# --------------------------------------------------------------------------- crop boxes


def _reference_get_params(u: torch.Tensor, height: int, width: int, cfg: AugmentConfig):
    """torchvision's RandomResizedCrop.get_params, literally, fed one sample's uniforms."""
    tries = 10
    area = height * width
    log_ratio = (math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max))
    for t in range(tries):
        target_area = area * (cfg.crop_scale_min + (cfg.crop_scale_max - cfg.crop_scale_min) * u[t])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[tries + t])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = min(int(u[2 * tries] * (height - h + 1)), height - h)
            j = min(int(u[2 * tries + 1] * (width - w + 1)), width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(cfg.crop_ratio_min, cfg.crop_ratio_max):
        w = width
        h = int(round(w / min(cfg.crop_ratio_min, cfg.crop_ratio_max)))
    elif in_ratio > max(cfg.crop_ratio_min, cfg.crop_ratio_max):
        h = height
        w = int(round(h * max(cfg.crop_ratio_min, cfg.crop_ratio_max)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width", [(32, 32), (64, 96), (96, 64)])
def test_crop_boxes_ranges_and_spread(height, width):
    cfg = AugmentConfig()
    n = 20_000
    boxes = sample_crop_boxes(n, height, width, cfg, gen(1), "cpu")
    assert boxes.shape == (n, 4) and boxes.dtype == torch.int64
    top, left, h, w = boxes.double().unbind(1)
    # Inside the image, non-empty.
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()

    # torchvision's fallback (centre crop, aspect clipped into range) is the only box allowed
    # outside the sampled ranges, and with 10 tries it is rare.
    in_ratio = width / height
    if in_ratio > cfg.crop_ratio_max:
        fh, fw = height, int(round(height * cfg.crop_ratio_max))
    elif in_ratio < cfg.crop_ratio_min:
        fh, fw = int(round(width / cfg.crop_ratio_min)), width
    else:
        fh, fw = height, width
    fallback = (h == fh) & (w == fw) & (top == (height - fh) // 2) & (left == (width - fw) // 2)
    assert fallback.float().mean() < 0.01
    s, hh, ww = ~fallback, h[~fallback], w[~fallback]
    # w, h are rounded from sqrt(A r), sqrt(A / r): each within 0.5 of its real value.
    area = height * width
    assert ((ww - 0.5) * (hh - 0.5) <= cfg.crop_scale_max * area + 1e-6).all()
    assert ((ww + 0.5) * (hh + 0.5) >= cfg.crop_scale_min * area - 1e-6).all()
    assert ((ww - 0.5) / (hh + 0.5) <= cfg.crop_ratio_max + 1e-9).all()
    assert ((ww + 0.5) / (hh - 0.5) >= cfg.crop_ratio_min - 1e-9).all()
    assert s.sum() > 0.99 * n

    # The ranges are spanned: area fraction and log aspect reach both ends.
    frac = (hh * ww) / area
    # (largest in-range box: full area unless the image's own aspect is out of range)
    largest = min(width, height * cfg.crop_ratio_max) * min(height, width / cfg.crop_ratio_min) / area
    assert frac.min() < cfg.crop_scale_min + 0.03 and frac.max() > 0.95 * min(1.0, largest)
    log_r = torch.log(ww / hh)
    lo, hi = math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max)
    span = hi - lo
    assert log_r.min() < lo + 0.1 * span and log_r.max() > hi - 0.1 * span

    # Position uniform over the valid range: mean of top / (H - h) near 1/2.
    room = height - hh
    pos = (top[s][room > 0] / room[room > 0]).mean()
    assert abs(pos.item() - 0.5) < 0.02


def test_crop_boxes_match_torchvision_get_params_sample_by_sample():
    """Same uniforms in, same boxes out as torchvision's get_params loop (first fitting try,
    position, fallback). Layout of the draws: 10 scales, 10 log ratios, top, left."""
    cfg = AugmentConfig()
    n, height, width = 400, 40, 56
    boxes = sample_crop_boxes(n, height, width, cfg, gen(7), "cpu")
    u = torch.rand(n, 22, generator=gen(7)).double().tolist()
    ref = torch.tensor([_reference_get_params(row, height, width, cfg) for row in u])
    mismatch = (boxes != ref).any(dim=1)
    assert mismatch.sum() <= 1  # float32 vs float64 rounding ties, practically never


def test_crop_boxes_distribution_agrees_with_torchvision():
    from torchvision.transforms import RandomResizedCrop

    cfg = AugmentConfig()
    height, width = 32, 32
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    ref = torch.tensor(
        [RandomResizedCrop.get_params(img, [cfg.crop_scale_min, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)]
    ).double()
    ours = sample_crop_boxes(3000, height, width, cfg, gen(3), "cpu").double()
    for stat in (lambda b: b[:, 2] * b[:, 3] / (height * width), lambda b: torch.log(b[:, 3] / b[:, 2])):
        a, b = stat(ours), stat(ref)
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 5 * se


def test_crop_fallback_when_no_try_fits():
    # Ratio range [2, 3] on a square at full area never fits: centre crop, w = W, h = W / 2.
    cfg = replace(AugmentConfig(), crop_scale_min=1.0, crop_scale_max=1.0, crop_ratio_min=2.0, crop_ratio_max=3.0)
    boxes = sample_crop_boxes(50, 32, 32, cfg, gen(0), "cpu")
    assert (boxes == torch.tensor([8, 0, 16, 32])).all()


def test_crop_flip_resize_matches_torchvision_resized_crop():
    x = rand_u8(6, 3, 24, 40, seed=2).float()
    # (top, left, h, w): whole image, up- and down-sampling, touching each edge, 1 pixel
    boxes = torch.tensor(
        [[0, 0, 24, 40], [3, 5, 10, 12], [10, 20, 14, 20], [0, 30, 5, 10], [7, 1, 17, 3], [2, 2, 1, 1]]
    )
    for flip in (False, True):
        flips = torch.full((6,), flip)
        out = crop_flip_resize(x, boxes, flips, 16)
        for i, (t, l, h, w) in enumerate(boxes.tolist()):
            ref = TF.resized_crop(x[i], t, l, h, w, [16, 16], antialias=False)
            if flip:
                ref = ref.flip(-1)
            torch.testing.assert_close(out[i], ref, atol=1e-3, rtol=0)  # 0-255 scale


# --------------------------------------------------------------------------- crop + flip, planted


@pytest.mark.parametrize("out_size", [32, 16, 48])
def test_whole_image_crop_is_resize_or_its_mirror(out_size):
    n = 4000 if out_size == 32 else 200
    x = rand_u8(1, 3, 32, 32, seed=5).expand(n, -1, -1, -1)
    out = augment_view(x, out_size, PLAIN, 0.0, 0.0, gen(11))
    ref = F.interpolate(x[:1].float() / 255, size=(out_size, out_size), mode="bilinear", align_corners=False)
    same = (out - ref).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - ref.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same ^ mirrored).all()  # each sample is exactly one of the two
    assert binomial_ok(int(mirrored.sum()), n, 0.5)


def test_flip_probability_is_used():
    n = 4000
    x = rand_u8(1, 3, 16, 16, seed=5).expand(n, -1, -1, -1)
    out = augment_view(x, 16, replace(PLAIN, flip_p=0.2), 0.0, 0.0, gen(12))
    mirrored = (out - x[:1].float().div(255).flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert binomial_ok(int(mirrored.sum()), n, 0.2)


# --------------------------------------------------------------------------- independence, seeds


def test_per_sample_independence_same_image_repeated():
    n = 4000
    x = rand_u8(1, 3, 32, 32, seed=6).expand(n, -1, -1, -1)
    # Flip decisions of neighbours are uncorrelated.
    out = augment_view(x, 32, PLAIN, 0.0, 0.0, gen(13))
    flip = ((out - x[:1].float().div(255).flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5).double()
    a, b = flip[:-1] - flip[:-1].mean(), flip[1:] - flip[1:].mean()
    corr = (a * b).mean() / (a.std() * b.std())
    assert abs(corr) < 4 / math.sqrt(n)
    # With the full augmentation every view of the same image is different ...
    views = augment_view(x[:256], 32, AugmentConfig(), 1.0, 0.2, gen(14)).flatten(1)
    dist = torch.cdist(views, views)
    dist.fill_diagonal_(float("inf"))
    assert dist.min() > 1e-3
    # ... and per-sample statistics (here the mean) are uncorrelated between neighbours.
    m = views.mean(1).double()
    a, b = m[:-1] - m[:-1].mean(), m[1:] - m[1:].mean()
    assert abs((a * b).mean() / (a.std() * b.std())) < 4 / math.sqrt(len(m))


def test_parameters_are_per_sample_with_right_ranges_and_rates():
    cfg = AugmentConfig()
    n = 20_000
    p = sample_view_params(n, 32, 32, cfg, 0.3, 0.2, gen(4), "cpu")
    assert binomial_ok(int(p["flip"].sum()), n, cfg.flip_p)
    assert binomial_ok(int(p["jitter"].sum()), n, cfg.jitter_p)
    assert binomial_ok(int(p["grayscale"].sum()), n, cfg.grayscale_p)
    assert binomial_ok(int(p["blur"].sum()), n, 0.3)
    assert binomial_ok(int(p["solarize"].sum()), n, 0.2)
    j = p["jitter"]
    for name, lo, hi in [
        ("brightness", 0.6, 1.4),
        ("contrast", 0.6, 1.4),
        ("saturation", 0.8, 1.2),
        ("hue", -0.1, 0.1),
    ]:
        v = p[name]
        ident = 0.0 if name == "hue" else 1.0
        assert (v[~j] == ident).all(), name  # not jittered: identity
        assert v[j].min() >= lo and v[j].max() <= hi, name
        assert v[j].min() < lo + 0.01 * (hi - lo) and v[j].max() > hi - 0.01 * (hi - lo), name
    # The four jitter factors are drawn independently of each other.
    f = torch.stack([p[k][j] for k in ("brightness", "contrast", "saturation", "hue")]).double()
    c = torch.corrcoef(f)
    assert (c - torch.eye(4, dtype=c.dtype)).abs().max() < 4 / math.sqrt(int(j.sum()))
    s = p["sigma"]
    assert s.min() >= cfg.blur_sigma_min and s.max() <= cfg.blur_sigma_max
    assert s.min() < 0.12 and s.max() > 1.98


def test_same_seed_same_views_different_seed_different():
    x = rand_u8(64, 3, 32, 32, seed=8)
    cfg = AugmentConfig()
    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    a1, a2 = two_view_augment(x, 32, cfg, gen(21), *stats)
    b1, b2 = two_view_augment(x, 32, cfg, gen(21), *stats)
    c1, c2 = two_view_augment(x, 32, cfg, gen(22), *stats)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1) and not torch.equal(a2, c2)
    # Draws advance the generator: consecutive calls on one generator differ.
    g = gen(21)
    assert not torch.equal(augment_view(x, 32, cfg, 1.0, 0.0, g), augment_view(x, 32, cfg, 1.0, 0.0, g))


# --------------------------------------------------------------------------- output contract


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape,out_size", [((32, 32), 32), ((40, 24), 16), ((20, 28), 36)])
def test_outputs_in_range_finite_float32(channels, shape, out_size):
    imgs = [
        rand_u8(48, channels, *shape, seed=9),
        torch.zeros(8, channels, *shape, dtype=torch.uint8),
        torch.full((8, channels, *shape), 255, dtype=torch.uint8),
    ]
    for x in imgs:
        for blur_p, sol_p in [(1.0, 0.0), (0.1, 0.2), (1.0, 1.0)]:
            out = augment_view(x, out_size, AugmentConfig(), blur_p, sol_p, gen(10))
            assert out.dtype == torch.float32
            assert out.shape == (x.shape[0], 3, out_size, out_size)
            assert torch.isfinite(out).all()
            assert out.min() >= 0.0 and out.max() <= 1.0
            if channels == 1:  # a gray image stays gray through every op
                assert (out[:, 0] == out[:, 1]).all() and (out[:, 1] == out[:, 2]).all()


# --------------------------------------------------------------------------- colour ops


def _solo(**kw) -> AugmentConfig:
    off = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    return replace(PLAIN, **{**off, **kw})


def test_brightness_alone_is_clamped_per_sample_scaling():
    n = 2000
    # Top half dark (unclamped for any factor <= 1.4), bottom half bright (clamps); mirror
    # symmetric, so the random flip changes nothing.
    dark = rand_u8(1, 3, 8, 8, seed=15, high=128)
    bright = rand_u8(1, 3, 8, 8, seed=16, low=128)
    x = mirror_symmetric(torch.cat([dark, bright], dim=2)).expand(n, -1, -1, -1)  # [n, 3, 16, 16]
    cfg = _solo(jitter_p=1.0, brightness=0.4)
    out = augment_view(x, 16, cfg, 0.0, 0.0, gen(17))
    xf = x.float() / 255
    f = out[:, :, :8].sum(dim=(1, 2, 3)) / xf[:, :, :8].sum(dim=(1, 2, 3))  # from the dark half
    assert f.min() >= 0.6 - 1e-5 and f.max() <= 1.4 + 1e-5
    assert f.min() < 0.62 and f.max() > 1.38
    torch.testing.assert_close(out, (xf * f.view(-1, 1, 1, 1)).clamp(0, 1), atol=1e-5, rtol=0)
    assert out[:, :, 8:].max() == 1.0  # the bright half did clamp for large factors
    # jitter_p is the probability a sample is jittered at all.
    out = augment_view(x, 16, replace(cfg, jitter_p=0.3), 0.0, 0.0, gen(18))
    changed = (out - xf).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert binomial_ok(int(changed.sum()), n, 0.3)


def test_grayscale_p1_gives_equal_channels_of_601_luma():
    x = mirror_symmetric(rand_u8(32, 3, 16, 8, seed=19))
    out = augment_view(x, 16, _solo(grayscale_p=1.0), 0.0, 0.0, gen(20))
    xf = x.float() / 255
    luma = GRAY[0] * xf[:, 0] + GRAY[1] * xf[:, 1] + GRAY[2] * xf[:, 2]
    for c in range(3):
        torch.testing.assert_close(out[:, c], luma, atol=1e-6, rtol=0)
    # p = 0.2: that fraction of samples is gray.
    n = 3000
    out = augment_view(x[:1].expand(n, -1, -1, -1), 16, _solo(grayscale_p=0.2), 0.0, 0.0, gen(21))
    gray = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    assert binomial_ok(int(gray.sum()), n, 0.2)


def test_solarize_p1_inverts_pixels_at_or_above_half():
    x = mirror_symmetric(rand_u8(16, 3, 16, 8, seed=22))
    out = augment_view(x, 16, PLAIN, 0.0, 1.0, gen(23))
    xf = x.float() * (1 / 255)
    torch.testing.assert_close(out, torch.where(xf >= 0.5, 1 - xf, xf), atol=1e-6, rtol=0)
    assert out.max() < 0.5 + 1e-6
    n = 3000
    out = augment_view(x[:1].expand(n, -1, -1, -1), 16, PLAIN, 0.0, 0.2, gen(24))
    solarized = (out - xf[:1]).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert binomial_ok(int(solarized.sum()), n, 0.2)


def test_blur_keeps_constants_and_smooths_noise():
    const = torch.full((16, 3, 32, 32), 77, dtype=torch.uint8)
    out = augment_view(const, 32, PLAIN, 1.0, 0.0, gen(25))
    torch.testing.assert_close(out, torch.full_like(out, 77 / 255), atol=1e-6, rtol=0)

    noise = rand_u8(256, 3, 32, 32, seed=26)
    out = augment_view(noise, 32, PLAIN, 1.0, 0.0, gen(27))
    var_in = (noise.float() / 255).var(dim=(1, 2, 3))
    var_out = out.var(dim=(1, 2, 3))
    assert (var_out <= var_in * (1 + 1e-5)).all()
    assert var_out.mean() < 0.6 * var_in.mean()
    # The variance drops monotonically with sigma (per-sample sigma is really used).
    xf = noise[:8].float() / 255
    sig = torch.tensor([0.1, 0.3, 0.5, 0.8, 1.0, 1.4, 1.7, 2.0])
    v = gaussian_blur(xf[:1].expand(8, -1, -1, -1), sig, 5).var(dim=(1, 2, 3))
    assert (v[1:] < v[:-1]).all()
    # blur_p = 0.5: about half the samples are blurred, the rest untouched.
    n = 2000
    out = augment_view(noise[:1].expand(n, -1, -1, -1), 32, PLAIN, 0.5, 0.0, gen(28))
    blurred = out.var(dim=(1, 2, 3)) < var_in[0] * 0.999
    assert binomial_ok(int(blurred.sum()), n, 0.5)


@pytest.mark.parametrize("kernel_size,size", [(3, 32), (9, 32), (23, 48)])
def test_blur_matches_torchvision(kernel_size, size):
    x = torch.rand(4, 3, size, size, generator=gen(29))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = gaussian_blur(x, sigma, kernel_size)
    for i in range(4):
        ref = TF.gaussian_blur(x[i], [kernel_size, kernel_size], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    # apply=False leaves a sample exactly unchanged.
    out = gaussian_blur(x, sigma, kernel_size, apply=torch.tensor([True, False, True, False]))
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])


def test_blur_kernel_size_rule():
    cfg = AugmentConfig()
    assert blur_kernel_size(224, cfg) == 23  # BYOL's 23x23 at 224 px
    assert blur_kernel_size(32, cfg) == 3
    assert blur_kernel_size(96, cfg) == 11
    assert blur_kernel_size(8, cfg) == 3
    assert all(blur_kernel_size(s, cfg) % 2 == 1 for s in range(8, 300))


def _test_images() -> torch.Tensor:
    # Quantised like real uint8 images (so channel ties, grays, 0s and 1s occur) plus noise.
    q = rand_u8(6, 3, 12, 12, seed=30).float() / 255
    coarse = (rand_u8(4, 3, 12, 12, seed=31) // 64 * 85).float() / 255
    return torch.cat([q, coarse, torch.rand(2, 3, 12, 12, generator=gen(32))])


def test_brightness_matches_torchvision():
    x = _test_images()
    f = torch.linspace(0.6, 1.4, len(x))
    out = adjust_brightness(x, f)
    for i in range(len(x)):
        torch.testing.assert_close(out[i], TF.adjust_brightness(x[i], f[i].item()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["contrast", "saturation"])
def test_contrast_saturation_match_torchvision(name):
    ours, theirs = {
        "contrast": (adjust_contrast, TF.adjust_contrast),
        "saturation": (adjust_saturation, TF.adjust_saturation),
    }[name]
    x = _test_images()
    f = torch.linspace(0.6, 1.4, len(x))
    out = ours(x, f)
    assert out.min() >= 0 and out.max() <= 1
    for i in range(len(x)):
        torch.testing.assert_close(out[i], theirs(x[i], f[i].item()), atol=1e-4, rtol=0)


def test_hue_matches_torchvision_and_zero_is_identity():
    x = _test_images()
    shift = torch.linspace(-0.5, 0.5, len(x))
    out = adjust_hue(x, shift)
    for i in range(len(x)):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], shift[i].item()), atol=1e-4, rtol=0)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(len(x))), x, atol=1e-5, rtol=0)
    assert torch.isfinite(adjust_hue(torch.zeros(2, 3, 4, 4), torch.tensor([0.1, -0.1]))).all()
    # A hue shift keeps value (max channel) and the gray level of gray pixels.
    torch.testing.assert_close(out.amax(1), x.amax(1), atol=1e-5, rtol=0)


def test_grayscale_helper_is_601_luma_like_torchvision():
    x = _test_images()
    luma = GRAY[0] * x[:, 0] + GRAY[1] * x[:, 1] + GRAY[2] * x[:, 2]
    torch.testing.assert_close(rgb_to_grayscale(x)[:, 0], luma, atol=1e-6, rtol=0)
    # torchvision writes 0.2989 for 0.299: at most 1e-4 apart on [0, 1] pixels.
    torch.testing.assert_close(rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1.5e-4, rtol=0)


def test_jitter_order_is_brightness_contrast_saturation_hue():
    x = mirror_symmetric(rand_u8(1, 3, 16, 8, seed=33)).expand(64, -1, -1, -1)
    cfg = replace(PLAIN, jitter_p=1.0)
    g = gen(34)
    out = augment_view(x, 16, cfg, 0.0, 0.0, g)
    p = sample_view_params(64, 16, 16, cfg, 0.0, 0.0, gen(34), "cpu")
    ref = x.float() * (1 / 255)
    ref = adjust_brightness(ref, p["brightness"])
    ref = adjust_contrast(ref, p["contrast"])
    ref = adjust_saturation(ref, p["saturation"])
    ref = adjust_hue(ref, p["hue"])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- two views, eval


def test_two_view_augment_asymmetric_views_and_normalisation():
    x = rand_u8(128, 3, 32, 32, seed=35)
    cfg = AugmentConfig()
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    v1, v2 = two_view_augment(x, 32, cfg, gen(36), mean, std)
    assert v1.shape == v2.shape == (128, 3, 32, 32)
    assert v1.dtype == v2.dtype == torch.float32
    assert (v1 - v2).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every pair differs
    # Exactly (view - mean) / std of the unnormalised views drawn the same way.
    g = gen(36)
    u1 = augment_view(x, 32, cfg, cfg.blur_p1, cfg.solarize_p1, g)
    u2 = augment_view(x, 32, cfg, cfg.blur_p2, cfg.solarize_p2, g)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(v1, (u1 - m) / s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v2, (u2 - m) / s, atol=1e-5, rtol=1e-5)
    # Normalising with the views' own channel stats gives ~0 mean, ~1 std on a fresh draw.
    u = torch.cat([u1, u2])
    cm, cs = u.mean(dim=(0, 2, 3)).tolist(), u.std(dim=(0, 2, 3)).tolist()
    w1, w2 = two_view_augment(x, 32, cfg, gen(37), cm, cs)
    w = torch.cat([w1, w2])
    assert w.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert (w.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1


def test_two_view_uses_each_views_blur_and_solarize_probabilities():
    x = rand_u8(64, 3, 32, 32, seed=38)
    cfg = replace(PLAIN, blur_p1=1.0, blur_p2=0.0, solarize_p1=0.0, solarize_p2=1.0)
    v1, v2 = two_view_augment(x, 32, cfg, gen(39), (0.0,) * 3, (1.0,) * 3)
    xf = x.float() / 255
    # View 2: solarized, not blurred (each sample is the solarized image or its mirror).
    sol = torch.where(xf >= 0.5, 1 - xf, xf)
    err = torch.minimum((v2 - sol).abs().amax(dim=(1, 2, 3)), (v2 - sol.flip(-1)).abs().amax(dim=(1, 2, 3)))
    assert err.max() < 1e-5
    # View 1: blurred (variance drops), not solarized (values above 0.5 remain).
    assert v1.max() > 0.5 and (v1.var(dim=(1, 2, 3)) < xf.var(dim=(1, 2, 3))).float().mean() > 0.9


def test_eval_view_is_deterministic_resize_and_normalise():
    x = rand_u8(5, 3, 40, 24, seed=40)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = eval_view(x, 32, mean, std)
    ref = TF.resize(x.float() / 255, [32, 32], antialias=False)
    ref = TF.normalize(ref, list(mean), list(std))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out, eval_view(x, 32, mean, std))
    sq = rand_u8(3, 3, 16, 16, seed=41)  # already out_size: only scaled and normalised
    torch.testing.assert_close(
        eval_view(sq, 16, mean, std), TF.normalize(sq.float() / 255, list(mean), list(std)), atol=1e-5, rtol=1e-5
    )
    gray = eval_view(x[:, :1], 16, mean, std)
    assert gray.shape == (5, 3, 16, 16)
    torch.testing.assert_close(gray[:, 0] * std[0] + mean[0], gray[:, 1] * std[1] + mean[1], atol=1e-5, rtol=0)


def test_normalize_helper():
    x = torch.rand(2, 3, 4, 4)
    out = normalize(x, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    ref = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_config_nests_in_omegaconf():
    omegaconf = pytest.importorskip("omegaconf")
    conf = omegaconf.OmegaConf.structured(AugmentConfig)
    assert conf.blur_p1 == 1.0 and conf.solarize_p2 == 0.2


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_and_cpu_agree_in_distribution_without_host_syncs():
    x = rand_u8(2048, 3, 32, 32, seed=41)
    cfg = AugmentConfig()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    c1, c2 = two_view_augment(x, 32, cfg, gen(42), mean, std)
    xg = x.cuda()
    g = gen(42, "cuda")
    two_view_augment(xg, 32, cfg, g, mean, std)  # warm up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d1, d2 = two_view_augment(xg, 32, cfg, g, mean, std)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    d1, d2 = d1.cpu(), d2.cpu()
    assert torch.isfinite(d1).all() and torch.isfinite(d2).all()
    for c, d in ((c1, d1), (c2, d2)):
        # Per-image statistics have the same distribution: compare their means and spreads.
        for stat in (lambda v: v.mean(dim=(1, 2, 3)), lambda v: v.std(dim=(1, 2, 3))):
            a, b = stat(c).double(), stat(d).double()
            se = math.sqrt(a.var() / len(a) + b.var() / len(b))
            assert abs(a.mean() - b.mean()) < 5 * se
            assert abs(a.std() / b.std() - 1) < 0.1
    # Same seed on the GPU gives the same views there too.
    e1, _ = two_view_augment(xg, 32, cfg, gen(42, "cuda"), mean, std)
    f1, _ = two_view_augment(xg, 32, cfg, gen(42, "cuda"), mean, std)
    assert torch.equal(e1, f1)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_compiled_apply_view_equals_eager(device):
    """byol and distill run apply_view through engine.maybe_compile (torch.compile on CUDA):
    the compiled views must be the eager ones, every op on (crop, flip, jitter, grayscale,
    blur, solarize), for the same drawn parameters."""
    cfg = AugmentConfig(solarize_p1=0.5, grayscale_p=0.5)
    x = rand_u8(32, 3, 40, 36, seed=7).to(device)
    params = sample_view_params(32, 40, 36, cfg, 0.5, 0.5, gen(3, device), device)
    assert 0 < int(params["blur"].sum()) < 32 and 0 < int(params["solarize"].sum()) < 32
    eager = apply_view(x, params, 24, cfg, 0.5, 0.5)
    compiled = torch.compile(apply_view)(x, params, 24, cfg, 0.5, 0.5)
    assert compiled.shape == eager.shape == (32, 3, 24, 24)
    torch.testing.assert_close(compiled, eager, atol=2e-5, rtol=0)
