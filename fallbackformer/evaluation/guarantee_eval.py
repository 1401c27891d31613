"""Which guarantee the system's answers carry, whether it held on a set, and whether the set lies in
the distribution the guarantee was certified for.

Two cases, told apart by duck typing (the router is optional):

* **router**: ``getattr(model, "router", None)`` is not None. Its ``guarantee`` dict carries at least
  ``alpha``, ``delta``, ``satisfied`` and ``covers`` (the certified distribution, for example
  ``{"clean_weight": 0.25, "corruptions": [...], "severities": [1, ..., 5], "draw": "..."}``). The
  system's answers carry the router's guarantee, so the check that counts on a set is the system's
  selective risk (errors among answered / answered) against the router's ``alpha`` at level
  ``delta``. The per-path gates are still reported, but do not count: they are not what serves.
* **gates**: each gate's own check (its path alone on the set, against its own ``alpha``) counts.
  The gates were calibrated on clean data, so only the clean set is inside what they certified.

A check *breaches* when the one-sided Clopper-Pearson lower bound on the risk at level ``delta`` lies
above ``alpha`` (:func:`risk_check`'s ``significant``). A set's guarantee *holds* when no counted check
breaches on it. Outside the certified distribution the guarantee says nothing: a breach there is
reported as a fact about the set, not as a broken promise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fallbackformer.evaluation import metrics as M
from fallbackformer.evaluation.containers import CLEAN, split_set_key

__all__ = ["INSIDE", "OUTSIDE", "risk_check", "serving_certificate", "certified_scope", "set_guarantee"]

INSIDE = "inside the mixture"
OUTSIDE = "outside: the guarantee says nothing here"
_GATES_INSIDE = "inside: the gates' calibration distribution (clean)"
_GATES_OUTSIDE = "outside: the gates were calibrated on clean data only"


def risk_check(errors: int, n: int, denom: int, alpha: float | None, delta: float | None) -> dict[str, Any]:
    """Risk ``errors / denom`` and the guarantee flags.

    Args:
        errors: wrong answers counted by the risk.
        n: accepted (answered) count.
        denom: the risk's denominator (``n`` for a selective risk, all requests for a joint risk).
        alpha: the promised risk level (``None``: nothing promised, no flags).
        delta: the level of the Clopper-Pearson bounds (0.1 when ``None``).

    Returns:
        ``{"risk", "errors", "n_accepted", "denominator", "alpha", "delta", "upper", "lower",
        "violated" (risk > alpha), "significant" (CP lower bound > alpha: a breach)}``.
    """
    risk = errors / denom if denom else math.nan
    d = 0.1 if delta is None else float(delta)
    out: dict[str, Any] = {
        "risk": risk,
        "errors": errors,
        "n_accepted": n,
        "denominator": denom,
        "alpha": alpha,
        "delta": delta,
        "upper": M.risk_upper_bound(errors, denom, d) if denom else math.nan,
        "lower": M.risk_lower_bound(errors, denom, d) if denom else math.nan,
    }
    out["violated"] = bool(alpha is not None and denom > 0 and risk > alpha)
    out["significant"] = bool(alpha is not None and denom > 0 and out["lower"] > alpha)
    return out


def serving_certificate(model: Any, gate_info: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What certifies the system's answers.

    Args:
        model: the system; a non-None ``router`` attribute (with its
            :class:`~fallbackformer.gates.guarantee.Guarantee`) makes it a router.
        gate_info: ``{path: {"alpha", "delta", ...}}`` of the per-path gates.

    Returns:
        ``{"by": "router", "alpha", "delta", "satisfied", "covers"}`` or ``{"by": "gates", "alpha":
        loosest gate alpha, "delta": smallest gate delta, "covers": {"clean_weight": 1.0,
        "corruptions": [], "severities": []}}``.
    """
    router = getattr(model, "router", None)
    if router is not None:
        g = getattr(router, "guarantee", None)
        if g is None:
            raise ValueError("model.router has no guarantee: certify it (router_calibration.certify) before evaluating")
        return {"by": "router", "alpha": g.alpha, "delta": g.delta, "satisfied": g.satisfied, "covers": dict(g.covers)}
    alphas = [g["alpha"] for g in gate_info.values() if g.get("alpha") is not None]
    deltas = [g["delta"] for g in gate_info.values() if g.get("delta") is not None]
    return {
        "by": "gates",
        "alpha": max(alphas) if alphas else None,
        "delta": min(deltas) if deltas else None,
        "covers": {"clean_weight": 1.0, "corruptions": [], "severities": []},
    }


def certified_scope(key: str, held_out: bool, certificate: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether set ``key`` lies inside the distribution ``certificate`` was certified for, in words.

    With a router: the clean set is inside when ``covers["clean_weight"]`` is positive (or absent); a
    shift set when its corruption is in ``covers["corruptions"]`` and its severity in
    ``covers["severities"]`` (each list, when absent, falls back to "not held out"). With gates: only
    the clean set.
    """
    parsed = split_set_key(key)
    if certificate.get("by") != "router":
        inside = parsed is None and key == CLEAN
        return inside, _GATES_INSIDE if inside else _GATES_OUTSIDE
    covers = certificate.get("covers") or {}
    if parsed is None:
        inside = float(covers.get("clean_weight", 1.0) or 0.0) > 0
    else:
        name, sev = parsed
        names, sevs = covers.get("corruptions"), covers.get("severities")
        in_names = (name in names) if names is not None else not held_out
        in_sevs = (int(sev) in {int(s) for s in sevs}) if sevs is not None else True
        inside = in_names and in_sevs
    return inside, INSIDE if inside else OUTSIDE


def set_guarantee(
    key: str,
    held_out: bool,
    checks: Mapping[str, Mapping[str, Any]],
    certificate: Mapping[str, Any],
    paths: Sequence[str],
) -> dict[str, Any]:
    """Whether the guarantee held on one set, stated against the distribution it was certified for.

    Args:
        key: the set name.
        held_out: the set's corruption was never used for tuning.
        checks: :func:`risk_check` results by name (``"system"`` and every path).
        certificate: :func:`serving_certificate`.
        paths: the path names (their checks count when the gates serve).

    Returns:
        ``{"by", "counted": [check names], "breached": [counted names that breach], "holds": bool,
        "in_certified_distribution": bool, "scope": words}``.
    """
    counted = ["system"] if certificate.get("by") == "router" else [p for p in paths if p in checks]
    breached = [c for c in counted if checks[c]["significant"]]
    inside, scope = certified_scope(key, held_out, certificate)
    return {
        "by": certificate.get("by"),
        "counted": counted,
        "breached": breached,
        "holds": not breached,
        "in_certified_distribution": inside,
        "scope": scope,
    }
