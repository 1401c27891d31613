"""AugMix-style training augmentation over the TUNABLE corruptions of the shift suite.

AugMix (Hendrycks et al., "AugMix: A Simple Data Processing Method to Improve Robustness and
Uncertainty", ICLR 2020): ``width`` chains, each of ``depth_min..depth_max`` random operations at
random severities, are mixed with Dirichlet weights; the mixture is then blended with the original
image by a Beta-drawn weight:

    chain_k  = op_d(...op_1(x))                      k = 1..width, d ~ U{depth_min..depth_max}
    mixed    = sum_k w_k * chain_k                   w ~ Dirichlet(alpha, ..., alpha)
    augmix   = (1 - m) * x + m * mixed               m ~ Beta(alpha, alpha)

Here the operations are the tunable corruptions of the dataset's shift suite (any
:class:`~fallbackformer.data.protocol.ShiftSuiteLike`, applied through its ``corrupt``); the
suite's held-out corruptions are refused, so that they stay a measure of shift nobody trained,
calibrated or chose anything on. Without a suite, the digits suite is used.

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

from fallbackformer.data.protocol import ShiftSuiteLike

__all__ = ["AugMixConfig", "AugMix", "NoAugmentation", "check_operations", "optional_augmentation"]


def check_operations(operations: Sequence[str], suite: ShiftSuiteLike) -> tuple[str, ...]:
    """The operations as a tuple, after refusing held-out, unknown or no names.

    Args:
        operations: corruption names.
        suite: the shift suite they must come from (its tunable ``names``).

    Raises:
        ValueError: a held-out corruption (never to be used for fitting), an unknown name, or an
            empty list. The message names the bad value and the names that are allowed.
    """
    ops = tuple(str(o) for o in operations)
    tunable = list(suite.names)
    held = sorted(set(ops) & set(suite.held_out))
    if held:
        raise ValueError(
            f"augmentation operations {held} are HELD-OUT corruptions and must never be used for "
            f"fitting, calibration or choosing a setting; use the suite's tunable names: {tunable}"
        )
    unknown = sorted(set(ops) - set(tunable))
    if unknown:
        raise ValueError(f"unknown augmentation operations {unknown}; valid names: {tunable}")
    if not ops:
        raise ValueError(f"augmentation operations is empty; give at least one of {tunable}")
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
        operations: corruption names to draw from; tunable ones only (held-out names are refused
            when the :class:`AugMix` is built); ``None``: every tunable name of the suite.
        lambda_jsd: weight of the Jensen-Shannon consistency term in the training loss (read by the
            training modules: ``loss = clean loss + lambda_jsd * JSD(clean, augmix1, augmix2)``).
        lambda_views: weight of the supervised loss on the two AugMix views (their mean), added to the
            above; 0 (AugMix's recipe): the views only enter the JSD term.
        seed: seed of the augmentation's own generator.
    """

    width: int = 3
    depth_min: int = 1
    depth_max: int = 3
    severity_min: int = 1
    severity_max: int = 5
    alpha: float = 1.0
    operations: Sequence[str] | None = None
    lambda_jsd: float = 12.0
    lambda_views: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.operations is not None:
            object.__setattr__(self, "operations", tuple(str(o) for o in self.operations))
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
        if not self.lambda_views >= 0:
            raise ValueError(f"lambda_views must be >= 0, got {self.lambda_views}")


def _gamma(concentration: float, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Gamma(concentration, 1) samples drawn from ``gen`` (float64, CPU).

    ``torch.distributions`` takes no generator; ``torch._standard_gamma`` does (private, but stable
    since torch 1.x and what ``torch.distributions.Gamma`` itself calls).
    """
    return torch._standard_gamma(torch.full(shape, float(concentration), dtype=torch.float64), generator=gen)


class AugMix:
    """AugMix over a batch of raw inputs ``[N, ...]`` with the corruptions of a shift suite.

    Args:
        config: the settings (default: :class:`AugMixConfig()`).
        suite: the shift suite whose tunable corruptions are the operations (``None``: the digits
            suite, :class:`fallbackformer.data.shift.ShiftSuite`).

    Calling the object draws from its own generator (seeded with ``config.seed``) unless a
    generator is passed; :meth:`reset` re-seeds it.
    """

    def __init__(self, config: AugMixConfig | None = None, suite: ShiftSuiteLike | None = None) -> None:
        self.config = config if config is not None else AugMixConfig()
        if suite is None:
            from fallbackformer.data.shift import ShiftSuite

            suite = ShiftSuite()
        self.suite = suite
        self.operations = check_operations(
            self.config.operations if self.config.operations is not None else suite.names, suite)
        self.value_range: tuple[float, float] | None = getattr(suite, "value_range", None)
        self.generator = torch.Generator(device="cpu")
        self.reset()

    @property
    def lambda_jsd(self) -> float:
        """Weight of the JSD consistency term (``config.lambda_jsd``)."""
        return float(self.config.lambda_jsd)

    @property
    def lambda_views(self) -> float:
        """Weight of the supervised loss on the AugMix views (``config.lambda_views``)."""
        return float(self.config.lambda_views)

    def reset(self, seed: int | None = None) -> None:
        """Re-seed the own generator (with ``config.seed`` when ``seed`` is None)."""
        self.generator.manual_seed(int(self.config.seed if seed is None else seed))

    def __repr__(self) -> str:
        return f"AugMix({self.config})"

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One AugMix view of every input (see :meth:`views`); ``[N, ...]`` in, same shape out."""
        return self.views(images, 1, generator)[0]

    @torch.no_grad()
    def views(self, images: Tensor, count: int = 2, generator: torch.Generator | None = None) -> list[Tensor]:
        """``count`` independent AugMix views of every image, drawn in one vectorised pass.

        Args:
            images: ``[N, ...]`` floating point raw inputs (digits: ``[N, 1, 8, 8]`` in ``0..16``).
            count: number of views (the JSD consistency loss uses 2).
            generator: a CPU generator to draw from (default: the object's own).

        Returns:
            ``count`` tensors shaped like ``images``, same dtype and device, within the suite's
            ``value_range`` when it has one.

        Raises:
            ValueError: not a floating-point batch of at least 2 dimensions, or ``count < 1``.
        """
        if not isinstance(images, Tensor) or images.dim() < 2:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a batch [N, ...] of at least 2 dimensions, got {shape}; "
                             "add the batch dimension with x[None]")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point, got {images.dtype}; convert with images.float()")
        if count < 1:
            raise ValueError(f"count must be >= 1 (views per image), got {count}")
        if images.shape[0] == 0:
            return [images.clone() for _ in range(count)]
        gen = self.generator if generator is None else generator
        x = images.detach().repeat(count, *[1] * (images.dim() - 1))  # [V*N, ...], view-major
        return list(self._augmix(x, gen).chunk(count))

    def _augmix(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """AugMix of every row of ``x`` [M, ...] (rows are independent)."""
        cfg = self.config
        n, k = x.shape[0], cfg.width
        chains = x.repeat(k, *[1] * (x.dim() - 1))  # [K*M, ...], chain-major
        m = k * n
        depth = torch.randint(cfg.depth_min, cfg.depth_max + 1, (m,), generator=gen)  # [K*M]
        for step in range(cfg.depth_max):
            op = torch.randint(0, len(self.operations), (m,), generator=gen)  # [K*M]
            op = torch.where(depth > step, op, -1)  # -1: this chain has ended
            # One call per operation: a corruption's severity is a scalar, so each (step, operation)
            # group draws one severity (grouping by (operation, severity) costs 5x the calls).
            for o in torch.unique(op).tolist():  # sorted: the order of draws is fixed
                if o < 0:
                    continue
                severity = int(torch.randint(cfg.severity_min, cfg.severity_max + 1, (1,), generator=gen))
                seed = int(torch.randint(0, 2**62, (1,), generator=gen))  # the corruption's own randomness
                rows = (op == o).nonzero().squeeze(1).to(chains.device)  # [G]
                out = self.suite.corrupt(chains.index_select(0, rows), self.operations[o], severity, seed)
                chains.index_copy_(0, rows, out.to(chains.dtype))
        g = _gamma(cfg.alpha, (n, k), gen)
        w = (g / g.sum(dim=1, keepdim=True)).to(x.device, x.dtype)  # [M, K] Dirichlet(alpha)
        a, b = _gamma(cfg.alpha, (n,), gen), _gamma(cfg.alpha, (n,), gen)
        blend = (a / (a + b)).to(x.device, x.dtype).view(n, *[1] * (x.dim() - 1))  # [M, 1, ...] Beta(alpha, alpha)
        mixed = torch.einsum("mk,kmd->md", w, chains.reshape(k, n, -1)).view(x.shape)  # [M, ...]
        out = (1 - blend) * x + blend * mixed
        if self.value_range is not None:  # a convex blend stays in range up to rounding
            out = out.clamp_(*self.value_range)
        return out.contiguous()


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
