"""Report lines for the governor: one per monitor, one for the online risk controller.

The report shows them when the caller passes ``extra={"governance": model.stats()["governance"]}``
to :func:`~fallbackformer.evaluation.report.write_report` (or calls :func:`governance_lines` itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["governance_lines", "governance_section"]


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def governance_lines(gov: Mapping[str, Any]) -> list[str]:
    """One Markdown line per monitor and one for the controller, from ``stats()["governance"]``."""
    mon = gov.get("monitors") or {}
    alarms = mon.get("alarms") or {}
    lines = []
    r = mon.get("routing")
    lines.append("routing instability: not monitored (no signed-off mix)" if r is None else
                 f"routing instability: {alarms.get('routing_instability', 0)} alarm(s) in {r['looks']} looks; "
                 f"window TV distance from the signed-off mix {_f(r.get('tv'))}{' (ACTIVE)' if r['active'] else ''}")
    lat = mon.get("latency")
    worst = max(((k, v) for k, v in ((lat or {}).get("stages") or {}).items()), key=lambda kv: kv[1]["exceed"], default=None)
    lines.append("latency drift: not monitored (no latency profile)" if lat is None else
                 f"latency drift: {alarms.get('latency_drift', 0)} alarm(s) in {lat['looks']} looks"
                 + (f"; worst stage {worst[0]} window p99 {_f(worst[1]['p99_ms'])} ms" if worst else "")
                 + (" (ACTIVE)" if lat["active"] else ""))
    c = mon.get("creep")
    lines.append("fallback-rate creep: not monitored (no degradation.max_fallback_rate)" if c is None else
                 f"fallback-rate creep: {alarms.get('fallback_creep', 0)} alarm(s); window rate {_f(c.get('rate'))} "
                 f"against signed-off {_f(c.get('max_rate'))}{' (ACTIVE)' if c['active'] else ''}")
    s = mon.get("slices")
    w = (s or {}).get("worst") or {}
    lines.append("slice disparity: off" if s is None else
                 f"slice disparity: {alarms.get('slice_disparity', 0)} alarm(s); widest gap "
                 + (f"{w['slice']} {_f(w['rate'])} vs {_f(w['rest'])}" if w.get("slice") else "none")
                 + (" (ACTIVE)" if s["active"] else ""))
    fb = gov.get("feedback")
    if fb:
        lam = ", ".join(f"{k} {_f(v['lambda'])} (cal. {_f(v['calibrated'])})" for k, v in fb["targets"].items())
        lines.append(f"online risk control: {fb['n_labels']} labels, error among answered {_f(fb['error_rate'])}, "
                     f"label-free accuracy {_f(fb['label_free_accuracy'])}; thresholds in force: {lam}; "
                     f"ignored feedback: {fb['counts']['unknown']} unknown/expired, {fb['counts']['bad_label']} malformed")
    return lines


def governance_section(extra: Mapping[str, Any] | None) -> list[str]:
    """The report's "Monitors" section when ``extra`` holds ``governance`` (else nothing)."""
    gov = (extra or {}).get("governance")
    if not gov:
        return []
    return ["", "## Monitors and online risk control", "", *[f"- {line}" for line in governance_lines(gov)]]
