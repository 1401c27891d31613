"""MNIST-C-style corruptions of raw digits images, one function each, at five severities.

Images are float tensors ``[N, 1, 8, 8]`` with values in ``0..16`` (background 0). Each function maps
``(images, severity 1..5, generator) -> images`` (not yet clamped) and takes its randomness from the
generator only; call them through :func:`fallbackformer.data.shift.corrupt`, which checks the
arguments, seeds the generator from ``(seed, name, severity)`` and clamps. Which of them may be used
for tuning and which are held out is decided here (:data:`TUNING_CORRUPTIONS`, :data:`HELD_OUT`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CORRUPTIONS", "HELD_OUT", "MAX_VALUE", "SHIFT_VERSION", "STOCHASTIC", "TUNING_CORRUPTIONS", "CorruptionFn"]

MAX_VALUE = 16.0
"""The largest pixel value of the raw digits input."""

SHIFT_VERSION = 1
"""Bumped whenever a corruption changes; part of the shift sets' cache key so stale caches are never read."""

CorruptionFn = Callable[[Tensor, int, torch.Generator], Tensor]
"""``fn(images [N, C, H, W] in 0..16, severity 1..5, generator) -> images`` (not yet clamped)."""

# --------------------------------------------------------------------------------------------------
# helpers


def _rand(gen: torch.Generator, shape: Sequence[int], like: Tensor) -> Tensor:
    """Uniform [0, 1) drawn on the CPU from ``gen``, moved to ``like``'s device and dtype."""
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float64).to(like.device, like.dtype)


def _randn(gen: torch.Generator, shape: Sequence[int], like: Tensor) -> Tensor:
    """Standard normal drawn on the CPU from ``gen``, moved to ``like``'s device and dtype."""
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(like.device, like.dtype)


def _sign(gen: torch.Generator, n: int, like: Tensor) -> Tensor:
    """Random +-1 per image, ``[N]``."""
    return torch.where(_rand(gen, (n,), like) < 0.5, -1.0, 1.0).to(like.dtype)


def _gaussian_kernel1d(sigma: float, radius: int, like: Tensor) -> Tensor:
    xs = torch.arange(-radius, radius + 1, device=like.device, dtype=like.dtype)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    return k / k.sum()  # [2r+1]


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding, per channel. ``x``: [N, C, H, W]."""
    n, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3.0 * sigma)), h - 1, w - 1))
    k = _gaussian_kernel1d(sigma, radius, x)
    xc = x.reshape(n * c, 1, h, w)
    xc = F.pad(xc, (radius, radius, 0, 0), mode="reflect")
    xc = F.conv2d(xc, k.view(1, 1, 1, -1))
    xc = F.pad(xc, (0, 0, radius, radius), mode="reflect")
    xc = F.conv2d(xc, k.view(1, 1, -1, 1))
    return xc.reshape(n, c, h, w)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Warp ``x`` [N, C, H, W] by per-image affine maps ``theta`` [N, 2, 3] (output -> input coords)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [N, H, W, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _identity_theta(n: int, like: Tensor) -> Tensor:
    theta = torch.zeros(n, 2, 3, device=like.device, dtype=like.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    return theta  # [N, 2, 3]


def _draw_segments(
    x: Tensor, starts: Tensor, ends: Tensor, value: float, dotted: bool, samples: int = 48
) -> Tensor:
    """Set the pixels on segments to ``value``.

    Args:
        x: images [N, C, H, W].
        starts: segment starts in pixel coordinates (col, row), [N, L, 2].
        ends: segment ends, [N, L, 2].
        value: the pixel value drawn.
        dotted: keep only every other pixel-length stretch of each segment.
        samples: points sampled per segment.
    """
    n, c, h, w = x.shape
    t = torch.linspace(0.0, 1.0, samples, device=x.device, dtype=x.dtype)  # [S]
    pts = starts[:, :, None, :] + t[None, None, :, None] * (ends - starts)[:, :, None, :]  # [N, L, S, 2]
    keep = torch.ones(pts.shape[:-1], dtype=torch.bool, device=x.device)  # [N, L, S]
    if dotted:
        length = (ends - starts).norm(dim=-1)  # [N, L]
        dist = t[None, None, :] * length[:, :, None]  # [N, L, S]
        keep = torch.floor(dist / 1.5).remainder(2) == 0
    cols = pts[..., 0].round().long().clamp(0, w - 1)
    rows = pts[..., 1].round().long().clamp(0, h - 1)
    flat = (rows * w + cols).reshape(n, -1)  # [N, L*S]
    mask = torch.zeros(n, h * w, dtype=x.dtype, device=x.device)
    mask.scatter_reduce_(1, flat, keep.reshape(n, -1).to(x.dtype), reduce="amax")
    mask = mask.view(n, 1, h, w).expand(n, c, h, w) > 0
    return torch.where(mask, torch.full_like(x, value), x)


def _random_segments(gen: torch.Generator, n: int, count: int, h: int, w: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``count`` random segments per image, end points anywhere in the image, [N, L, 2] each."""
    size = torch.tensor([w - 1, h - 1], device=like.device, dtype=like.dtype)
    starts = _rand(gen, (n, count, 2), like) * size
    ends = _rand(gen, (n, count, 2), like) * size
    return starts, ends


# --------------------------------------------------------------------------------------------------
# corruptions: each maps (images, severity, generator) -> images; corrupt() clamps afterwards


def gaussian_noise(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Additive Gaussian noise, std a fraction of the full range."""
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1] * MAX_VALUE
    return x + sigma * _randn(gen, x.shape, x)


def shot_noise(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Poisson (photon) noise: fewer photons per unit intensity at higher severity."""
    lam = (60.0, 25.0, 12.0, 5.0, 3.0)[severity - 1]
    rate = (x.clamp(0, MAX_VALUE) / MAX_VALUE * lam).to("cpu", torch.float64)
    counts = torch.poisson(rate, generator=gen).to(x.device, x.dtype)
    return counts / lam * MAX_VALUE


def impulse_noise(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Salt-and-pepper noise: a fraction of pixels set to 0 or 16."""
    amount = (0.03, 0.06, 0.10, 0.17, 0.27)[severity - 1]
    u = _rand(gen, x.shape, x)
    salt = _rand(gen, x.shape, x) < 0.5
    hit = u < amount
    return torch.where(hit & salt, MAX_VALUE, torch.where(hit, 0.0, x)).to(x.dtype)


def speckle_noise(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Multiplicative noise (HELD OUT)."""
    s = (0.15, 0.25, 0.35, 0.5, 0.7)[severity - 1]
    return x + x * s * _randn(gen, x.shape, x)


def gaussian_blur(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Gaussian blur; sigma in pixels."""
    sigma = (0.4, 0.6, 0.8, 1.0, 1.3)[severity - 1]
    return _blur(x, sigma)


def motion_blur(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Average of shifted copies along a random direction per image; length in pixels."""
    length = (1.0, 2.0, 3.0, 4.0, 5.0)[severity - 1]
    n, c, h, w = x.shape
    k = 9
    angle = _rand(gen, (n,), x) * math.pi  # [N]
    offs = torch.linspace(-0.5, 0.5, k, device=x.device, dtype=x.dtype) * length  # [K]
    dx = offs[None, :] * torch.cos(angle)[:, None]  # [N, K] pixels
    dy = offs[None, :] * torch.sin(angle)[:, None]
    theta = _identity_theta(n * k, x)
    theta[:, 0, 2] = (dx * 2.0 / w).reshape(-1)
    theta[:, 1, 2] = (dy * 2.0 / h).reshape(-1)
    xs = x.repeat_interleave(k, dim=0)  # [N*K, C, H, W]
    return _affine(xs, theta).view(n, k, c, h, w).mean(dim=1)


def glass_blur(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Blur, then jitter every pixel by an independent random sub-pixel offset (HELD OUT).

    The pixel-swapping of ImageNet-C's glass blur is far too strong on 8x8 images; an unsmoothed
    per-pixel displacement (unlike :func:`elastic`, whose field is smooth) keeps the frosted look.
    """
    sigma, delta = ((0.3, 0.3), (0.4, 0.5), (0.5, 0.7), (0.6, 0.9), (0.7, 1.2))[severity - 1]
    n, _, h, w = x.shape
    out = _blur(x, sigma)
    offset = (_rand(gen, (n, h, w, 2), x) * 2 - 1) * delta  # [N, H, W, 2] pixels, (col, row)
    scale_px = torch.tensor([2.0 / w, 2.0 / h], device=x.device, dtype=x.dtype)
    grid = F.affine_grid(_identity_theta(n, x), list(x.shape), align_corners=False) + offset * scale_px
    return F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Rotation about the centre by a fixed angle with a random sign per image."""
    deg = (10.0, 20.0, 30.0, 45.0, 60.0)[severity - 1]
    n = x.shape[0]
    a = _sign(gen, n, x) * math.radians(deg)
    theta = _identity_theta(n, x)
    theta[:, 0, 0] = torch.cos(a)
    theta[:, 0, 1] = -torch.sin(a)
    theta[:, 1, 0] = torch.sin(a)
    theta[:, 1, 1] = torch.cos(a)
    return _affine(x, theta)


def shear(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Horizontal shear with a random sign per image."""
    s = (0.15, 0.3, 0.45, 0.6, 0.8)[severity - 1]
    n = x.shape[0]
    theta = _identity_theta(n, x)
    theta[:, 0, 1] = _sign(gen, n, x) * s
    return _affine(x, theta)


def scale(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Zoom out about the centre: the digit shrinks to a fraction of its size."""
    f = (0.9, 0.8, 0.7, 0.6, 0.5)[severity - 1]
    theta = _identity_theta(x.shape[0], x) / f
    theta[:, :, 2] = 0.0
    return _affine(x, theta)


def translate(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Shift by a fixed distance (pixels) in a random direction per image."""
    dist = (0.5, 1.0, 1.5, 2.0, 2.5)[severity - 1]
    n, _, h, w = x.shape
    angle = _rand(gen, (n,), x) * 2 * math.pi
    theta = _identity_theta(n, x)
    theta[:, 0, 2] = dist * torch.cos(angle) * 2.0 / w
    theta[:, 1, 2] = dist * torch.sin(angle) * 2.0 / h
    return _affine(x, theta)


def elastic(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Elastic deformation: a smooth random displacement field, RMS ``alpha`` pixels."""
    alpha = (0.4, 0.7, 1.0, 1.4, 1.9)[severity - 1]
    n, _, h, w = x.shape
    field = _rand(gen, (n, 2, h, w), x) * 2 - 1
    field = _blur(field, 1.2)
    rms = field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    field = field / rms * alpha  # [N, 2, H, W] pixels
    scale_px = torch.tensor([2.0 / w, 2.0 / h], device=x.device, dtype=x.dtype)
    grid = F.affine_grid(_identity_theta(n, x), list(x.shape), align_corners=False)  # [N, H, W, 2]
    grid = grid + field.permute(0, 2, 3, 1) * scale_px
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def brightness(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Add a constant (a fraction of the range) to every pixel."""
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    return x + c * MAX_VALUE


def contrast(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Shrink deviations from each image's mean."""
    c = (0.75, 0.6, 0.45, 0.3, 0.15)[severity - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def pixelate(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Average over square blocks 1.33..4 pixels wide, anchored at the top-left corner.

    Block sizes that do not divide 8 are handled on a 6x nearest-upsampled grid (so that the
    distortion grows strictly with severity), then averaged back down to the input size.
    """
    block = (8, 12, 16, 20, 24)[severity - 1]  # in units of 1/6 pixel
    up = 6
    h, w = x.shape[-2:]
    big = F.interpolate(x, scale_factor=up, mode="nearest")  # [N, C, 6H, 6W]
    pooled = F.avg_pool2d(big, block, block, ceil_mode=True)
    big = F.interpolate(pooled, scale_factor=block, mode="nearest")[..., : h * up, : w * up]
    return F.avg_pool2d(big, up, up)


def fog(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Add a smooth, low-frequency random haze (HELD OUT)."""
    c = (0.15, 0.3, 0.45, 0.6, 0.8)[severity - 1]
    n, ch, h, w = x.shape
    coarse = _rand(gen, (n, 1, 3, 3), x)
    haze = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)  # [N, 1, H, W]
    lo = haze.amin(dim=(2, 3), keepdim=True)
    hi = haze.amax(dim=(2, 3), keepdim=True)
    haze = 0.5 + 0.5 * (haze - lo) / (hi - lo).clamp_min(1e-12)  # [0.5, 1]
    return x + c * MAX_VALUE * haze.expand(n, ch, h, w)


def dotted_line(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Draw 1..5 random dotted lines at full intensity."""
    n, _, h, w = x.shape
    starts, ends = _random_segments(gen, n, severity, h, w, x)
    return _draw_segments(x, starts, ends, MAX_VALUE, dotted=True)


def zigzag(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Draw 1..5 random solid zigzag polylines (3 segments each) (HELD OUT)."""
    n, _, h, w = x.shape
    size = torch.tensor([w - 1, h - 1], device=x.device, dtype=x.dtype)
    verts = _rand(gen, (n, severity, 4, 2), x) * size  # [N, L, 4, 2]
    starts = verts[:, :, :-1].reshape(n, -1, 2)
    ends = verts[:, :, 1:].reshape(n, -1, 2)
    return _draw_segments(x, starts, ends, 0.75 * MAX_VALUE, dotted=False)


def occlusion(x: Tensor, severity: int, gen: torch.Generator) -> Tensor:
    """Erase (set to 0) a random square; side grows with severity."""
    n, c, h, w = x.shape
    side = (2, 3, 4, 5, 6)[severity - 1]
    side_h, side_w = min(side, h), min(side, w)
    top = (_rand(gen, (n,), x) * (h - side_h + 1)).floor().long()  # [N]
    left = (_rand(gen, (n,), x) * (w - side_w + 1)).floor().long()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + side_h).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + side_w).view(n, 1, 1))
    )  # [N, H, W]
    return x.masked_fill(inside[:, None].expand(n, c, h, w), 0.0)


TUNING_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "gaussian_blur",
    "motion_blur",
    "rotate",
    "shear",
    "scale",
    "translate",
    "elastic",
    "brightness",
    "contrast",
    "pixelate",
    "dotted_line",
    "occlusion",
)
"""Corruptions that may be used for tuning (choosing thresholds, policies, checkpoints)."""

HELD_OUT: frozenset[str] = frozenset({"speckle_noise", "glass_blur", "fog", "zigzag"})
"""Corruptions that must NEVER be used for tuning anything; only for the final evaluation."""

CORRUPTIONS: dict[str, CorruptionFn] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur,
    "rotate": rotate,
    "shear": shear,
    "scale": scale,
    "translate": translate,
    "elastic": elastic,
    "brightness": brightness,
    "contrast": contrast,
    "pixelate": pixelate,
    "dotted_line": dotted_line,
    "occlusion": occlusion,
    # held out
    "speckle_noise": speckle_noise,
    "glass_blur": glass_blur,
    "fog": fog,
    "zigzag": zigzag,
}
"""Every corruption by name: ``fn(images, severity, generator)``. Call through :func:`corrupt`."""

STOCHASTIC: frozenset[str] = frozenset(CORRUPTIONS) - {"gaussian_blur", "brightness", "contrast", "pixelate", "scale"}
"""Corruptions whose output depends on the seed (the others are fixed functions of the image)."""

assert set(TUNING_CORRUPTIONS) | HELD_OUT == set(CORRUPTIONS) and not set(TUNING_CORRUPTIONS) & HELD_OUT
