"""Every monitor fires on a stream built to trigger it and stays quiet on 5,000 clean requests."""

from __future__ import annotations

import random

import pytest

from fallbackformer.monitoring.monitors import (
    FALLBACK_CREEP,
    LATENCY_DRIFT,
    MONITOR_SIGNALS,
    ROUTING_INSTABILITY,
    SLICE_DISPARITY,
    MonitorConfig,
    MonitorSet,
)

MIX = {"exit_2": 0.6, "exit_3": 0.1, "primary": 0.25, "student": 0.04, "default": 0.01}
REF_P99 = {"stage_0": {1: 0.4, 16: 0.8}, "stage_1": {1: 0.3, 16: 0.7}}


def _config(**kw) -> MonitorConfig:
    return MonitorConfig(reference_mix=MIX, reference_n=2000, reference_p99_ms=REF_P99, max_fallback_rate=0.1, **kw)


def _request(rng: random.Random, mix=MIX, slow: float = 1.0, sick_class: int | None = None,
             batch: int = 1) -> tuple[list[str], list[int], list[tuple[str, int, float]]]:
    served, preds = [], []
    for _ in range(batch):
        c = rng.randrange(10)
        if sick_class is not None and c == sick_class and rng.random() < 0.4:
            who = "student"
        else:
            who = rng.choices(list(mix), weights=list(mix.values()))[0]
        served.append(who)
        preds.append(c)
    # stage times below the reference p99 99% of the time: a log-normal around half of it
    timings = [(s, batch, slow * REF_P99[s][batch] * 0.5 * rng.lognormvariate(0, 0.25)) for s in REF_P99]
    return served, preds, timings


def _run(monitors: MonitorSet, n: int, rng: random.Random, **kw) -> list[str]:
    fired = []
    for _ in range(n):
        fired += monitors.observe(*_request(rng, **kw))
    return fired


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quiet_on_5000_clean_requests(seed: int) -> None:
    monitors = MonitorSet.from_config(_config())
    assert _run(monitors, 5000, random.Random(seed)) == []
    st = monitors.state()
    assert st["alarms"] == {s: 0 for s in MONITOR_SIGNALS}
    assert st["routing"]["looks"] == 20 and st["creep"]["rate"] < 0.1


def test_quiet_on_batched_clean_requests() -> None:
    monitors = MonitorSet.from_config(_config())
    assert _run(monitors, 320, random.Random(5), batch=16) == []  # 5,120 answers in calls of 16


@pytest.mark.parametrize("signal, shift", [
    (ROUTING_INSTABILITY, {"mix": {"exit_2": 0.3, "exit_3": 0.1, "primary": 0.55, "student": 0.04, "default": 0.01}}),
    (LATENCY_DRIFT, {"slow": 3.0}),
    (FALLBACK_CREEP, {"mix": {"exit_2": 0.5, "exit_3": 0.1, "primary": 0.2, "student": 0.15, "default": 0.05}}),
    (SLICE_DISPARITY, {"sick_class": 3}),
])
def test_each_monitor_fires_on_its_trigger(signal: str, shift: dict) -> None:
    rng = random.Random(0)
    monitors = MonitorSet.from_config(_config())
    assert _run(monitors, 1000, rng) == []  # clean first
    fired = _run(monitors, 2000, rng, **shift)
    assert fired.count(signal) == 1, fired  # once per excursion
    assert monitors.state()["alarms"][signal] == 1
    if signal == SLICE_DISPARITY:
        assert monitors.state()["slices"]["worst"]["slice"] == "class=3"


def test_goodness_of_fit_without_reference_size_and_bad_configs() -> None:
    monitors = MonitorSet.from_config(MonitorConfig(reference_mix=MIX))
    assert _run(monitors, 3000, random.Random(3)) == []
    with pytest.raises(ValueError, match="level"):
        MonitorConfig(level=2.0)
    with pytest.raises(ValueError, match="on_instability"):
        MonitorConfig(on_instability="panic")
