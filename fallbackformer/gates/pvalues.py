"""P-values for Learn-then-Test with a 0-1 loss, and the smallest count that can be certified.

Each grid threshold ``t`` states a null ``H_t: R(t) > alpha`` about the selective risk
``R(t) = P(wrong | score >= t)``. Given the number ``n`` of calibration samples that ``t`` accepts,
those samples are i.i.d. draws of ``(X, Y)`` conditioned on ``score >= t`` (the calibration set is
i.i.d. and acceptance depends on the sample only), so the number ``k`` of errors among them is
``Binomial(n, R(t))``. Two valid p-values follow:

``ltt_binom`` (the default): the exact binomial tail ``p = P(Binomial(n, alpha) <= k)``.
    Under ``H_t`` the law of ``k`` is ``Binomial(n, R)`` with ``R > alpha``, which stochastically
    dominates ``Binomial(n, alpha)``; so ``P(p <= u | n) <= P_alpha(F_alpha(k) <= u) <= u`` for
    every ``u``: the p-value is super-uniform conditionally on ``n``, hence unconditionally. It is
    the uniformly most powerful such test for a 0-1 loss and never larger than the HB p-value.

``ltt_hb``: the Hoeffding-Bentkus p-value of Learn-then-Test (Angelopoulos et al. 2021),
    ``min(exp(-n h(min(k/n, alpha), alpha)), e * P(Binomial(n, alpha) <= k))``. Valid for any loss
    bounded in ``[0, 1]``; for a 0-1 loss it is more conservative than the exact tail (the
    Hoeffding term bounds the tail from above, the Bentkus term carries a factor ``e``). Kept as an
    option, and for gates calibrated before ``ltt_binom`` became the default.

Both p-values are 1 when ``n == 0``. With no error among ``n`` accepted samples both equal
``(1 - alpha)^n`` (Hoeffding's term is exactly that), so the smallest accepted count that can be
certified at level ``delta``, :func:`min_accepted`, is the same for both methods:
``ceil(log(delta) / log(1 - alpha))``.

Everything here is pure torch (no scipy), vectorised, float64, and computed in log space.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LTT_METHODS", "binom_pvalue", "hb_min_samples", "hb_pvalue", "ltt_pvalues", "min_accepted"]

LTT_METHODS = ("ltt_binom", "ltt_hb")


_CHUNK_ELEMS = 1 << 22


def _log_binom_cdf(k: Tensor, n: Tensor, p: float) -> Tensor:
    """``log P(Binomial(n, p) <= k)`` for integer tensors ``k < n * p`` (same shape), float64.

    Exact sum of the pmf in log space over ``j = 0..k``; evaluated once per distinct ``(n, k)``
    pair, in chunks that keep memory bounded.
    """
    shape = k.shape
    k = k.flatten().long()
    n = n.flatten().long()
    out = torch.zeros(k.shape, dtype=torch.float64)
    if k.numel() == 0:
        return out.reshape(shape)
    kmax = int(k.max())
    key = n * (kmax + 1) + k
    uniq, inverse = torch.unique(key, return_inverse=True)
    un = (uniq // (kmax + 1)).double()
    uk = (uniq % (kmax + 1)).double()
    j = torch.arange(kmax + 1, dtype=torch.float64)  # [K]
    logp, log1mp = math.log(p), math.log1p(-p)
    res = torch.empty(uniq.shape, dtype=torch.float64)
    rows = max(1, _CHUNK_ELEMS // (kmax + 1))
    for a in range(0, uniq.numel(), rows):
        nn_ = un[a : a + rows, None]  # [R, 1]
        kk = uk[a : a + rows, None]
        logpmf = (
            torch.lgamma(nn_ + 1) - torch.lgamma(j + 1) - torch.lgamma((nn_ - j).clamp(min=0) + 1)
            + j * logp + (nn_ - j) * log1mp
        )  # [R, K]
        logpmf = torch.where(j <= kk, logpmf, torch.full_like(logpmf, -math.inf))
        res[a : a + rows] = torch.logsumexp(logpmf, dim=1)
    out = res[inverse]
    return out.reshape(shape)


def hb_pvalue(k: Tensor, n: Tensor, alpha: float) -> Tensor:
    """Hoeffding-Bentkus p-value for ``H0: R > alpha`` from ``k`` losses among ``n`` samples (binary loss).

    ``p = min(exp(-n h(min(k/n, alpha), alpha)), e * P(Binomial(n, alpha) <= k))`` with
    ``h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))`` (Bates et al. 2021, Learn then Test, eq. for
    ``p^HB``). When ``k >= n * alpha`` the p-value is 1 (the Hoeffding term is 1 and the Bentkus
    term is ``>= e/2``); when ``n == 0`` it is 1.

    Args:
        k: integer tensor of losses (errors).
        n: integer tensor of sample sizes, same shape.
        alpha: the risk level tested.

    Returns:
        float64 tensor of p-values in ``(0, 1]``, same shape.
    """
    k = torch.as_tensor(k).long()
    n = torch.as_tensor(n).long()
    k, n = torch.broadcast_tensors(k, n)
    p = torch.ones(k.shape, dtype=torch.float64)
    live = (n > 0) & (k.double() < n.double() * alpha)
    if not live.any():
        return p
    kl, nl = k[live], n[live]
    r = kl.double() / nl.double()
    a = torch.tensor(alpha, dtype=torch.float64)
    h = torch.xlogy(r, r / a) + torch.xlogy(1 - r, (1 - r) / (1 - a))
    log_hoeff = -nl.double() * h
    log_bent = 1.0 + _log_binom_cdf(kl, nl, alpha)
    p[live] = torch.minimum(log_hoeff, log_bent).exp().clamp(max=1.0)
    return p


def hb_min_samples(alpha: float, delta: float) -> int:
    """The smallest ``n`` for which ``n`` samples with no loss give an HB p-value ``<= delta``."""
    # with k = 0 both terms are (1 - alpha)^n (times e for Bentkus): Hoeffding is the smaller
    return max(1, math.ceil(math.log(delta) / math.log1p(-alpha) - 1e-12))


_WINDOW_SD, _WINDOW_PAD = 12.0, 64


def _binom_cdf_exact(k: Tensor, n: Tensor, p: float) -> Tensor:
    """``P(Binomial(n, p) <= k)`` for flat long tensors with ``0 <= k < n``, float64.

    The pmf is log-concave with its mode at ``m = floor((n + 1) p)``: left of ``m`` it increases,
    right of it it decreases. For ``k < m`` the lower tail is summed in log space over
    ``j = k - W .. k``; for ``k >= m`` the upper tail ``P(X >= k + 1)`` is summed over
    ``j = k + 1 .. k + 1 + W`` and the result is ``1 - upper`` (no cancellation: at or past the
    mode the lower tail is not small; the unit tests check it against scipy and exact sums). The window ``W = 12 sd + 64`` drops only terms more than about
    ``e^-70`` below the largest one (log-concavity: the decay away from the summed end is at least
    the Gaussian decay away from the mode), so the sum is exact to float64 precision at a cost of
    ``O(sqrt(n))`` terms per distinct ``(n, k)`` pair, whatever ``k``.
    """
    out = torch.empty(k.shape, dtype=torch.float64)
    if k.numel() == 0:
        return out
    key = n * (int(n.max()) + 1) + k
    uniq, inverse = torch.unique(key, return_inverse=True)
    un = uniq // (int(n.max()) + 1)
    uk = uniq % (int(n.max()) + 1)
    sd = torch.sqrt(un.double() * p * (1 - p))
    w = (_WINDOW_SD * sd).ceil().long() + _WINDOW_PAD  # [U]
    lower = uk < torch.floor((un + 1).double() * p).long()
    lo = torch.where(lower, (uk - w).clamp(min=0), uk + 1)  # first term summed
    hi = torch.where(lower, uk, torch.minimum(uk + 1 + w, un))  # last term summed
    width = int((hi - lo).max()) + 1
    logp, log1mp = math.log(p), math.log1p(-p)
    log_fact = torch.lgamma(torch.arange(int(un.max()) + 1, dtype=torch.float64) + 1)  # log(i!), a lookup
    res = torch.empty(uniq.shape, dtype=torch.float64)
    rows = max(1, _CHUNK_ELEMS // width)
    for a in range(0, uniq.numel(), rows):
        nn_ = un[a : a + rows, None]  # [R, 1]
        j = lo[a : a + rows, None] + torch.arange(width)  # [R, W]
        jc = torch.minimum(j, nn_)
        logpmf = (
            log_fact[nn_] - log_fact[jc] - log_fact[nn_ - jc] + jc.double() * logp + (nn_ - jc).double() * log1mp
        )  # [R, W]
        logpmf = torch.where(j <= hi[a : a + rows, None], logpmf, torch.full_like(logpmf, -math.inf))
        res[a : a + rows] = torch.logsumexp(logpmf, dim=1)
    res = torch.where(lower, res.exp(), -torch.expm1(res)).clamp(0.0, 1.0)
    return res[inverse]


def binom_pvalue(k: Tensor, n: Tensor, alpha: float) -> Tensor:
    """Exact binomial p-value for ``H0: R > alpha`` from ``k`` errors among ``n`` accepted samples.

    ``p = P(Binomial(n, alpha) <= k)``, the exact lower tail (see the module docstring for why it
    is valid given ``n``). Computed in log space from ``lgamma``: relative error about
    ``1e-10`` at ``n = 1e5``, and tails far below ``1e-300`` underflow to 0 rather than to NaN.

    Args:
        k: integer tensor of errors among the accepted samples, ``0 <= k <= n``.
        n: integer tensor of accepted counts, broadcastable with ``k``.
        alpha: the risk level tested, in ``(0, 1)``.

    Returns:
        float64 tensor of p-values in ``[0, 1]`` (1 where ``n == 0`` or ``k == n``), broadcast shape.

    >>> float(binom_pvalue(torch.tensor(0), torch.tensor(45), 0.05))  # (1 - 0.05) ** 45
    0.09944025698105716
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}.")
    k = torch.as_tensor(k).long()
    n = torch.as_tensor(n).long()
    k, n = torch.broadcast_tensors(k, n)
    bad = (k < 0) | (k > n)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"binom_pvalue needs 0 <= k <= n, got k={int(k.flatten()[i])}, n={int(n.flatten()[i])}: "
            "k counts the errors among the n accepted samples."
        )
    p = torch.ones(k.shape, dtype=torch.float64)
    live = k < n  # k == n (n == 0 included) gives exactly 1
    if live.any():
        p[live] = _binom_cdf_exact(k[live], n[live], alpha)
    return p


def ltt_pvalues(k: Tensor, n: Tensor, alpha: float, method: str = "ltt_binom") -> Tensor:
    """The Learn-then-Test p-values of ``H0: R > alpha`` for a 0-1 loss, by method name.

    Args:
        k: integer tensor of errors among the accepted samples.
        n: integer tensor of accepted counts, same shape.
        alpha: the risk level tested.
        method: ``ltt_binom`` (exact binomial tail, the default) or ``ltt_hb`` (Hoeffding-Bentkus).

    Returns:
        float64 p-values, same shape.
    """
    if method == "ltt_binom":
        return binom_pvalue(k, n, alpha)
    if method == "ltt_hb":
        return hb_pvalue(k, n, alpha)
    raise ValueError(f"unknown Learn-then-Test method {method!r}; choose one of {list(LTT_METHODS)}.")


def min_accepted(alpha: float, delta: float, method: str = "ltt_binom") -> int:
    """The smallest accepted count ``n`` whose p-value with no error is ``<= delta``.

    Below it no threshold can be certified, so the fixed sequence starts at the first grid
    threshold that accepts this many calibration samples. For both methods the p-value at
    ``k = 0`` is ``(1 - alpha)^n``, so the count is ``ceil(log(delta) / log(1 - alpha))``; the
    result is checked against the p-value function itself, so rounding can never make it off by one.

    Args:
        alpha: the risk level, in ``(0, 1)``.
        delta: the test level, in ``(0, 1)``.
        method: ``ltt_binom`` or ``ltt_hb``.

    Returns:
        The count (at least 1).
    """
    if method not in LTT_METHODS:
        raise ValueError(f"unknown Learn-then-Test method {method!r}; choose one of {list(LTT_METHODS)}.")
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"alpha and delta must lie in (0, 1), got alpha={alpha!r}, delta={delta!r}.")
    m = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    zero = torch.tensor(0)
    while m > 1 and float(ltt_pvalues(zero, torch.tensor(m - 1), alpha, method)) <= delta:
        m -= 1
    while float(ltt_pvalues(zero, torch.tensor(m), alpha, method)) > delta:
        m += 1
    return m
