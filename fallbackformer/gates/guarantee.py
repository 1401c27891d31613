"""``Guarantee``: what a calibration certified, as one typed value.

A gate (:meth:`ConfidenceGate.calibrate`), the cascade's common threshold
(:func:`~fallbackformer.gates.system.calibrate_system`) and the router
(:func:`~fallbackformer.gates.router_calibration.certify`) all state their result with
:func:`certified`, and every reader takes the attributes: ``risk`` (what is bounded), ``alpha``,
``delta``, ``method``, ``n`` (the calibration size), ``covers`` (the distribution the statement
holds on), ``statement``, ``threshold``, ``satisfied`` and its ``reason``.

The JSON form (:meth:`Guarantee.to_dict`, :meth:`Guarantee.from_dict`) is the one bundle manifests of
format 1 and 2 already hold, key for key: ``n`` is stored as ``n_cal``, ``coverage`` as
``coverage_cal``, ``selective_risk`` as ``selective_risk_cal``, every other measured figure
(``details``) under its own key. ``covers`` and ``statement`` are stored unless the guarantee was
certified on the plain calibration split (:data:`CALIBRATION_SPLIT`) and states the standard
sentence, which :func:`statement` rebuilds from the other fields; so a gate's entry in a manifest is
unchanged, and a router's keeps its mixture.

>>> g = certified(alpha=0.05, delta=0.1, method="ltt_binom", n=500, threshold=0.9, satisfied=True,
...               reason="certified", risk="selective_risk", kind="high_probability")
>>> g.statement
'With probability >= 0.90 over the calibration draw, the selective risk (errors among accepted answers) is <= 0.05, for requests drawn like the calibration split. It says nothing about shifted inputs.'
>>> Guarantee.from_dict(g.to_dict()) == g
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fallbackformer.common.jsonsafe import parse_json_float

__all__ = ["CALIBRATION_SPLIT", "Guarantee", "certified", "statement"]

#: ``covers`` of a guarantee certified on the clean calibration split (no corruption drawn)
CALIBRATION_SPLIT: Mapping[str, Any] = MappingProxyType({"clean_weight": 1.0, "corruptions": (), "severities": ()})

_RISK_TEXT = {
    "selective_risk": "selective risk (errors among accepted answers)",
    "joint_error_rate": "share of requests answered wrongly",
}
# keys of the JSON form that are attributes (the rest are details)
_CORE = ("alpha", "delta", "method", "risk", "kind", "threshold", "n_cal", "coverage_cal", "selective_risk_cal",
         "satisfied", "reason", "covers", "statement")


def _covers(covers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A fresh copy of ``covers`` (of :data:`CALIBRATION_SPLIT` when ``None``), sequences as lists."""
    src = CALIBRATION_SPLIT if covers is None else covers
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in src.items()}


def _kind_of(method: str) -> str:
    return {"crc": "expectation", "empirical": "none"}.get(method, "high_probability")


def _risk_of(method: str) -> str:
    return "joint_error_rate" if method == "crc" else "selective_risk"


def statement(risk: str, kind: str, alpha: float, delta: float | None, covers: Mapping[str, Any]) -> str:
    """The sentence a guarantee states: what is bounded, how surely, and on which requests."""
    names = list(covers.get("corruptions") or [])
    if names:  # a mixture of clean and corrupted requests (the router's calibration draw)
        return (f"With probability >= {1 - (delta or 0.0):.2f} over the calibration draw, at most {alpha:.0%} of the "
                f"answers given are wrong, for requests drawn like the calibration mixture: clean with probability "
                f"{covers.get('clean_weight')}, else one of {len(names)} corruptions ({', '.join(names)}) at "
                f"severities {covers.get('severities')}. It says nothing about other shifts (for example the "
                "held-out corruptions).")
    what = f"the {_RISK_TEXT.get(risk, risk)} is <= {alpha:g}, for requests drawn like the calibration split"
    if kind == "expectation":
        return f"In expectation over calibration draws, {what}. It says nothing about shifted inputs."
    if kind == "none":
        return f"On the calibration split {what}: an observation, NOT a statistical guarantee."
    return (f"With probability >= {1 - (delta or 0.0):.2f} over the calibration draw, {what}. It says nothing "
            "about shifted inputs.")


@dataclass(frozen=True)
class Guarantee:
    """What a calibration certified (see the module docstring); build one with :func:`certified`.

    Attributes:
        alpha: the bound on the risk.
        delta: the probability that the bound fails over the calibration draw (``None``: not a
            high-probability statement).
        method: ``ltt_binom``, ``ltt_hb``, ``crc`` or ``empirical``.
        n: calibration samples.
        risk: what is bounded (``selective_risk``, ``joint_error_rate``, or a description).
        kind: ``high_probability``, ``expectation`` or ``none`` (empirical: no guarantee).
        threshold: the threshold it certifies (``inf``: nothing could be; the path accepts nothing).
        satisfied: whether a threshold could be certified.
        reason: why (or why not), in words.
        covers: the distribution the statement holds on (:data:`CALIBRATION_SPLIT` by default).
        statement: the sentence it states (:func:`statement` by default).
        coverage: share of calibration samples accepted or answered at ``threshold``.
        selective_risk: error rate among them (``None`` when none).
        details: every other measured figure, by its manifest key (``n_min``, ``p_value``,
            ``temperature``, ``scope``...).
    """

    alpha: float
    delta: float | None
    method: str
    n: int
    risk: str
    kind: str
    threshold: float
    satisfied: bool
    reason: str
    covers: Mapping[str, Any] = field(default_factory=lambda: _covers(None))
    statement: str = ""
    coverage: float | None = None
    selective_risk: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.statement:
            object.__setattr__(self, "statement", statement(self.risk, self.kind, self.alpha, self.delta, self.covers))

    def replace(self, **changes: Any) -> Guarantee:
        """A copy with ``changes`` (a new ``statement`` is derived unless given)."""
        if "statement" not in changes and any(k in changes for k in ("risk", "kind", "alpha", "delta", "covers")):
            changes["statement"] = ""
        return dataclasses.replace(self, **changes)

    def _default_scope(self) -> bool:
        default = _covers(None)
        return _covers(self.covers) == default and self.statement == statement(
            self.risk, self.kind, self.alpha, self.delta, default)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's form: plain values (``threshold`` may be ``inf``; write it with ``json_safe``)."""
        out: dict[str, Any] = {
            "alpha": self.alpha, "delta": self.delta, "method": self.method, "risk": self.risk, "kind": self.kind,
            "threshold": self.threshold, "n_cal": self.n, "coverage_cal": self.coverage,
            "selective_risk_cal": self.selective_risk, "satisfied": self.satisfied, "reason": self.reason,
        }
        if not self._default_scope():
            out["covers"], out["statement"] = _covers(self.covers), self.statement
        out.update(self.details)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Guarantee:
        """Read the form written by :meth:`to_dict` (or by a bundle of format 1 or 2).

        ``alpha`` and ``method`` are required; ``risk`` and ``kind`` follow from the method when
        absent, and ``covers`` / ``statement`` default as in the module docstring.

        Raises:
            ValueError: ``data`` is not a mapping, or lacks ``alpha`` or ``method``.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a guarantee is a JSON object; got {type(data).__name__}")
        missing = [k for k in ("alpha", "method") if data.get(k) is None]
        if missing:
            raise ValueError(f"a guarantee needs {missing}; got the keys {sorted(data)}")
        method = str(data["method"])
        delta = data.get("delta")
        coverage, risk_cal = data.get("coverage_cal"), data.get("selective_risk_cal")
        return cls(
            alpha=float(data["alpha"]),
            delta=None if delta is None else float(delta),
            method=method,
            n=int(data.get("n_cal") or 0),
            risk=str(data.get("risk") or _risk_of(method)),
            kind=str(data.get("kind") or _kind_of(method)),
            threshold=parse_json_float(data.get("threshold"), missing=math.inf),
            satisfied=bool(data.get("satisfied", False)),
            reason=str(data.get("reason") or ""),
            covers=_covers(data.get("covers")),
            statement=str(data.get("statement") or ""),
            coverage=None if coverage is None else parse_json_float(coverage),
            selective_risk=None if risk_cal is None else parse_json_float(risk_cal),
            details={k: v for k, v in data.items() if k not in _CORE},
        )


def certified(
    *,
    alpha: float,
    delta: float | None,
    method: str,
    n: int,
    threshold: float,
    satisfied: bool,
    reason: str,
    risk: str | None = None,
    kind: str | None = None,
    covers: Mapping[str, Any] | None = None,
    statement: str = "",
    coverage: float | None = None,
    selective_risk: float | None = None,
    **details: Any,
) -> Guarantee:
    """The one way a calibration states its result (gates, the cascade, the router).

    ``risk`` and ``kind`` default from the method; ``covers`` to :data:`CALIBRATION_SPLIT`;
    ``statement`` to :func:`statement`. ``details`` are the other figures, stored under their keys.
    """
    return Guarantee(
        alpha=float(alpha), delta=None if delta is None else float(delta), method=method, n=int(n),
        risk=risk or _risk_of(method), kind=kind or _kind_of(method), threshold=float(threshold),
        satisfied=bool(satisfied), reason=reason, covers=_covers(covers),
        statement=statement, coverage=coverage, selective_risk=selective_risk, details=details,
    )
