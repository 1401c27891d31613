"""Prometheus exposition and the fallback-rate monitor."""

from __future__ import annotations

import re

import pytest

from fallbackformer.monitoring.metrics import prometheus_text
from fallbackformer.monitoring.rate import FallbackRateMonitor


def test_prometheus_text_is_well_formed_and_complete():
    stats = {"calls": 3, "served_by": {"primary": 5, "student": 2, "default": 1},
             "reasons": {"low_confidence": 2, "primary_error": 1}, "fallback_rate": 3 / 8, "sink_errors": 0}
    text = prometheus_text(stats, labels={"model": 'dig"its'})
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)+\})? [-+0-9.e]+$')
    for line in text.strip().splitlines():
        assert line.startswith("# ") or sample.match(line), line
    assert 'fallbackformer_answers_total{model="dig\\"its",served_by="student"} 2' in text
    assert 'fallbackformer_fallbacks_total{model="dig\\"its",reason="primary_error"} 1' in text
    assert "fallbackformer_fallback_rate" in text and text.endswith("\n")


def test_rate_monitor_alerts_once_per_excursion_and_recovers():
    alerts = []
    mon = FallbackRateMonitor(max_rate=0.1, window=100, min_answers=50, on_alert=alerts.append)
    mon.observe(["primary"] * 100)
    assert mon.rate == 0.0 and not alerts
    for _ in range(30):  # 30 fallbacks push the window rate to 0.3
        mon.observe(["student"])
    assert len(alerts) == 1 and alerts[0].rate > 0.1
    mon.observe(["primary"] * 100)  # the window forgets the excursion
    assert mon.rate == 0.0
    mon.observe(["default"] * 20)
    assert len(alerts) == 2


def test_rate_monitor_waits_for_enough_answers():
    mon = FallbackRateMonitor(max_rate=0.1, window=100, min_answers=50)
    assert mon.observe(["student"] * 10) is None
    assert mon.rate == 1.0


def test_rate_monitor_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_rate"):
        FallbackRateMonitor(max_rate=1.5)
    with pytest.raises(ValueError, match="min_answers"):
        FallbackRateMonitor(max_rate=0.1, window=10, min_answers=20)


def test_rate_monitor_as_a_sink_of_a_real_model(digits_system):
    mon = FallbackRateMonitor(max_rate=0.5, window=64, min_answers=8)
    model = digits_system.fresh_model(sinks=[mon])
    x = digits_system.splits["test"][0][:32]
    out = model(x)
    mon.observe_answers(out.served_by.count("primary"))
    expected = sum(s in ("student", "default") for s in out.served_by) / len(out.served_by)
    assert mon.rate == pytest.approx(expected)
