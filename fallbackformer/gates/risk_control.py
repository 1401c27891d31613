"""Threshold selection on calibration data (phase 1: the grid and the "empirical" method).

All functions are vectorised over a leading batch of independent calibration sets ("splits"):
``scores`` and ``errors`` are ``[S, N]`` (or ``[N]`` for one set).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fallbackformer.gates.scores import score_range

__all__ = [
    "acceptance_counts",
    "crc_threshold",
    "empirical_threshold",
    "select_threshold",
    "threshold_grid",
]

_GRID_U_MAX = 18.0


def threshold_grid(score: str, num_classes: int, size: int = 2000) -> Tensor:
    """A fixed, data-independent grid of thresholds, most conservative (highest) first.

    The grid is dense where confident scores pile up: ``t = hi - (hi - lo) * exp(-u)`` with ``u``
    evenly spaced on ``[0, 18]``, plus ``hi`` itself; values are float32 (the runtime dtype), so a
    threshold compares at serving time exactly as it did at calibration.

    Args:
        score: the score name (``max_softmax``, ``margin``, ``neg_entropy`` or ``learned``).
        num_classes: C.
        size: number of ``u`` points before float32 duplicates are merged.

    Returns:
        float32 ``[G]``, strictly decreasing.
    """
    lo, hi = score_range(score, num_classes)
    u = torch.linspace(0.0, _GRID_U_MAX, size, dtype=torch.float64)
    t = hi - (hi - lo) * torch.exp(-u)
    t = torch.cat([t, torch.tensor([hi], dtype=torch.float64)]).float()
    return torch.unique(t).flip(0)


def acceptance_counts(scores: Tensor, errors: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """How many calibration samples each threshold accepts, and how many of those are wrong.

    A sample is accepted at threshold ``t`` when ``score >= t``; NaN scores are never accepted.

    Args:
        scores: ``[S, N]`` or ``[N]`` float scores.
        errors: same shape, bool (True where the prediction is wrong).
        grid: ``[G]`` thresholds.

    Returns:
        ``(n, k)``, each long ``[S, G]`` (``[G]`` for 1-D input): accepted and accepted-and-wrong.
    """
    squeeze = scores.dim() == 1
    if squeeze:
        scores, errors = scores[None], errors[None]
    if scores.shape != errors.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and errors {tuple(errors.shape)} differ in shape.")
    s = torch.nan_to_num(scores.to(grid.dtype), nan=-math.inf)  # [S, N]
    s_sorted, order = s.sort(dim=1)  # ascending
    err_sorted = errors.gather(1, order).long()  # [S, N]
    prefix = torch.cat([torch.zeros_like(err_sorted[:, :1]), err_sorted.cumsum(1)], dim=1)  # [S, N+1]
    pos = torch.searchsorted(s_sorted.contiguous(), grid.expand(s.shape[0], -1).contiguous())  # [S, G]
    n = s.shape[1] - pos
    k = prefix[:, -1:] - prefix.gather(1, pos)
    if squeeze:
        return n[0], k[0]
    return n, k


def _select_lowest(ok: Tensor, grid: Tensor) -> Tensor:
    """Per row, the lowest grid threshold (largest index) where ``ok``; +inf where none."""
    g = ok.shape[-1]
    idx = torch.where(ok, torch.arange(g), torch.full_like(ok, -1, dtype=torch.long)).max(dim=-1).values
    thr = grid[idx.clamp(min=0)].to(torch.float64)
    return torch.where(idx >= 0, thr, torch.full_like(thr, math.inf))


def empirical_threshold(
    scores: Tensor, errors: Tensor, alpha: float, grid: Tensor
) -> Tensor:
    """The smallest grid threshold whose empirical selective risk on the calibration data is <= alpha.

    Carries NO statistical guarantee: on fresh data the selective risk exceeds ``alpha`` about half
    of the time. Use it for comparison, never for a contract.

    Returns:
        float64 ``[S]`` (a 0-dim tensor for 1-D input); +inf where no threshold qualifies.
    """
    n, k = acceptance_counts(scores, errors, grid)
    ok = (n > 0) & (k <= alpha * n)
    return _select_lowest(ok, grid)


def crc_threshold(scores: Tensor, errors: Tensor, alpha: float, grid: Tensor) -> Tensor:
    """Conformal risk control (Angelopoulos et al., 2022) for the loss ``1[accepted and wrong]``.

    The loss is bounded by ``B = 1`` and non-increasing in the threshold, so the smallest grid
    threshold with ``(k(t) + 1) / (N + 1) <= alpha`` (``k`` = accepted-and-wrong among all ``N``
    calibration samples) gives ``E[1[accepted and wrong]] <= alpha`` on a fresh exchangeable
    sample, in expectation over the calibration draw. Note the risk: the share of ALL requests that
    this gate answers wrongly (not the error rate among accepted answers).

    Returns:
        float64 ``[S]`` (0-dim for 1-D input); +inf where no grid threshold qualifies.
    """
    n, k = acceptance_counts(scores, errors, grid)
    total = scores.shape[-1]
    ok = (k + 1) <= alpha * (total + 1)
    # the loss is monotone, so the qualifying set is an upper interval of the grid; the
    # smallest threshold in that interval is the last index of the leading run of True
    run = ok.long().cumprod(dim=-1).bool()
    return _select_lowest(run, grid)


def select_threshold(
    scores: Tensor,
    errors: Tensor,
    alpha: float,
    delta: float,
    method: str,
    grid: Tensor,
) -> dict:
    """Choose one threshold for one calibration set and explain the choice.

    Returns:
        A dict with ``threshold`` (float, +inf when nothing qualifies), ``satisfied`` (bool),
        ``reason`` (str), ``risk`` (which risk is controlled) and ``kind`` (the guarantee's kind).
    """
    if method in ("empirical", "ltt_hb"):  # phase 1: ltt_hb routes to empirical until LTT lands
        thr = float(empirical_threshold(scores, errors, alpha, grid))
        ok = math.isfinite(thr)
        return {
            "threshold": thr,
            "satisfied": ok,
            "risk": "selective_risk",
            "kind": "none",
            "reason": (
                "empirical selective risk <= alpha on the calibration data; NO statistical guarantee"
                + (" (ltt_hb not implemented yet: routed to empirical)" if method == "ltt_hb" else "")
                if ok
                else "no threshold has empirical selective risk <= alpha on the calibration data; "
                "the gate accepts nothing"
            ),
        }
    if method == "crc":
        thr = float(crc_threshold(scores, errors, alpha, grid))
        ok = math.isfinite(thr)
        return {
            "threshold": thr,
            "satisfied": ok,
            "risk": "joint_error_rate",
            "kind": "expectation",
            "reason": (
                "conformal risk control: E[P(accepted and wrong)] <= alpha over calibration draws"
                if ok
                else f"conformal risk control: no threshold has (errors_accepted + 1) / (n_cal + 1) <= "
                f"alpha={alpha}; the gate accepts nothing"
            ),
        }
    raise ValueError(f"unknown method {method!r}; choose 'ltt_hb', 'crc' or 'empirical'.")
