"""A ``prometheus_client`` collector for a FallbackModel, and the server's own request metrics.

:class:`FallbackCollector` reads ``model.stats()`` at scrape time (nothing is counted twice: the
model keeps the counters). :func:`fallbackformer.monitoring.metrics.prometheus_text` renders the
same model counters without any dependency.

>>> from prometheus_client import CollectorRegistry, generate_latest   # doctest: +SKIP
>>> registry = CollectorRegistry()                                     # doctest: +SKIP
>>> registry.register(FallbackCollector(model, labels={"model": "digits"}))  # doctest: +SKIP
>>> generate_latest(registry)                                          # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "fallbackformer"
BREAKER_STATES = ("closed", "open", "half_open", "forced_open", "disabled")


class FallbackCollector(Collector):
    """Exposes ``model.stats()`` (and the sinks' own counters) as Prometheus metrics.

    Families (every counter is exposed with the ``_total`` suffix): ``calls``, ``answers`` by
    ``served_by``, ``fallbacks`` by ``reason``, ``fallback_rate``, ``signals`` by ``signal``,
    ``sink_errors``, ``sink_events_dropped`` and ``sink_write_errors`` (sinks with a ``stats()``),
    ``breaker_state`` (one gauge per state, 1 for the current one), ``breaker_calls`` /
    ``breaker_not_permitted``, ``hedge_submitted`` / ``hedge_refused`` / ``hedge_timeouts``,
    ``hedge_workers`` / ``hedge_busy_workers`` (busy workers are the stuck ones when calls time out),
    and the drift monitor: ``drift_detected``, ``drift_alarms``, ``drift_last_statistic``,
    ``drift_last_pvalue``, ``drift_scores_seen``.

    Args:
        model: anything with ``stats()`` and (optionally) ``sinks``; or pass ``stats`` instead.
        labels: constant labels on every sample (for example ``{"model": "digits"}``).
        stats: a callable returning the stats dict (default ``model.stats``).
    """

    def __init__(self, model: Any = None, labels: Mapping[str, str] | None = None,
                 stats: Callable[[], Mapping[str, Any]] | None = None) -> None:
        if model is None and stats is None:
            raise ValueError("FallbackCollector needs a model (with .stats()) or stats=<callable>")
        self._model = model
        self._stats = stats or model.stats
        self._labels = dict(labels or {})

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: the families depend on what the model has (breaker, hedging...)

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        names, values = list(self._labels), list(self._labels.values())

        def counter(name: str, doc: str, samples: Sequence[tuple[dict[str, str], float]], extra: Sequence[str] = ()):
            fam = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[*names, *extra])
            for lab, v in samples:
                fam.add_metric([*values, *(lab[k] for k in extra)], float(v))
            return fam

        def gauge(name: str, doc: str, samples: Sequence[tuple[dict[str, str], float]], extra: Sequence[str] = ()):
            fam = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[*names, *extra])
            for lab, v in samples:
                fam.add_metric([*values, *(lab[k] for k in extra)], float(v))
            return fam

        yield counter("calls", "Calls to FallbackModel.forward.", [({}, stats.get("calls", 0))])
        yield counter("answers", "Answers (samples), by the path that served them.",
                      [({"served_by": k}, v) for k, v in sorted(stats.get("served_by", {}).items())], ["served_by"])
        yield counter("fallbacks", "Fallbacks by reason: answers served by neither the primary nor its exits.",
                      [({"reason": k}, v) for k, v in sorted(stats.get("reasons", {}).items())], ["reason"])
        yield gauge("fallback_rate", "Share of answers served by neither the primary nor its exits, since start.",
                    [({}, stats.get("fallback_rate", 0.0))])
        yield counter("signals", "Runtime signals raised (calibration_drift, ...), by signal.",
                      [({"signal": k}, v) for k, v in sorted(stats.get("signals", {}).items())], ["signal"])
        yield counter("sink_errors", "Events that a sink raised on (the model kept serving).",
                      [({}, stats.get("sink_errors", 0))])
        sink_stats = [s.stats() for s in getattr(self._model, "sinks", []) or [] if callable(getattr(s, "stats", None))]
        if sink_stats:
            yield counter("sink_events_dropped", "Events dropped by sinks whose queue was full.",
                          [({}, sum(int(s.get("dropped", 0)) for s in sink_stats))])
            yield counter("sink_write_errors", "Sink write failures (the sink keeps going).",
                          [({}, sum(int(s.get("errors", 0)) for s in sink_stats))])
        breaker = stats.get("breaker")
        if breaker:
            state = str(breaker.get("state", ""))
            yield gauge("breaker_state", "Circuit breaker state: 1 for the current state, 0 for the others.",
                        [({"state": s}, float(s == state)) for s in sorted({*BREAKER_STATES, state})], ["state"])
            yield counter("breaker_not_permitted_calls", "Calls the open breaker refused.",
                          [({}, breaker.get("number_of_not_permitted_calls", 0))])
            yield gauge("breaker_failure_rate", "Failure rate in the breaker's window (-1 below its minimum calls).",
                        [({}, breaker.get("failure_rate", -1.0))])
            yield gauge("breaker_slow_call_rate", "Slow-call rate in the breaker's window (-1 below its minimum calls).",
                        [({}, breaker.get("slow_call_rate", -1.0))])
        hedge = stats.get("hedge")
        if hedge:
            yield counter("hedge_submitted", "Primaries run on a hedging worker.", [({}, hedge.get("submitted", 0))])
            yield counter("hedge_refused", "Hedged calls that fell back because every worker was busy.",
                          [({}, hedge.get("refused", 0))])
            yield counter("hedge_timeouts", "Hedged primaries abandoned at the deadline.", [({}, hedge.get("timeouts", 0))])
            yield gauge("hedge_workers", "Hedging worker threads.", [({}, hedge.get("workers", 0))])
            yield gauge("hedge_busy_workers", "Hedging workers busy now (stuck ones stay busy).",
                        [({}, hedge.get("busy_workers", 0))])
        drift = stats.get("drift")
        if drift:
            yield gauge("drift_detected", "1 once the calibration-drift monitor has rejected, until reset_drift().",
                        [({}, float(bool(drift.get("drifted"))))])
            yield counter("drift_alarms", "Calibration-drift alarms.", [({}, drift.get("n_alarms", 0))])
            yield counter("drift_scores_seen", "Gate scores fed to the drift monitor.", [({}, drift.get("n_seen", 0))])
            for key in ("last_statistic", "last_pvalue"):
                if drift.get(key) is not None:
                    yield gauge(f"drift_{key}", f"The drift monitor's {key.replace('_', ' ')} (KS test).",
                                [({}, drift[key])])


def latency_buckets(budget_ms: float) -> tuple[float, ...]:
    """Request-latency buckets in seconds: steps of ``max(1 ms, budget / 50)`` up to the budget + 5 ms,
    an edge at exactly budget + 2 ms (the serving SLO), and coarse ones up to 10 s (at most ~70)."""
    step = max(1.0, budget_ms / 50.0)
    fine = [step * i / 1000.0 for i in range(1, int(math.ceil((budget_ms + 5.0) / step)) + 1)]
    edge = (budget_ms + 2.0) / 1000.0
    coarse = [0.0001, 0.00025, 0.0005, edge, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    return tuple(sorted({round(b, 6) for b in fine + coarse}))


class ServerMetrics:
    """The server's own metrics in a private registry, with the model's collector beside them.

    Attributes:
        registry: the ``CollectorRegistry`` to expose on ``/metrics``.
        requests: counter ``fallbackformer_server_requests_total`` by ``route`` and ``code``.
        latency: histogram ``fallbackformer_server_request_latency_seconds`` of inference requests.
    """

    def __init__(self, model: Any, labels: Mapping[str, str] | None = None, budget_ms: float = 50.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(FallbackCollector(model, labels))
        self.requests = Counter(
            f"{PREFIX}_server_requests", "HTTP requests answered, by route and status code.",
            ["route", "code"], registry=self.registry)
        self.latency = Histogram(
            f"{PREFIX}_server_request_latency_seconds",
            "Time from receiving an inference request to its response (body read, parse, model, encode).",
            buckets=latency_buckets(budget_ms), registry=self.registry)
