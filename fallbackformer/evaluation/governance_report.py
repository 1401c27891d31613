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


def label_free_summary(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sets whose label-free estimate lies within the tolerance of the truth: all, tunable, held-out.

    Args:
        entries: ``{set: entry}`` with the ``label_free`` entry of each set (or the entries themselves,
            as :func:`~fallbackformer.evaluation.label_free_eval.measure_label_free` returns them), and
            ``held_out`` per set.

    Returns:
        ``{"method", "all": [within, scored], "tunable": [...], "held_out": [...], "share"}`` (a set
        with no answered request is not scored).
    """
    counts = {"all": [0, 0], "tunable": [0, 0], "held_out": [0, 0]}
    method = None
    for e in entries.values():
        lf = e.get("label_free", e)
        method = method or lf.get("method")
        if lf.get("within") is None:
            continue
        for group in ("all", "held_out" if e.get("held_out") else "tunable"):
            counts[group][0] += int(bool(lf["within"]))
            counts[group][1] += 1
    n_in, n = counts["all"]
    return {"method": method, **counts, "share": n_in / n if n else None}


def label_free_rows(entries: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The per-set table: set, held out, answered, accuracy of the answered, estimate, error, within."""
    rows = [["set", "held out", "answered", "accuracy (answered)", "label-free estimate", "error (pt)", "within 5 pt"]]
    for key, e in entries.items():
        lf = e.get("label_free", e)
        err = lf.get("error")
        rows.append([key, "yes" if e.get("held_out") else "", f"{lf.get('n_answered')}/{lf.get('n')}",
                     _f(lf.get("accuracy_answered")), _f(lf.get("estimate")),
                     "n/a" if err is None else f"{100 * err:+.1f}",
                     "n/a" if lf.get("within") is None else ("yes" if lf["within"] else "NO")])
    return rows


def label_free_line(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """One sentence: the method and how many sets it estimates within 5 pt (all, tunable, held-out)."""
    s = label_free_summary(entries)
    part = lambda k: f"{s[k][0]}/{s[k][1]}"  # noqa: E731
    return (f"Label-free accuracy estimate ({s['method']}): within 5 pt of the accuracy of the answered "
            f"requests on {part('all')} sets ({_f(s['share'], 2)}); tunable {part('tunable')}, held-out "
            f"{part('held_out')}.")
