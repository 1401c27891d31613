"""Temperature scaling (Guo et al., 2017) and light calibration metrics in pure torch.

``fit_temperature`` minimises the negative log-likelihood of ``softmax(logits / T)`` over ``log T``
with L-BFGS. ``T > 0`` divides every logit of a row by the same positive number, so the argmax
(the prediction) never changes; only the confidence does.

The metrics here (:func:`nll`, :func:`brier`) are dependency-free so that the gates stay importable
with torch alone. Calibration error is measured in one place, with torchmetrics:
:func:`fallbackformer.evaluation.metrics.ece`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "apply_temperature",
    "brier",
    "fit_temperature",
    "nll",
]

_T_MIN, _T_MAX = 1e-2, 1e2


def _validate(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}.")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be [N] with N={logits.shape[0]} to match the logits, got shape "
            f"{tuple(labels.shape)}."
        )
    if labels.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    logits, labels = logits.detach().cpu(), labels.detach().long().cpu()  # metrics run on the CPU
    c = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(
            f"labels must lie in [0, {c - 1}] for {c} classes, got range "
            f"[{int(labels.min())}, {int(labels.max())}]."
        )
    return logits, labels


def apply_temperature(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """``logits / T``; the argmax is unchanged for any ``T > 0``."""
    return logits / temperature


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """Fit the temperature that minimises the NLL of ``softmax(logits / T)``.

    Rows with a non-finite logit are ignored. The optimisation runs in float64 on ``log T``
    (so ``T`` stays positive) with L-BFGS and a strong-Wolfe line search; the result is clipped to
    ``[0.01, 100]``.

    Args:
        logits: ``[N, C]`` calibration logits (uncalibrated).
        labels: ``[N]`` integer class labels.
        max_iter: L-BFGS iterations.

    Returns:
        The temperature ``T`` as a Python float (1.0 when there is no finite row).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.randint(0, 3, (500,), generator=g)
    >>> z = 10 * torch.nn.functional.one_hot(y, 3).float() + torch.randn(500, 3, generator=g) * 4
    >>> fit_temperature(z, y) > 1.0   # over-confident logits get T > 1
    True
    """
    logits, labels = _validate(logits, labels)
    with torch.no_grad():
        finite = torch.isfinite(logits).all(dim=1)  # [N]
        z = logits[finite].detach().to("cpu", torch.float64)  # [M, C]
        y = labels[finite].cpu()
    if z.shape[0] == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
        tolerance_grad=1e-10, tolerance_change=1e-12,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, _T_MIN), _T_MAX)


def nll(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood (nats) over the rows with finite logits."""
    logits, labels = _validate(logits, labels)
    finite = torch.isfinite(logits).all(dim=1)
    if not finite.any():
        return float("nan")
    z = logits[finite].double()
    return float(torch.nn.functional.cross_entropy(z, labels[finite]))


def brier(logits: Tensor, labels: Tensor) -> float:
    """Multiclass Brier score: mean over rows of ``sum_c (p_c - 1[y=c])^2`` (finite rows only)."""
    logits, labels = _validate(logits, labels)
    finite = torch.isfinite(logits).all(dim=1)
    if not finite.any():
        return float("nan")
    p = torch.softmax(logits[finite].double(), dim=1)  # [M, C]
    onehot = torch.nn.functional.one_hot(labels[finite], p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(dim=1).mean())
