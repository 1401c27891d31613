"""Runtime calibration checks: a sequential two-sample test on gate scores, and an input range check.

Every guarantee of the gates assumes that serving data looks like calibration data. This module
watches that assumption.

``ScoreDriftMonitor``: the design of the sequential test
--------------------------------------------------------
The monitor keeps the last ``window`` finite scores of the stream. Once the window is full it
looks every ``check_every`` requests: a two-sample Kolmogorov-Smirnov test of the window against
the calibration-time reference sample. Looking repeatedly at a stream multiplies the chances of a
false alarm, so the level is controlled **family-wise over the looks of a horizon**: a stream of
``horizon`` requests (counted from the last :meth:`reset`) holds at most
``L = floor((horizon - window) / check_every) + 1`` looks, and each look is tested at level
``level / L`` (Bonferroni). Hence a clean stream of ``horizon`` requests raises a false alarm with
probability at most ``level``, whatever the (strong, positive) dependence between overlapping
windows; Bonferroni is conservative here and the measured rate is well below ``level``. Beyond the
horizon the monitor keeps looking at the same per-look level: each further block of ``horizon``
requests again has false-alarm probability ``<= level``.

The KS p-value uses the asymptotic Kolmogorov distribution with Stephens' small-sample correction
``lambda = (sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) * D``, ``ne = n m / (n + m)``; the test reduces to
comparing ``D`` with a critical value fixed at construction. The reference is a quantile summary
(:func:`~fallbackformer.gates.gate.reference_sample`); by default its size counts as the reference
sample size, which is conservative when the summary stands for more calibration scores. Ties
(saturated scores) make the KS test conservative too.

Detection delay: after a switch to a shifted score distribution the window fills with shifted
scores at one per request; with KS distance ``D_shift`` between the two laws, the window's
distance grows like ``D_shift * t / window`` after ``t`` requests. The defaults (``window=100``,
``check_every=25``, ``level=0.01``, ``horizon=5000``: 197 looks at level 5.1e-5 each)
detect a severe corruption within 200 requests in nearly every run while keeping the
false-alarm rate of a clean 5000-request stream far below 1% (the unit tests measure both).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "InputRangeCheck",
    "ScoreDriftMonitor",
    "ks_critical_value",
    "ks_from_counts",
    "ks_pvalue",
    "ks_statistic",
]


def ks_statistic(reference: Tensor, samples: Tensor) -> Tensor:
    """Two-sample KS distance between a reference ``[n]`` and each row of ``samples`` ``[R, m]``.

    Exact ``sup_x |F_ref(x) - F_row(x)|`` with right-continuous empirical CDFs (ties allowed),
    in ``O(R m log n)``: both CDFs are step functions, so the supremum is reached at a sample
    point of the row, either at the point (``i/m - F_ref(x_(i))``) or just before it
    (``F_ref(x_(i)-) - (i-1)/m``).

    Returns:
        float64 ``[R]`` (0-dim for a 1-D ``samples``).
    """
    squeeze = samples.dim() == 1
    if squeeze:
        samples = samples[None]
    ref = reference.double().sort().values.contiguous()
    w = samples.double().sort(dim=1).values.contiguous()  # [R, m]
    right = torch.searchsorted(ref, w, right=True)  # [R, m] count of ref <= x
    left = torch.searchsorted(ref, w, right=False)  # count of ref < x
    d = ks_from_counts(right, left, ref.shape[0])
    return d[0] if squeeze else d


def ks_from_counts(right: Tensor, left: Tensor, n: int) -> Tensor:
    """KS distance from the reference counts at a row's SORTED sample points ``[R, m]``.

    ``right`` / ``left``: how many reference values are ``<=`` / ``<`` each point (``searchsorted`` of
    the sorted reference, ``right=True`` / ``False``); ``n``: the reference size. The building block of
    :func:`ks_statistic`, public so that a replay can count once and slide windows over the counts.
    """
    m = right.shape[-1]
    i = torch.arange(1, m + 1, dtype=torch.float64)
    above = i / m - right.double() / n  # F_row(x_(i)) - F_ref(x_(i)), largest at the last tie
    below = left.double() / n - (i - 1) / m  # F_ref(x_(i)-) - F_row(x_(i)-)
    return torch.maximum(above, below).amax(dim=-1).clamp(min=0.0)


def _kolmogorov_sf(lam: Tensor) -> Tensor:
    """``Q_KS(lambda) = 2 sum_{j>=1} (-1)^{j-1} exp(-2 j^2 lambda^2)`` (1 for small lambda)."""
    lam = lam.double()
    j = torch.arange(1, 101, dtype=torch.float64)
    terms = 2 * ((-1.0) ** (j - 1)) * torch.exp(-2 * j**2 * lam[..., None] ** 2)
    q = terms.sum(dim=-1)
    return torch.where(lam < 0.2, torch.ones_like(q), q.clamp(0.0, 1.0))


def ks_pvalue(d: Tensor | float, n: int, m: int) -> Tensor:
    """Asymptotic two-sample KS p-value (Stephens' correction) for distance ``d``, sizes ``n, m``."""
    ne = n * m / (n + m)
    en = math.sqrt(ne)
    return _kolmogorov_sf((en + 0.12 + 0.11 / en) * torch.as_tensor(d, dtype=torch.float64))


def ks_critical_value(level: float, n: int, m: int) -> float:
    """The smallest ``D`` whose :func:`ks_pvalue` is ``<= level`` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(ks_pvalue(mid, n, m)) <= level:
            hi = mid
        else:
            lo = mid
    return hi


class ScoreDriftMonitor:
    """Sequential KS test of a stream of gate scores against a calibration-time reference.

    Args:
        reference_scores: calibration-time scores, e.g. ``gate.reference_scores`` of the first
            gate of the cascade (the only gate that sees every request).
        window: number of most recent scores tested.
        level: family-wise false-alarm probability over ``horizon`` requests.
        check_every: requests between two looks (once the window is full).
        horizon: stream length over which ``level`` holds (see the module docstring).
        reference_size: the sample size the reference stands for (default: its length; a larger
            value, e.g. the calibration size, makes the test more sensitive).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> monitor = ScoreDriftMonitor(torch.rand(512, generator=g))
    >>> monitor.update(torch.rand(1000, generator=g))        # clean
    False
    >>> monitor.update(torch.rand(300, generator=g) ** 4)    # shifted toward 0
    True
    """

    def __init__(
        self,
        reference_scores: Tensor,
        window: int = 100,
        level: float = 0.01,
        check_every: int = 25,
        horizon: int = 5000,
        reference_size: int | None = None,
    ) -> None:
        ref = torch.as_tensor(reference_scores, dtype=torch.float64).flatten()
        ref = ref[torch.isfinite(ref)].sort().values
        if ref.numel() < 10:
            raise ValueError(
                f"the drift reference needs at least 10 finite scores, got {ref.numel()}; "
                "calibrate the gate on more data (gate.reference_scores)."
            )
        if window < 10:
            raise ValueError(f"window must be >= 10, got {window}.")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}.")
        if horizon < window:
            raise ValueError(f"horizon ({horizon}) must be >= window ({window}).")
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1), got {level}.")
        self.reference = ref
        self.window = int(window)
        self.level = float(level)
        self.check_every = int(check_every)
        self.horizon = int(horizon)
        self.reference_size = int(reference_size) if reference_size is not None else ref.numel()
        self.looks_per_horizon = (self.horizon - self.window) // self.check_every + 1
        self.level_per_look = self.level / self.looks_per_horizon
        self.critical_value = ks_critical_value(self.level_per_look, self.reference_size, self.window)
        self.reset()

    def reset(self) -> None:
        """Forget the stream (e.g. after recalibration); counters start again from zero."""
        self._buf = torch.empty(0, dtype=torch.float64)
        self.n_seen = 0
        self.n_nonfinite = 0
        self.n_checks = 0
        self.n_alarms = 0
        self.drifted = False
        self.last_statistic: float | None = None
        self.last_pvalue: float | None = None
        self.first_alarm_at: int | None = None

    def update(self, scores: Tensor) -> bool:
        """Add a batch of scores ``[B]``; True when a look in this update rejects.

        NaN scores (non-finite logits) are counted in ``n_nonfinite`` and not tested (they have
        their own fallback reason). A batch that crosses several look points triggers one look
        on the latest window, which only lowers the false-alarm rate.
        """
        s = torch.as_tensor(scores).detach().flatten().to("cpu", torch.float64)
        fin = torch.isfinite(s)
        self.n_nonfinite += int((~fin).sum())
        s = s[fin]
        if s.numel() == 0:
            return False
        before = self.n_seen
        self.n_seen += s.numel()
        self._buf = torch.cat([self._buf, s])[-self.window :]
        if self.n_seen < self.window:
            return False
        # look points: n_seen = window + j * check_every
        last_look = (self.n_seen - self.window) // self.check_every
        prev_look = (before - self.window) // self.check_every if before >= self.window else -1
        if last_look == prev_look:
            return False
        d = float(ks_statistic(self.reference, self._buf))
        self.n_checks += 1
        self.last_statistic = d
        self.last_pvalue = float(ks_pvalue(d, self.reference_size, self.window))
        if d >= self.critical_value:
            self.n_alarms += 1
            if not self.drifted:
                self.first_alarm_at = self.n_seen
            self.drifted = True
            return True
        return False

    def state(self) -> dict[str, Any]:
        """Counters and settings, JSON-able (for events and metrics)."""
        return {
            "n_seen": self.n_seen,
            "n_nonfinite": self.n_nonfinite,
            "n_checks": self.n_checks,
            "n_alarms": self.n_alarms,
            "drifted": self.drifted,
            "first_alarm_at": self.first_alarm_at,
            "last_statistic": self.last_statistic,
            "last_pvalue": self.last_pvalue,
            "window": self.window,
            "level": self.level,
            "check_every": self.check_every,
            "horizon": self.horizon,
            "level_per_look": self.level_per_look,
            "critical_value": self.critical_value,
        }

    def __repr__(self) -> str:
        return (
            f"ScoreDriftMonitor(window={self.window}, level={self.level}, check_every={self.check_every}, "
            f"horizon={self.horizon}, n_seen={self.n_seen}, n_alarms={self.n_alarms})"
        )


class InputRangeCheck(nn.Module):
    """Per-feature range of the calibration inputs; flags requests with a feature outside it.

    Args:
        low: per-feature minimum (the input shape without the batch dimension).
        high: per-feature maximum, same shape.
        margin: tolerance as a fraction of each feature's range (0 = exact calibration range).

    >>> import torch
    >>> check = InputRangeCheck.fit(torch.rand(100, 1, 8, 8) * 16)
    >>> check(torch.full((2, 1, 8, 8), 8.0)).tolist(), check(torch.full((1, 1, 8, 8), 99.0)).tolist()
    ([False, False], [True])
    """

    low: Tensor
    high: Tensor

    def __init__(self, low: Tensor, high: Tensor, margin: float = 0.0) -> None:
        super().__init__()
        if low.shape != high.shape:
            raise ValueError(f"low {tuple(low.shape)} and high {tuple(high.shape)} must have the same shape.")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}.")
        self.register_buffer("low", low.detach().float().clone())
        self.register_buffer("high", high.detach().float().clone())
        self.margin = float(margin)

    @classmethod
    def fit(cls, x: Tensor, margin: float = 0.0) -> "InputRangeCheck":
        """Ranges from calibration inputs ``x`` ``[N, ...]`` (non-finite values ignored)."""
        if x.shape[0] == 0:
            raise ValueError("cannot fit an input range on an empty batch.")
        xf = x.detach().float()
        fin = torch.isfinite(xf)
        low = torch.where(fin, xf, torch.full_like(xf, math.inf)).amin(dim=0)
        high = torch.where(fin, xf, torch.full_like(xf, -math.inf)).amax(dim=0)
        return cls(low, high, margin)

    def forward(self, x: Tensor) -> Tensor:
        """BoolTensor ``[B]``: True where any feature is outside the (widened) calibration range
        or not finite."""
        if tuple(x.shape[1:]) != tuple(self.low.shape):
            raise ValueError(
                f"input feature shape {tuple(x.shape[1:])} does not match the calibration range "
                f"{tuple(self.low.shape)}."
            )
        xf = x.float()
        pad = self.margin * (self.high - self.low)
        outside = (xf < self.low - pad) | (xf > self.high + pad) | ~torch.isfinite(xf)
        return outside.flatten(1).any(dim=1)

    def to_config(self) -> dict[str, Any]:
        return {"low": self.low.tolist(), "high": self.high.tolist(), "margin": self.margin}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "InputRangeCheck":
        return cls(torch.tensor(config["low"]), torch.tensor(config["high"]), float(config.get("margin", 0.0)))
