"""AugMix-style training augmentation over the TUNABLE corruptions of the shift suite.

AugMix (Hendrycks et al., "AugMix: A Simple Data Processing Method to Improve Robustness and
Uncertainty", ICLR 2020): ``width`` chains, each of ``depth_min..depth_max`` random operations at
random severities, are mixed with Dirichlet weights; the mixture is then blended with the original
image by a Beta-drawn weight:

    chain_k  = op_d(...op_1(x))                      k = 1..width, d ~ U{depth_min..depth_max}
    mixed    = sum_k w_k * chain_k                   w ~ Dirichlet(alpha, ..., alpha)
    augmix   = (1 - m) * x + m * mixed               m ~ Beta(alpha, alpha)

Here the operations are the corruptions of :data:`fallbackformer.data.shift.TUNING_CORRUPTIONS`;
the held-out corruptions (:data:`~fallbackformer.data.shift.HELD_OUT`) are refused, so that they
stay a measure of shift nobody trained, calibrated or chose anything on.

Every image draws its own operations, depth and weights. Images that drew the same operation at the
same step are corrupted together, in one vectorised call at one severity drawn for that group.
All randomness comes from a ``torch.Generator`` (CPU), never the global RNG: the same seed and the
same input give the same output, bit for bit.

>>> import torch
>>> aug = AugMix(AugMixConfig(seed=0))
>>> x = torch.rand(4, 1, 8, 8) * 16
>>> aug(x).shape
torch.Size([4, 1, 8, 8])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from fallbackformer.data.shift import CORRUPTIONS, HELD_OUT, MAX_VALUE, TUNING_CORRUPTIONS

__all__ = ["AugMixConfig", "AugMix", "NoAugmentation", "check_operations", "optional_augmentation"]


def check_operations(operations: Sequence[str]) -> tuple[str, ...]:
    """The operations as a tuple, after refusing held-out, unknown or no names.

    Raises:
        ValueError: a held-out corruption (never to be used for fitting), an unknown name, or an
            empty list. The message names the bad value and the names that are allowed.
    """
    ops = tuple(str(o) for o in operations)
    held = sorted(set(ops) & HELD_OUT)
    if held:
        raise ValueError(
            f"augmentation operations {held} are HELD-OUT corruptions and must never be used for "
            f"fitting, calibration or choosing a setting; use names from TUNING_CORRUPTIONS: "
            f"{list(TUNING_CORRUPTIONS)}"
        )
    unknown = sorted(set(ops) - set(TUNING_CORRUPTIONS))
    if unknown:
        raise ValueError(f"unknown augmentation operations {unknown}; valid names: {list(TUNING_CORRUPTIONS)}")
    if not ops:
        raise ValueError("augmentation operations is empty; give at least one name from TUNING_CORRUPTIONS")
    return ops


@dataclass(frozen=True)
class AugMixConfig:
    """Settings of :class:`AugMix` (``configs/augment/augmix.yaml``).

    Attributes:
        width: number of chains ``k`` mixed per image (AugMix's default 3).
        depth_min: fewest operations in a chain (>= 1).
        depth_max: most operations in a chain (>= depth_min).
        severity_min: mildest severity drawn (1..5).
        severity_max: harshest severity drawn (severity_min..5).
        alpha: the Dirichlet (chain weights) and Beta (blend with the original) concentration.
        operations: corruption names to draw from; tunable ones only (held-out names are refused).
        lambda_jsd: weight of the Jensen-Shannon consistency term in the training loss (read by the
            training modules: ``loss = clean loss + lambda_jsd * JSD(clean, augmix1, augmix2)``).
        seed: seed of the augmentation's own generator.
    """

    width: int = 3
    depth_min: int = 1
    depth_max: int = 3
    severity_min: int = 1
    severity_max: int = 5
    alpha: float = 1.0
    operations: Sequence[str] = field(default_factory=lambda: TUNING_CORRUPTIONS)
    lambda_jsd: float = 12.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "operations", check_operations(self.operations))
        if self.width < 1:
            raise ValueError(f"width must be >= 1 (chains per image), got {self.width}")
        if not 1 <= self.depth_min <= self.depth_max:
            raise ValueError(
                f"need 1 <= depth_min <= depth_max, got depth_min={self.depth_min}, depth_max={self.depth_max}"
            )
        if not 1 <= self.severity_min <= self.severity_max <= 5:
            raise ValueError(
                f"need 1 <= severity_min <= severity_max <= 5, got {self.severity_min}..{self.severity_max}"
            )
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (Dirichlet/Beta concentration), got {self.alpha}")
        if not self.lambda_jsd >= 0:
            raise ValueError(f"lambda_jsd must be >= 0, got {self.lambda_jsd}")


def _gamma(concentration: float, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Gamma(concentration, 1) samples drawn from ``gen`` (float64, CPU).

    ``torch.distributions`` takes no generator; ``torch._standard_gamma`` does (private, but stable
    since torch 1.x and what ``torch.distributions.Gamma`` itself calls).
    """
    return torch._standard_gamma(torch.full(shape, float(concentration), dtype=torch.float64), generator=gen)


class AugMix:
    """AugMix over raw digits images ``[N, 1, 8, 8]`` (any ``[N, C, H, W]``) in ``0..16``.

    Args:
        config: the settings (default: :class:`AugMixConfig()`).

    Calling the object draws from its own generator (seeded with ``config.seed``) unless a
    generator is passed; :meth:`reset` re-seeds it.
    """

    def __init__(self, config: AugMixConfig | None = None) -> None:
        self.config = config if config is not None else AugMixConfig()
        self.generator = torch.Generator(device="cpu")
        self.reset()

    @property
    def lambda_jsd(self) -> float:
        """Weight of the JSD consistency term (``config.lambda_jsd``)."""
        return float(self.config.lambda_jsd)

    def reset(self, seed: int | None = None) -> None:
        """Re-seed the own generator (with ``config.seed`` when ``seed`` is None)."""
        self.generator.manual_seed(int(self.config.seed if seed is None else seed))

    def __repr__(self) -> str:
        return f"AugMix({self.config})"

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One AugMix view of every image (see :meth:`views`); ``[N, C, H, W]`` in, same shape out."""
        return self.views(images, 1, generator)[0]

    @torch.no_grad()
    def views(self, images: Tensor, count: int = 2, generator: torch.Generator | None = None) -> list[Tensor]:
        """``count`` independent AugMix views of every image, drawn in one vectorised pass.

        Args:
            images: ``[N, C, H, W]`` floating point, values ``0..16``.
            count: number of views (the JSD consistency loss uses 2).
            generator: a CPU generator to draw from (default: the object's own).

        Returns:
            ``count`` tensors ``[N, C, H, W]``, same dtype and device, clamped to ``0..16``.

        Raises:
            ValueError: not a 4-D floating-point tensor, or ``count < 1``.
        """
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a 4-D tensor [N, C, H, W], got {shape}; add a channel dim with x[:, None]")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point, got {images.dtype}; convert with images.float()")
        if count < 1:
            raise ValueError(f"count must be >= 1 (views per image), got {count}")
        if images.shape[0] == 0:
            return [images.clone() for _ in range(count)]
        gen = self.generator if generator is None else generator
        x = images.detach().repeat(count, 1, 1, 1)  # [V*N, C, H, W], view-major
        return list(self._augmix(x, gen).chunk(count))

    def _augmix(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """AugMix of every row of ``x`` [M, C, H, W] (rows are independent)."""
        cfg = self.config
        n, k = x.shape[0], cfg.width
        chains = x.repeat(k, 1, 1, 1)  # [K*M, C, H, W], chain-major
        m = k * n
        depth = torch.randint(cfg.depth_min, cfg.depth_max + 1, (m,), generator=gen)  # [K*M]
        for step in range(cfg.depth_max):
            op = torch.randint(0, len(cfg.operations), (m,), generator=gen)  # [K*M]
            op = torch.where(depth > step, op, -1)  # -1: this chain has ended
            # One call per operation: a corruption's severity is a scalar, so each (step, operation)
            # group draws one severity (grouping by (operation, severity) costs 5x the calls).
            for o in torch.unique(op).tolist():  # sorted: the order of draws is fixed
                if o < 0:
                    continue
                severity = int(torch.randint(cfg.severity_min, cfg.severity_max + 1, (1,), generator=gen))
                rows = (op == o).nonzero().squeeze(1).to(chains.device)  # [G]
                out = CORRUPTIONS[cfg.operations[o]](chains.index_select(0, rows), severity, gen)
                chains.index_copy_(0, rows, out.to(chains.dtype).clamp_(0.0, MAX_VALUE))
        g = _gamma(cfg.alpha, (n, k), gen)
        w = (g / g.sum(dim=1, keepdim=True)).to(x.device, x.dtype)  # [M, K] Dirichlet(alpha)
        a, b = _gamma(cfg.alpha, (n,), gen), _gamma(cfg.alpha, (n,), gen)
        blend = (a / (a + b)).to(x.device, x.dtype).view(n, 1, 1, 1)  # [M, 1, 1, 1] Beta(alpha, alpha)
        mixed = torch.einsum("mk,kmchw->mchw", w, chains.view(k, n, *x.shape[1:]))  # [M, C, H, W]
        return ((1 - blend) * x + blend * mixed).clamp_(0.0, MAX_VALUE).contiguous()


@dataclass(frozen=True)
class NoAugmentation:
    """The ``augment: none`` option: train on clean images only (the modules receive ``None``)."""


def optional_augmentation(obj: AugMix | NoAugmentation | None) -> AugMix | None:
    """What the training modules take: an :class:`AugMix`, or ``None`` for no augmentation.

    Raises:
        TypeError: anything else (the config's ``_target_`` must build one of the two).
    """
    if obj is None or isinstance(obj, NoAugmentation):
        return None
    if isinstance(obj, AugMix):
        return obj
    raise TypeError(
        f"augment config built a {type(obj).__name__}; its _target_ must be "
        "fallbackformer.data.augment.AugMix or fallbackformer.data.augment.NoAugmentation"
    )
