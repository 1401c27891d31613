"""Bounds as code: a bundle's acceptable degradation, checked against its own evaluation summary.

The manifest's ``degradation`` block is what the product owner signed off. Its limits are checked
when a bundle is saved and when it is loaded; a bundle that breaks its own documented bounds is
refused (``on_breach: refuse``, the default) or loaded with a loud :class:`BoundsWarning` and the
breaches in ``model.bounds_breaches`` (``on_breach: signal``)::

    degradation:
      evaluation: clean             # the evaluation the top-level limits apply to ("clean" or a shift suite)
      max_fallback_rate: 0.10       # answers not served by the primary's path (student + default)
      max_accuracy_drop_pt: 0.5     # primary accuracy - system accuracy, in percentage points
      min_coverage: 0.95            # answers that are not the safe default
      min_accuracy: 0.95            # system accuracy
      max_relative_drop: 0.6        # shift: the system's mean relative accuracy drop from clean
      slices:                       # per-slice limits on the same evaluation ("/" walks the summary)
        per_class/3: {max_accuracy_drop_pt: 2.0}
      bounds:                       # more limits, each naming its evaluation (and optionally a slice)
        - {evaluation: shift, max_relative_drop: 0.6}
      on_breach: refuse             # or "signal"
      signed_off_by: null           # free fields are kept and not checked

An evaluation named ``clean`` is the summary itself (``evaluate``'s headline metrics) or its
``clean`` section; any other name is the summary's section of that name (``shift`` falls back to the
summary, whose ``relative_drop``/``mce`` are the shift suite's aggregates). A limit whose metric the
evaluation lacks is a breach: a bound that cannot be checked is not met. A bundle saved without any
evaluation (``evaluation=None``, e.g. the staged ``export`` step before ``evaluate``) has no evidence
yet: its bounds are not checked until it is saved with one. An unknown ``max_*``/``min_*`` key is
warned about (:class:`BoundsWarning`) and not checked. A slice is the section's
``slices`` entry at that path (``per_class/3`` -> ``slices.per_class["3"]``).

>>> check_bounds({"max_fallback_rate": 0.1}, {"fallback_rate": 0.25})[0].message  # doctest: +ELLIPSIS
'clean: fallback_rate 0.25 > max_fallback_rate 0.1...'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LIMITS", "ON_BREACH", "BoundsWarning", "Breach", "check_bounds", "enforce_bounds"]

ON_BREACH = ("refuse", "signal")
CLEAN = "clean"
#: keys of the degradation block that are not limits and not checked
_NOT_LIMITS = {"evaluation", "slices", "bounds", "on_breach", "slice"}


class BoundsWarning(UserWarning):
    """A bundle breaks its own acceptable degradation and was loaded because ``on_breach: signal``."""


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if not math.isnan(v) else None


def _path_value(section: Mapping[str, Any], key: str) -> float | None:
    """``section[key]`` as a number; ``key`` may be ``a/b`` and a mapping's ``system`` entry is taken."""
    cur: Any = section
    for part in key.split("/"):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    if isinstance(cur, Mapping):
        cur = cur.get("system")
    return _num(cur)


def _accuracy_drop_pt(s: Mapping[str, Any]) -> float | None:
    acc = s.get("accuracy")
    if isinstance(acc, Mapping):
        primary, system = _num(acc.get("primary")), _num(acc.get("system"))
    else:  # a slice: {"accuracy": system, "accuracy_primary": primary}
        primary, system = _num(s.get("accuracy_primary")), _num(acc)
    return None if primary is None or system is None else 100.0 * (primary - system)


def _coverage(s: Mapping[str, Any]) -> float | None:
    if "coverage" in s:
        return _num(s["coverage"])
    served = s.get("served_by")
    if isinstance(served, Mapping) and served:
        return 1.0 - (_num(served.get("default", 0.0)) or 0.0)
    return None


#: limit name -> (metric name, read the metric from a section, "max" or "min")
LIMITS: dict[str, tuple[str, Callable[[Mapping[str, Any]], float | None], str]] = {
    "max_fallback_rate": ("fallback_rate", lambda s: _path_value(s, "fallback_rate"), "max"),
    "max_accuracy_drop_pt": ("accuracy_drop_pt", _accuracy_drop_pt, "max"),
    "min_coverage": ("coverage", _coverage, "min"),
    "min_accuracy": ("accuracy", lambda s: _path_value(s, "accuracy"), "min"),
    "max_relative_drop": ("relative_drop", lambda s: _path_value(s, "relative_drop"), "max"),
    "max_mce": ("mce", lambda s: _path_value(s, "mce"), "max"),
}


@dataclass(frozen=True)
class Breach:
    """One limit not met: where, which limit, the limit and the measured value (``None``: missing)."""

    evaluation: str
    slice: str | None
    limit: str
    bound: float
    value: float | None
    message: str


def _section(evaluation: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    if name == CLEAN:
        inner = evaluation.get(CLEAN)
        return inner if isinstance(inner, Mapping) else evaluation
    inner = evaluation.get(name)
    if isinstance(inner, Mapping):
        return inner
    shifts = evaluation.get("shifts")
    if isinstance(shifts, Mapping) and isinstance(shifts.get(name), Mapping):
        return shifts[name]
    return evaluation if name == "shift" else None


def _check_one(
    limits: Mapping[str, Any], evaluation: Mapping[str, Any], name: str, slice_: str | None
) -> list[Breach]:
    where = name + (f" slice {slice_}" if slice_ else "")
    section = _section(evaluation, name)
    if section is not None and slice_:
        cur: Any = section.get("slices")
        for part in slice_.split("/"):
            cur = cur.get(part) if isinstance(cur, Mapping) else None
        section = cur if isinstance(cur, Mapping) else None
    out = []
    for key, raw in limits.items():
        if key in _NOT_LIMITS or not (key.startswith("max_") or key.startswith("min_")):
            continue
        if key not in LIMITS:  # not an error (older bundles carry free keys), but never silent
            warnings.warn(
                f"degradation limit {key!r} ({where}) is unknown and NOT checked; use one of "
                f"{sorted(LIMITS)} (or a key not starting with max_/min_ for free notes)",
                BoundsWarning,
                stacklevel=4,
            )
            continue
        bound = _num(raw)
        if bound is None:
            raise ValueError(f"degradation limit {key}={raw!r} ({where}) is not a number; write a number")
        metric, read, kind = LIMITS[key]
        value = read(section) if section is not None else None
        if value is None:
            out.append(Breach(name, slice_, key, bound, None,
                              f"{where}: {key} {bound:g} cannot be checked: the bundle's evaluation has no "
                              f"{metric} there; re-evaluate the bundle with that evaluation, or remove the limit"))
        elif (kind == "max" and value > bound) or (kind == "min" and value < bound):
            sign = ">" if kind == "max" else "<"
            out.append(Breach(name, slice_, key, bound, value,
                              f"{where}: {metric} {value:.4g} {sign} {key} {bound:g}; improve the model or "
                              "have the product owner sign off a wider bound"))
    return out


def check_bounds(degradation: Mapping[str, Any] | None, evaluation: Mapping[str, Any] | None) -> list[Breach]:
    """Every limit of ``degradation`` that ``evaluation`` does not meet (``[]``: within bounds).

    Args:
        degradation: the manifest's ``degradation`` block (``None``: no bounds).
        evaluation: the manifest's ``evaluation`` summary (``None`` with limits: each limit breaches).

    Raises:
        ValueError: for an unknown limit, a non-numeric limit or a bad ``on_breach``.
    """
    if not degradation:
        return []
    on_breach = degradation.get("on_breach", "refuse")
    if on_breach not in ON_BREACH:
        raise ValueError(f"degradation.on_breach is {on_breach!r}; use one of {list(ON_BREACH)}")
    evaluation = evaluation or {}
    name = str(degradation.get("evaluation", CLEAN))
    breaches = _check_one(degradation, evaluation, name, None)
    for slice_, limits in (degradation.get("slices") or {}).items():
        breaches += _check_one(limits, evaluation, name, str(slice_))
    for extra in degradation.get("bounds") or []:
        breaches += _check_one(extra, evaluation, str(extra.get("evaluation", CLEAN)), extra.get("slice"))
    return breaches


def enforce_bounds(manifest: Mapping[str, Any], where: str) -> list[Breach]:
    """Check a manifest's ``degradation`` against its ``evaluation``: refuse, or warn and return.

    Args:
        manifest: the bundle's manifest (being saved or just verified at load).
        where: what is happening, for the message (``"ff.load of checkpoints/digits"``).

    Returns:
        The breaches (``[]`` when within bounds, or when the bundle has no evaluation yet).

    Raises:
        BundleError: when a limit is broken and ``on_breach`` is ``"refuse"`` (the default), or the
            degradation block is malformed.
    """
    from fallbackformer.export.bundle import BundleError

    degradation, evaluation = manifest.get("degradation"), manifest.get("evaluation")
    if not degradation or evaluation is None:
        return []
    try:
        breaches = check_bounds(degradation, evaluation)
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from None
    if not breaches:
        return []
    lines = "; ".join(b.message for b in breaches)
    if degradation.get("on_breach", "refuse") == "refuse":
        raise BundleError(
            f"{where}: the bundle breaks its own acceptable degradation ({len(breaches)} limit(s)): {lines}. "
            "Set degradation.on_breach='signal' to load it anyway with a warning"
        )
    warnings.warn(f"{where}: BUNDLE OUTSIDE ITS SIGNED-OFF BOUNDS: {lines}", BoundsWarning, stacklevel=3)
    return breaches
