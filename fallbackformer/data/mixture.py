"""Draws from a clean-plus-corruptions mixture: the distribution a router's guarantee covers.

Each image is drawn independently: kept clean with probability ``clean_weight``, else corrupted by
one corruption drawn uniformly from ``names`` at a severity drawn uniformly from ``severities``. One
draw per image keeps the samples i.i.d. from the mixture, which Learn-then-Test needs. Only tunable
corruptions may be named here: held-out ones are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fallbackformer.data.protocol import ShiftSuiteLike

__all__ = ["draw_mixture", "corrupted_copies"]


def draw_mixture(images: Tensor, names: Sequence[str], severities: Sequence[int], clean_weight: float,
                 seed: int, *, suite: ShiftSuiteLike) -> tuple[Tensor, list[str]]:
    """One i.i.d. draw per image from the mixture.

    Args:
        images: clean raw inputs ``[N, ...]``.
        names: tunable corruptions.
        severities: severities to draw from.
        clean_weight: probability that an image stays clean.
        seed: the draw's seed (the choice of corruption and the corruption's own randomness).
        suite: the shift suite whose ``corrupt`` applies each corruption (``held_out`` is refused).

    Returns:
        ``(images [N, ...], what each became: "clean" or "<name>/<severity>")``.
    """
    _check(names, clean_weight, suite)
    gen = torch.Generator().manual_seed(int(seed))
    n = images.shape[0]
    clean = torch.rand(n, generator=gen, dtype=torch.float64) < clean_weight
    which = torch.randint(len(names), (n,), generator=gen)
    sev = torch.tensor([int(s) for s in severities])[torch.randint(len(severities), (n,), generator=gen)]
    out = images.clone()
    kinds = ["clean"] * n
    for ci, name in enumerate(names):
        for s in sorted({int(v) for v in severities}):
            rows = torch.nonzero(~clean & (which == ci) & (sev == s)).flatten()
            if rows.numel() == 0:
                continue
            out[rows] = suite.corrupt(images[rows], name, s, seed=int(seed) * 7919 + ci * 31 + s)
            for r in rows.tolist():
                kinds[r] = f"{name}/{s}"
    return out, kinds


def corrupted_copies(images: Tensor, labels: Tensor, names: Sequence[str], severities: Sequence[int],
                     seed: int, *, suite: ShiftSuiteLike) -> tuple[Tensor, Tensor]:
    """The clean inputs followed by one corrupted copy per (name, severity): training data for a router."""
    _check(names, 0.0, suite)
    xs, ys = [images], [labels]
    for ci, name in enumerate(names):
        for s in severities:
            xs.append(suite.corrupt(images, name, int(s), seed=int(seed) * 7919 + ci * 31 + int(s)))
            ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def _check(names: Sequence[str], clean_weight: float, suite: ShiftSuiteLike) -> None:
    held = sorted(set(names) & set(suite.held_out))
    if held:
        raise ValueError(f"{held} are held-out corruptions: never draw them for fitting or calibration; "
                         f"use the suite's tunable ones: {list(suite.names)}")
    if not names:
        raise ValueError("names is empty: give at least one tunable corruption")
    if not 0.0 <= clean_weight <= 1.0:
        raise ValueError(f"clean_weight={clean_weight} must lie in [0, 1]")
