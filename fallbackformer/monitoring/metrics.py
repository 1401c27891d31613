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
    family("fallbacks_total", "counter", "Answers not served by the primary or an exit, by reason.",
           [({"reason": k}, v) for k, v in sorted(stats.get("reasons", {}).items())])
    family("fallback_rate", "gauge", "Share of answers served by the student or the safe default since start.",
           [({}, stats.get("fallback_rate", 0.0))])
    if "sink_errors" in stats:
        family("sink_errors_total", "counter", "Events that a sink failed to take.", [({}, stats["sink_errors"])])
    return "\n".join(lines) + "\n"
