"""Metrics exposition: a FallbackModel's counters in the Prometheus text format.

Serve the string from any HTTP endpoint (``/metrics``); a scraper turns the counters into the
fallback activation rate, its trend, and its correlation with latency.

>>> print(prometheus_text(model.stats()))  # doctest: +SKIP
# HELP fallbackformer_calls_total Calls to FallbackModel.forward.
...
"""

from __future__ import annotations

from typing import Any, Mapping

_PREFIX = "fallbackformer"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items())) + "}"


def prometheus_text(stats: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """Render :meth:`FallbackModel.stats` as Prometheus text exposition (format 0.0.4).

    Args:
        stats: the dict returned by ``FallbackModel.stats()``.
        labels: constant labels added to every sample (for example ``{"model": "digits"}``).

    Returns:
        The exposition text, ending with a newline.
    """
    base = dict(labels or {})
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        full = f"{_PREFIX}_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        for extra, value in samples:
            lines.append(f"{full}{_labels({**base, **extra})} {float(value):.17g}")

    family("calls_total", "counter", "Calls to FallbackModel.forward.", [({}, stats.get("calls", 0))])
    family("answers_total", "counter", "Answers (samples), by the path that served them.",
           [({"served_by": k}, v) for k, v in sorted(stats.get("served_by", {}).items())])
    family("fallbacks_total", "counter", "Fallbacks by reason: answers served by neither the primary nor its exits.",
           [({"reason": k}, v) for k, v in sorted(stats.get("reasons", {}).items())])
    family("fallback_rate", "gauge", "Share of answers served by neither the primary nor its exits, since start.",
           [({}, stats.get("fallback_rate", 0.0))])
    if "sink_errors" in stats:
        family("sink_errors_total", "counter", "Events that a sink failed to take.", [({}, stats["sink_errors"])])
    if stats.get("signals"):
        family("signals_total", "counter", "Named signals raised (drift, instability, creep, disparity...).",
               [({"signal": k}, v) for k, v in sorted(stats["signals"].items())])
    if stats.get("governance"):
        _governance_families(stats["governance"], family)
    return "\n".join(lines) + "\n"


def _governance_families(gov: Mapping[str, Any], family: Any) -> None:
    """The governor's monitors and online risk controller (``stats()["governance"]``)."""
    mon = gov.get("monitors") or {}
    family("monitor_alarms_total", "counter", "Alarms raised by each monitor (once per excursion).",
           [({"signal": k}, v) for k, v in sorted((mon.get("alarms") or {}).items())])
    family("monitor_active", "gauge", "1 while a monitor is in its alarm state.",
           [({"monitor": k}, float(bool(v.get("active")))) for k, v in sorted(mon.items()) if isinstance(v, Mapping) and "active" in v])
    creep = mon.get("creep") or {}
    if "rate" in creep:
        family("window_fallback_rate", "gauge", "Fallback share over the creep monitor's rolling window.",
               [({}, creep["rate"])])
    routing = mon.get("routing") or {}
    if "tv" in routing:
        family("routing_tv_distance", "gauge", "Total-variation distance of the window's served_by mix from the signed-off mix.",
               [({}, routing["tv"])])
    stages = (mon.get("latency") or {}).get("stages") or {}
    if stages:
        family("window_stage_p99_ms", "gauge", "Stage p99 over the latency monitor's window.",
               [({"stage": k}, v["p99_ms"]) for k, v in sorted(stages.items())])
    fb = gov.get("feedback")
    if fb:
        family("feedback_total", "counter", "Label feedback calls and their outcome.",
               [({"outcome": k}, v) for k, v in sorted((fb.get("counts") or {}).items())])
        family("threshold_in_force", "gauge", "Threshold in force per target (the online risk controller's lambda).",
               [({"target": k}, v["lambda"]) for k, v in sorted((fb.get("targets") or {}).items())])
        if fb.get("error_rate") is not None:
            family("online_error_rate", "gauge", "Error rate among labelled answered requests since start.",
                   [({}, fb["error_rate"])])
        if fb.get("label_free_accuracy") is not None:
            family("label_free_accuracy", "gauge", "Label-free accuracy estimate: mean calibrated confidence of answered requests in the window.",
                   [({}, fb["label_free_accuracy"])])
