"""One definition of a fallback: events, stats, metrics, monitors and the report agree on one run.

A fallback is an answer not served by the primary's own path (its early exits and its final head are
that path). The model below is built so that every path serves some of the samples: exit_1 where
feature 0 is positive, exit_2 where feature 3 is, the primary where feature 1 is, the student where
feature 2 is, else (feature 4) the safe default.
"""

import re

import pytest
import torch

from fallbackformer.common.paths import is_fallback
from fallbackformer.evaluation.cost_eval import path_flops
from fallbackformer.evaluation.guarantee_eval import serving_certificate
from fallbackformer.evaluation.set_eval import evaluate_set, gate_info
from fallbackformer.monitoring.metrics import prometheus_text
from fallbackformer.monitoring.rate import FallbackRateMonitor
from fallbackformer.runtime.events import ListSink
from fallbackformer.runtime.testing import FeatureHead, build

# per sample: which feature is on (0: exit_1, 3: exit_2, 1: primary, 2: student, 4: no head -> default)
ROUTE = [0, 0, 3, 1, 1, 2, 2, 2, 4, 1, 0, 4]
EXPECTED = ["exit_1", "exit_1", "exit_2", "primary", "primary", "student", "student", "student", "default",
            "primary", "exit_1", "default"]


@pytest.fixture()
def run():
    heads = {0: FeatureHead(0, 0), 1: FeatureHead(3, 1), 2: FeatureHead(1, 1)}  # exit_1, exit_2, primary
    model, *_ = build([0.0, 0.0, 0.0], heads=heads, student_head=FeatureHead(2, 2),
                      thresholds=[0.9, 0.9, 0.9, 0.9], budget_ms=1e6, hedge="off")
    sink = ListSink()
    model.sinks = [sink]
    x = torch.full((len(ROUTE), 5), -1.0)
    x[torch.arange(len(ROUTE)), torch.tensor(ROUTE)] = 1.0
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 0, 1, 0, 0])
    outs = [model(xb) for xb in x.split(5)]
    served = [s for o in outs for s in o.served_by]
    return model, sink, x, y, served


def test_the_model_uses_every_path(run):
    assert run[4] == EXPECTED


def test_events_stats_metrics_monitor_and_report_agree(run):
    model, sink, x, y, served = run
    n_fallback = sum(is_fallback(s) for s in served)
    assert n_fallback == 5  # three student answers and two defaults; the four exit answers are not fallbacks

    # events: one per fallback, none for an exit
    assert [e.served_by for e in sink.events] == [s for s in served if is_fallback(s)]

    # stats: the rate, and the fallbacks counted by reason
    stats = model.stats()
    assert stats["fallback_rate"] == pytest.approx(n_fallback / len(served))
    assert sum(stats["reasons"].values()) == n_fallback

    # metrics: the Prometheus gauge and the per-reason counters
    text = prometheus_text(stats)
    rate = float(re.search(r"^fallbackformer_fallback_rate (\S+)$", text, re.M).group(1))
    by_reason = [float(v) for v in re.findall(r"^fallbackformer_fallbacks_total\{[^}]*\} (\S+)$", text, re.M)]
    assert rate == pytest.approx(n_fallback / len(served)) and sum(by_reason) == n_fallback

    # the creep monitor, fed as a sink plus the answers that gave no event
    monitor = FallbackRateMonitor(max_rate=0.99, window=100, min_answers=1)
    for event in sink.events:
        monitor.emit(event)
    monitor.observe_answers(len(served) - len(sink.events))
    assert monitor.rate == pytest.approx(n_fallback / len(served))

    # the report's figure, from the evaluation of the same inputs
    gates = gate_info(model)
    entry, _ = evaluate_set(model, x, y, batch_size=5, latency_samples=0, flops=path_flops(model, x[:1]),
                            gates=gates, class_names=["a", "b", "c"], certificate=serving_certificate(model, gates))
    assert entry["fallback_rate"] == pytest.approx(n_fallback / len(served))
    assert entry["served_by_counts"] == {s: served.count(s) for s in entry["served_by_counts"]}
