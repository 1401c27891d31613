"""Risk-controlled thresholds: Learn-then-Test (exact binomial or Hoeffding-Bentkus, fixed sequence), CRC, empirical.

A gate accepts a sample when its score is ``>= threshold``. The threshold is chosen on a
calibration split from a FIXED grid (:func:`threshold_grid`: it depends on the score and the number
of classes only, never on data), so each grid point is a hypothesis stated before the data is seen.

``ltt_binom`` (the default) and ``ltt_hb`` (Angelopoulos, Bates, Candes, Jordan, Lei 2021, "Learn then Test")
    Control the *selective risk* ``R(t) = P(wrong | score >= t)`` with high probability:
    ``P(R(t_hat) <= alpha) >= 1 - delta`` over the calibration draw. For each grid threshold ``t``
    the null ``H_t: R(t) > alpha`` is tested from the ``n(t)`` accepted calibration samples and the
    ``k(t)`` errors among them: given ``n(t)``, the accepted samples are i.i.d. from the law of
    ``(X, Y)`` given ``score >= t``, so ``k(t) ~ Binomial(n(t), R(t))``. ``ltt_binom`` uses the
    exact binomial tail ``P(Binomial(n, alpha) <= k)``, valid because that law is stochastically
    larger than ``Binomial(n, alpha)`` under the null, and the most powerful choice for a 0-1 loss;
    ``ltt_hb`` uses the Hoeffding-Bentkus p-value, valid for any bounded loss and more conservative
    here (:mod:`fallbackformer.gates.pvalues`). The nulls are tested by fixed-sequence testing from
    the most conservative threshold down, at level ``delta`` each, stopping at the first
    non-rejection; the chosen threshold is the last rejected one. Fixed-sequence testing controls
    the family-wise error at ``delta`` whatever the dependence between the p-values.

    Where the sequence starts: the highest thresholds accept almost nothing and can never be
    rejected (with ``n`` accepted samples and no error the p-value of either method is
    ``(1 - alpha)^n``, above ``delta`` until ``n >= n_min(alpha, delta)``,
    :func:`~fallbackformer.gates.pvalues.min_accepted`), so a sequence started at the very top
    would always stop at once. The sequence therefore starts at the most conservative grid
    threshold that accepts at least ``n_min`` calibration samples: a rule that reads the scores
    only, never the labels (the practice of Angelopoulos & Bates, "A Gentle Introduction to
    Conformal Prediction", section on selective classification). Strictly, LTT asks for a sequence
    fixed before any data is seen; the count-based start conditions on how many samples fall in
    the top region only, and the unit tests measure the resulting violation rate over thousands of
    random splits, for both methods.

``crc`` (Angelopoulos, Bates, Fisch, Lei, Schuster 2022, "Conformal Risk Control")
    Controls in expectation the *joint error rate* ``P(accepted and wrong)`` (the share of all
    requests answered wrongly by this gate), a monotone bounded loss, not the selective risk.

``empirical``
    The smallest threshold whose empirical selective risk is ``<= alpha``. No guarantee.

All functions are vectorised over a leading batch of independent calibration sets ("splits"):
``scores`` and ``errors`` are ``[S, N]`` (or ``[N]`` for one set).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fallbackformer.gates.pvalues import (
    LTT_METHODS,
    binom_pvalue,
    hb_min_samples,
    hb_pvalue,
    ltt_pvalues,
    min_accepted,
)
from fallbackformer.gates.scores import score_range

__all__ = [
    "LTT_METHODS",
    "PVALUE_NAMES",
    "PVALUE_SHORT",
    "acceptance_counts",
    "binom_pvalue",
    "fixed_sequence",
    "hb_min_samples",
    "hb_pvalue",
    "ltt_hb_threshold",
    "ltt_pvalues",
    "ltt_threshold",
    "min_accepted",
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


def fixed_sequence(pvalues: Tensor, delta: float, start: Tensor | None = None) -> Tensor:
    """Fixed-sequence testing along the last axis (index 0 = first hypothesis tested).

    Args:
        pvalues: ``[..., G]``.
        delta: the level of every test (and the family-wise error rate).
        start: optional long ``[...]``: the index where each sequence starts (hypotheses before it
            are not tested and not rejected).

    Returns:
        long ``[...]``: the index of the last rejected hypothesis of the run that begins at
        ``start``, or ``-1`` when the first tested hypothesis is not rejected.
    """
    g = pvalues.shape[-1]
    idx = torch.arange(g)
    if start is None:
        start = torch.zeros(pvalues.shape[:-1], dtype=torch.long)
    rej = pvalues <= delta
    before = idx < start[..., None]
    run = (rej | before).long().cumprod(dim=-1).bool() & ~before
    last = torch.where(run, idx, torch.full_like(idx, -1)).max(dim=-1).values
    return last


def _ltt_from_counts(
    n: Tensor, k: Tensor, alpha: float, delta: float, method: str = "ltt_binom"
) -> tuple[Tensor, Tensor, Tensor]:
    """LTT along the grid from counts ``n, k`` ``[S, G]``: ``(last, start, pvalues)``."""
    pv = ltt_pvalues(k, n, alpha, method)  # [S, G]
    n_min = min_accepted(alpha, delta, method)
    testable = n >= n_min  # nondecreasing along the grid (lower thresholds accept more)
    g = n.shape[-1]
    start = torch.where(testable, torch.arange(g), torch.full_like(n, g)).min(dim=-1).values
    last = fixed_sequence(pv, delta, start)
    last = torch.where(start < g, last, torch.full_like(last, -1))
    return last, start, pv


def ltt_threshold(
    scores: Tensor,
    errors: Tensor,
    alpha: float,
    delta: float,
    grid: Tensor,
    method: str = "ltt_binom",
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict]:
    """Learn-then-Test threshold for the selective risk (fixed-sequence testing down the grid).

    Args:
        scores: ``[S, N]`` or ``[N]`` calibration scores (NaN = never accepted).
        errors: same shape, bool.
        alpha: selective-risk target.
        delta: allowed failure probability.
        grid: ``[G]`` thresholds, most conservative first (:func:`threshold_grid`).
        method: the p-value: ``ltt_binom`` (exact binomial tail) or ``ltt_hb`` (Hoeffding-Bentkus).
        return_info: also return a dict of tensors explaining the choice.

    Returns:
        float64 ``[S]`` thresholds (0-dim for 1-D input), +inf where no threshold is certified;
        with ``return_info``, also ``{"n", "k", "pvalues", "start", "last", "n_min", "method"}``.
    """
    if method not in LTT_METHODS:
        raise ValueError(f"unknown Learn-then-Test method {method!r}; choose one of {list(LTT_METHODS)}.")
    n, k = acceptance_counts(scores, errors, grid)
    squeeze = n.dim() == 1
    if squeeze:
        n, k = n[None], k[None]
    last, start, pv = _ltt_from_counts(n, k, alpha, delta, method)
    thr = grid[last.clamp(min=0)].double()
    thr = torch.where(last >= 0, thr, torch.full_like(thr, math.inf))
    info = {"n": n, "k": k, "pvalues": pv, "start": start, "last": last,
            "n_min": min_accepted(alpha, delta, method), "method": method}
    if squeeze:
        thr = thr[0]
        info = {key: (v[0] if isinstance(v, Tensor) else v) for key, v in info.items()}
    return (thr, info) if return_info else thr


def ltt_hb_threshold(
    scores: Tensor,
    errors: Tensor,
    alpha: float,
    delta: float,
    grid: Tensor,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict]:
    """:func:`ltt_threshold` with the Hoeffding-Bentkus p-value (``method="ltt_hb"``)."""
    return ltt_threshold(scores, errors, alpha, delta, grid, "ltt_hb", return_info)


#: how a guarantee's reason names each LTT p-value, in full and short
PVALUE_NAMES = {"ltt_binom": "exact binomial", "ltt_hb": "Hoeffding-Bentkus"}
PVALUE_SHORT = {"ltt_binom": "binomial", "ltt_hb": "HB"}


def _ltt_explain(info: dict, alpha: float, delta: float, what: str) -> dict:
    """The guarantee fields for one LTT run (1-D info from :func:`ltt_threshold`)."""
    n, k, pv, method = info["n"], info["k"], info["pvalues"], info["method"]
    start, last, n_min = int(info["start"]), int(info["last"]), info["n_min"]
    g = n.shape[-1]
    out: dict = {"risk": "selective_risk", "kind": "high_probability", "n_min": n_min}
    statement = (
        f"with probability >= {1 - delta:g} over the calibration draw, the {what} "
        f"(error rate among accepted answers) is <= {alpha:g}"
    )
    if start >= g:
        out.update(satisfied=False, reason=(
            f"no grid threshold accepts the {n_min} calibration samples needed to certify "
            f"selective risk <= {alpha:g} at delta={delta:g} (largest accepted count "
            f"{int(n.max()) if n.numel() else 0}); calibrate on more data or raise alpha/delta. "
            "The gate accepts nothing."))
        return out
    if last < 0:
        out.update(satisfied=False, p_value_first=float(pv[start]), reason=(
            f"the most conservative testable threshold (accepting {int(n[start])} calibration "
            f"samples, {int(k[start])} wrong) has {PVALUE_SHORT[method]} p-value {float(pv[start]):.3g} > "
            f"delta={delta:g}: selective risk <= {alpha:g} cannot be certified. The gate accepts "
            "nothing."))
        return out
    out.update(
        satisfied=True,
        p_value=float(pv[last]),
        n_tested=last - start + 1,
        reason=f"Learn-then-Test ({PVALUE_NAMES[method]} p-value, fixed sequence over {g} fixed thresholds): "
        + statement,
    )
    return out


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
    if method in LTT_METHODS:
        thr_t, info = ltt_threshold(scores, errors, alpha, delta, grid, method, return_info=True)
        return {"threshold": float(thr_t), **_ltt_explain(info, alpha, delta, "selective risk")}
    if method == "empirical":
        thr = float(empirical_threshold(scores, errors, alpha, grid))
        ok = math.isfinite(thr)
        return {
            "threshold": thr,
            "satisfied": ok,
            "risk": "selective_risk",
            "kind": "none",
            "reason": (
                "empirical selective risk <= alpha on the calibration data; NO statistical guarantee"
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
    raise ValueError(f"unknown method {method!r}; choose one of {[*LTT_METHODS, 'crc', 'empirical']}.")
