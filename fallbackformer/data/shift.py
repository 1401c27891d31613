"""The shift suite: MNIST-C-style corruptions of digits images at five severities.

Images are the raw digits input: float tensors ``[N, 1, 8, 8]`` with values in ``0..16`` (background 0).
Every corruption keeps shape and dtype, clamps to ``0..16`` and is deterministic for a seed: its
randomness comes from a private ``torch.Generator`` seeded from ``(seed, name, severity)``, never from
the global RNG. Severity runs from 1 (mild) to 5 (harsh); the mean distortion from the clean image
grows strictly with severity (checked by ``tests/unit/data/test_shift.py``).

Two groups:

* ``TUNING_CORRUPTIONS`` (15 types) may be used to choose anything (thresholds, policies, models).
* ``HELD_OUT`` (4 types) must never be used for tuning; they exist to measure how the system does on
  shift nobody looked at. ``configs/shift/default.yaml`` lists them under ``held_out``.

>>> import torch
>>> x = torch.rand(4, 1, 8, 8) * 16
>>> y = corrupt(x, "rotate", 3, seed=0)
>>> y.shape, y.dtype
(torch.Size([4, 1, 8, 8]), torch.float32)
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CORRUPTIONS",
    "HELD_OUT",
    "TUNING_CORRUPTIONS",
    "STOCHASTIC",
    "SEVERITIES",
    "MAX_VALUE",
    "SHIFT_VERSION",
    "ShiftSuite",
    "corrupt",
    "corruption_generator",
    "make_shift_sets",
    "set_key",
    "parse_set_key",
    "tuning_sets",
]

MAX_VALUE = 16.0
"""The largest pixel value of the raw digits input."""

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

SHIFT_VERSION = 1
"""Bumped whenever a corruption changes; part of the cache key so stale caches are never read."""

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


# --------------------------------------------------------------------------------------------------
# public API


def _check_name(name: str) -> None:
    if name not in CORRUPTIONS:
        raise KeyError(
            f"unknown corruption {name!r}; valid names: {sorted(CORRUPTIONS)} "
            f"(held out, never for tuning: {sorted(HELD_OUT)})"
        )


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


def corruption_generator(seed: int, name: str, severity: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, name, severity)`` via SHA-256 (stable across runs)."""
    digest = hashlib.sha256(f"fallbackformer.shift/{int(seed)}/{name}/{int(severity)}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Apply one corruption at one severity.

    Args:
        images: raw images ``[N, C, H, W]`` (digits: ``[N, 1, 8, 8]``), floating point, values 0..16.
        name: a key of :data:`CORRUPTIONS`.
        severity: 1 (mild) .. 5 (harsh).
        seed: the same seed, name, severity and input give the same output, bit for bit.

    Returns:
        The corrupted images: same shape, dtype and device, clamped to ``0..16``.

    Raises:
        KeyError: unknown ``name`` (the message lists the valid names).
        ValueError: bad severity, shape or dtype.
    """
    _check_name(name)
    _check_severity(severity)
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a 4-D tensor [N, C, H, W], got {shape}; add a channel dim with x[:, None]")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}; convert with images.float()")
    if images.shape[0] == 0:
        return images.clone()
    gen = corruption_generator(seed, name, int(severity))
    with torch.no_grad():
        out = CORRUPTIONS[name](images, int(severity), gen)
        out = out.to(images.dtype).clamp_(0.0, MAX_VALUE)
    assert out.shape == images.shape, f"{name} changed the shape {tuple(images.shape)} -> {tuple(out.shape)}"
    return out.contiguous()


def set_key(name: str, severity: int) -> str:
    """The name of one shift set: ``"<corruption>/<severity>"``."""
    return f"{name}/{int(severity)}"


def parse_set_key(key: str) -> tuple[str, int] | None:
    """``"rotate/3"`` -> ``("rotate", 3)``; any other key (``"clean"``) -> ``None``."""
    name, sep, sev = key.rpartition("/")
    if not sep or name not in CORRUPTIONS or not sev.isdigit():
        return None
    return name, int(sev)


def _input_hash(images: Tensor, labels: Tensor) -> str:
    h = hashlib.sha256()
    for t in (images, labels):
        a = t.detach().to("cpu").contiguous()
        h.update(f"{a.dtype}{tuple(a.shape)}".encode())
        h.update(a.view(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()[:16]


def _cache_path(cache_dir: Path, name: str, severity: int, seed: int, digest: str) -> Path:
    return cache_dir / f"{name}_s{int(severity)}_seed{int(seed)}_v{SHIFT_VERSION}_{digest}.safetensors"


def _load_cached(path: Path, like: Tensor) -> Tensor | None:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))["images"]
    except Exception:  # a torn or foreign file: recompute and overwrite
        return None
    if t.shape != like.shape or t.dtype != like.dtype:
        return None
    return t.to(like.device)


def _save_atomic(path: Path, images: Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        save_file({"images": images.detach().to("cpu").contiguous()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_shift_sets(
    images: Tensor,
    labels: Tensor,
    names: Iterable[str] | None = None,
    severities: Iterable[int] = SEVERITIES,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Build the shift sets ``"<name>/<severity>" -> (corrupted images, labels)``.

    Args:
        images: clean raw images ``[N, C, H, W]`` in 0..16 (the test split; never train/val/calibration).
        labels: ``[N]`` labels; returned unchanged with every set.
        names: corruptions to build; ``None`` builds all of :data:`CORRUPTIONS` (held-out ones included).
        severities: severities to build, each in 1..5.
        seed: the suite's seed.
        cache_dir: if given, each set is stored as a safetensors file keyed by name, severity, seed,
            :data:`SHIFT_VERSION` and a hash of the input, and read back on later calls.

    Returns:
        An insertion-ordered dict (names outer, severities inner).
    """
    names = list(CORRUPTIONS) if names is None else list(names)
    severities = [int(s) for s in severities]
    for name in names:
        _check_name(name)
    for s in severities:
        _check_severity(s)
    if labels.shape[:1] != images.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}: one label per image")
    cache = Path(cache_dir) if cache_dir is not None else None
    digest = _input_hash(images, labels) if cache is not None else ""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name in names:
        for s in severities:
            x = None
            if cache is not None:
                path = _cache_path(cache, name, s, seed, digest)
                if path.exists():
                    x = _load_cached(path, images)
            if x is None:
                x = corrupt(images, name, s, seed)
                if cache is not None:
                    _save_atomic(path, x)
            out[set_key(name, s)] = (x, labels)
    return out


@dataclass
class ShiftSuite:
    """The digits shift suite as configured (``configs/shift/default.yaml`` and ``smoke.yaml``).

    A :class:`~fallbackformer.data.protocol.ShiftSuiteLike`: the pipeline, the router's mixture and
    AugMix reach the corruptions through :meth:`corrupt`.

    Attributes:
        names: corruptions that may be used for tuning and are evaluated.
        held_out: corruptions evaluated but never used for tuning; must be a subset of :data:`HELD_OUT`
            or at least disjoint from ``names``.
        severities: severities per corruption.
        seed: the suite's seed.
        cache_dir: where sets are cached (``None``: no cache).
    """

    names: Sequence[str] = field(default_factory=lambda: list(TUNING_CORRUPTIONS))
    held_out: Sequence[str] = field(default_factory=lambda: sorted(HELD_OUT))
    severities: Sequence[int] = field(default_factory=lambda: list(SEVERITIES))
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.names = list(self.names)
        self.held_out = list(self.held_out)
        self.severities = [int(s) for s in self.severities]
        for n in [*self.names, *self.held_out]:
            _check_name(n)
        for s in self.severities:
            _check_severity(s)
        both = set(self.names) & set(self.held_out)
        if both:
            raise ValueError(f"corruptions {sorted(both)} are both tunable and held out; list each in one place")

    @property
    def value_range(self) -> tuple[float, float]:
        """The raw pixel range every corruption keeps: ``(0, 16)``."""
        return (0.0, MAX_VALUE)

    @property
    def all_names(self) -> list[str]:
        """Tunable names then held-out names."""
        return [*self.names, *self.held_out]

    def is_held_out(self, key: str) -> bool:
        """Whether a set key (``"fog/3"``) or corruption name belongs to a held-out corruption."""
        parsed = parse_set_key(key)
        name = parsed[0] if parsed else key
        return name in self.held_out

    def corrupt(self, x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
        """One corruption of this suite (tunable or held out), see :func:`corrupt`."""
        if name not in self.all_names:
            raise KeyError(f"corruption {name!r} is not in this suite; its names are {self.all_names}")
        return corrupt(x, name, severity, seed)

    def build(
        self, images: Tensor, labels: Tensor, include_held_out: bool = True
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """All sets of the suite for the given clean split. Pass ``include_held_out=False`` when tuning."""
        names = self.all_names if include_held_out else list(self.names)
        return make_shift_sets(images, labels, names, self.severities, self.seed, self.cache_dir)

    def to_dict(self) -> dict[str, object]:
        """JSON-able description (for reports and manifests)."""
        return {
            "names": list(self.names),
            "held_out": list(self.held_out),
            "severities": list(self.severities),
            "seed": int(self.seed),
            "version": SHIFT_VERSION,
        }


def tuning_sets(sets: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Drop every held-out set from ``sets`` (use before anything that tunes)."""
    return {k: v for k, v in sets.items() if not ((p := parse_set_key(k)) and p[0] in HELD_OUT)}
