"""The prometheus_client collector and the zero-dependency text form, both read back by the reference parser."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fallbackformer.monitoring.metrics import prometheus_text
from fallbackformer.monitoring.prometheus import FallbackCollector, ServerMetrics, latency_buckets
from tests.unit.serving.conftest import tiny_model

STATS = {
    "calls": 7, "answers": 12, "served_by": {"exit_1": 5, "student": 4, "default": 3},
    "reasons": {"deadline_exceeded": 4, "breaker_open": 3}, "fallback_rate": 7 / 12, "sink_errors": 2,
    "signals": {"calibration_drift": 1},
    "breaker": {"state": "open", "failure_rate": 0.5, "slow_call_rate": -1.0, "number_of_not_permitted_calls": 3},
    "hedge": {"submitted": 6, "refused": 1, "timeouts": 2, "workers": 2, "busy_workers": 1},
    "drift": {"drifted": True, "n_alarms": 1, "n_seen": 400, "last_statistic": 0.31, "last_pvalue": 0.001},
}


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model")))] = s.value
    return out


class _DroppingSink:
    def emit(self, event):
        pass

    def stats(self):
        return {"written": 1, "dropped": 4, "errors": 1}


def test_collector_exposes_every_family_with_total_counters():
    model = type("M", (), {"stats": lambda self: STATS, "sinks": [_DroppingSink()]})()
    registry = CollectorRegistry()
    registry.register(FallbackCollector(model, labels={"model": "digits"}))
    got = _samples(generate_latest(registry).decode())
    assert got[("fallbackformer_calls_total", ())] == 7
    assert got[("fallbackformer_answers_total", (("served_by", "student"),))] == 4
    assert got[("fallbackformer_fallbacks_total", (("reason", "breaker_open"),))] == 3
    assert got[("fallbackformer_breaker_state", (("state", "open"),))] == 1
    assert got[("fallbackformer_breaker_state", (("state", "closed"),))] == 0
    assert got[("fallbackformer_hedge_timeouts_total", ())] == 2
    assert got[("fallbackformer_hedge_busy_workers", ())] == 1
    assert got[("fallbackformer_drift_detected", ())] == 1
    assert got[("fallbackformer_drift_last_pvalue", ())] == 0.001
    assert got[("fallbackformer_signals_total", (("signal", "calibration_drift"),))] == 1
    assert got[("fallbackformer_sink_errors_total", ())] == 2
    assert got[("fallbackformer_sink_events_dropped_total", ())] == 4
    assert abs(got[("fallbackformer_fallback_rate", ())] - 7 / 12) < 1e-12


def test_collector_and_text_form_agree_on_a_real_model():
    model = tiny_model()
    model(__import__("torch").ones(3, 4))
    registry = CollectorRegistry()
    registry.register(FallbackCollector(model, labels={"model": "tiny"}))
    client = _samples(generate_latest(registry).decode())
    plain = _samples(prometheus_text(model.stats(), labels={"model": "tiny"}))
    for key, value in plain.items():
        assert client[key] == value, key
    assert client[("fallbackformer_answers_total", (("served_by", "primary"),))] == 3


def test_server_metrics_histogram_has_an_edge_at_budget_plus_2ms():
    buckets = latency_buckets(50.0)
    assert 0.052 in buckets and list(buckets) == sorted(buckets)
    metrics = ServerMetrics(tiny_model(), {"model": "tiny"}, budget_ms=50.0)
    for v in np.linspace(0.001, 0.04, 10):
        metrics.latency.observe(float(v))
    metrics.requests.labels("infer", "200").inc(10)
    got = _samples(generate_latest(metrics.registry).decode())
    assert got[("fallbackformer_server_requests_total", (("code", "200"), ("route", "infer")))] == 10
    assert got[("fallbackformer_server_request_latency_seconds_bucket", (("le", "0.052"),))] == 10
    assert got[("fallbackformer_server_request_latency_seconds_count", ())] == 10
