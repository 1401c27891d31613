"""A shift suite for tabular data ``[N, D]``: noise, missing values, scale drift, subpopulation shift.

Four shifts at five severities (1 mild .. 5 harsh), each deterministic for ``(seed, name, severity)``
through a private ``torch.Generator`` (never the global RNG):

* ``feature_noise``: Gaussian noise on every feature, ``sigma = s * std_j`` with ``s`` in
  :data:`NOISE_SCALES` (``std_j`` the feature's standard deviation on the training split).
* ``missing_features``: each value is missing with probability :data:`MISSING_RATES` and imputed
  with the feature's training mean (what a pipeline with mean imputation would serve).
* ``scale_drift``: a group of features (``drift_features``) is multiplied by :data:`DRIFT_FACTORS`,
  like a unit or calibration change of one instrument.
* ``subpopulation``: the test split resampled, with replacement, toward the upper tail of one
  feature (weights ``exp(beta * z)``, ``z`` the standardised feature, ``beta`` in
  :data:`SUBPOPULATION_BETAS`). It moves whole rows, labels included, so it exists only as a set
  (:meth:`TabularShiftSuite.build`); :meth:`TabularShiftSuite.corrupt` refuses it. It is held out by
  default: nothing is tuned on it.

>>> import torch
>>> suite = TabularShiftSuite(mean=[0.0, 0.0], std=[1.0, 1.0], drift_features=[1])
>>> suite.corrupt(torch.zeros(3, 2), "scale_drift", 5, seed=0).shape
torch.Size([3, 2])
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fallbackformer.data.protocol import parse_set_key, set_key

__all__ = ["TABULAR_SHIFTS", "TabularShiftSuite"]

TABULAR_SHIFTS = ("feature_noise", "missing_features", "scale_drift", "subpopulation")
SET_LEVEL = frozenset({"subpopulation"})
"""Shifts that resample rows (labels follow), so they exist only as built sets."""

NOISE_SCALES = (0.1, 0.25, 0.5, 0.75, 1.0)
MISSING_RATES = (0.05, 0.1, 0.2, 0.3, 0.5)
DRIFT_FACTORS = (1.1, 1.25, 1.5, 2.0, 3.0)
SUBPOPULATION_BETAS = (0.5, 1.0, 1.5, 2.0, 3.0)
TABULAR_SHIFT_VERSION = 1


def _generator(seed: int, name: str, severity: int) -> torch.Generator:
    digest = hashlib.sha256(f"fallbackformer.tabular_shift/{int(seed)}/{name}/{int(severity)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


@dataclass
class TabularShiftSuite:
    """The tabular shift suite (a :class:`~fallbackformer.data.protocol.ShiftSuiteLike`).

    Attributes:
        mean: per-feature mean of the TRAINING split ``[D]`` (imputation, standardisation).
        std: per-feature standard deviation of the training split ``[D]`` (noise scale).
        names: tunable shifts (used by the router's mixture and AugMix, and evaluated).
        held_out: shifts evaluated but never used to fit or choose anything.
        severities: severities built per shift, each in 1..5.
        seed: the suite's seed.
        drift_features: feature indices that ``scale_drift`` multiplies.
        subpopulation_feature: the feature whose upper tail ``subpopulation`` resamples toward.
    """

    mean: Sequence[float]
    std: Sequence[float]
    names: Sequence[str] = ("feature_noise", "missing_features", "scale_drift")
    held_out: Sequence[str] = ("subpopulation",)
    severities: Sequence[int] = (1, 2, 3, 4, 5)
    seed: int = 0
    drift_features: Sequence[int] = field(default_factory=list)
    subpopulation_feature: int = 0

    def __post_init__(self) -> None:
        self.names, self.held_out = [str(n) for n in self.names], [str(n) for n in self.held_out]
        self.severities = [int(s) for s in self.severities]
        self._mean = torch.as_tensor(list(self.mean), dtype=torch.float32)  # [D]
        self._std = torch.as_tensor(list(self.std), dtype=torch.float32).clamp_min(1e-6)  # [D]
        if self._mean.dim() != 1 or self._mean.shape != self._std.shape:
            raise ValueError(f"mean and std must be 1-D of one length; got {len(self.mean)} and {len(self.std)}")
        d = self._mean.shape[0]
        for n in self.all_names:
            if n not in TABULAR_SHIFTS:
                raise KeyError(f"unknown tabular shift {n!r}; valid names: {list(TABULAR_SHIFTS)}")
        both = set(self.names) & set(self.held_out)
        if both:
            raise ValueError(f"shifts {sorted(both)} are both tunable and held out; list each in one place")
        tunable_set_level = sorted(set(self.names) & SET_LEVEL)
        if tunable_set_level:
            raise ValueError(f"{tunable_set_level} resample rows and cannot be drawn per sample for tuning; "
                             "list them under held_out")
        for s in self.severities:
            _check_severity(s)
        self.drift_features = [int(i) for i in self.drift_features] or list(range(d))
        bad = [i for i in [*self.drift_features, int(self.subpopulation_feature)] if not 0 <= i < d]
        if bad:
            raise ValueError(f"feature indices {bad} are outside 0..{d - 1}; the data has {d} features")

    @property
    def all_names(self) -> list[str]:
        """Tunable names then held-out names."""
        return [*self.names, *self.held_out]

    def is_held_out(self, key: str) -> bool:
        """Whether a set key (``"subpopulation/3"``) or shift name is held out."""
        parsed = parse_set_key(key)
        return (parsed[0] if parsed else key) in self.held_out

    def corrupt(self, x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
        """Apply one per-sample shift to raw features ``x`` ``[N, D]``; same shape and dtype.

        Raises:
            KeyError: a name outside the suite.
            ValueError: a set-level shift (``subpopulation``: use :meth:`build`), a bad severity or shape.
        """
        if name not in self.all_names:
            raise KeyError(f"shift {name!r} is not in this suite; its names are {self.all_names}")
        if name in SET_LEVEL:
            raise ValueError(f"{name!r} resamples rows (labels follow), so it has no per-sample form; "
                             "build its sets with suite.build(x, y)")
        _check_severity(severity)
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self._mean.shape[0]:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [N, {self._mean.shape[0]}] raw features, got {shape}")
        gen = _generator(seed, name, int(severity))
        i = int(severity) - 1
        mean, std = self._mean.to(x.device, x.dtype), self._std.to(x.device, x.dtype)
        with torch.no_grad():
            if name == "feature_noise":
                noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
                return (x + noise * NOISE_SCALES[i] * std).contiguous()
            if name == "missing_features":
                missing = torch.rand(x.shape, generator=gen, dtype=torch.float64).to(x.device) < MISSING_RATES[i]
                return torch.where(missing, mean.expand_as(x), x).contiguous()
            out = x.clone()  # scale_drift
            cols = torch.tensor(self.drift_features, device=x.device)
            out[:, cols] = x[:, cols] * DRIFT_FACTORS[i]
            return out

    def resample(self, x: Tensor, y: Tensor, severity: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """The subpopulation shift: ``len(y)`` rows drawn with replacement toward one feature's upper tail."""
        _check_severity(severity)
        j = int(self.subpopulation_feature)
        z = (x[:, j].double() - float(self._mean[j])) / float(self._std[j])  # [N]
        weights = torch.exp(SUBPOPULATION_BETAS[int(severity) - 1] * (z - z.max()))
        idx = torch.multinomial(weights, len(y), replacement=True, generator=_generator(seed, "subpopulation", severity))
        return x[idx].contiguous(), y[idx].contiguous()

    def build(self, images: Tensor, labels: Tensor, include_held_out: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"<shift>/<severity>": (inputs, labels)}`` from a clean split (the test split).

        Args:
            images: raw features ``[N, D]``.
            labels: ``[N]``.
            include_held_out: pass ``False`` when tuning.
        """
        if labels.shape[:1] != images.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match inputs {tuple(images.shape)}: one label per row")
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for name in self.all_names if include_held_out else self.names:
            for s in self.severities:
                if name in SET_LEVEL:
                    out[set_key(name, s)] = self.resample(images, labels, s, self.seed)
                else:
                    out[set_key(name, s)] = (self.corrupt(images, name, s, self.seed), labels)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (for reports and manifests)."""
        return {"kind": "tabular", "names": list(self.names), "held_out": list(self.held_out),
                "severities": list(self.severities), "seed": int(self.seed),
                "drift_features": list(self.drift_features), "subpopulation_feature": int(self.subpopulation_feature),
                "version": TABULAR_SHIFT_VERSION}


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
