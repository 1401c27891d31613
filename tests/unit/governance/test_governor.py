"""The governor on the shipped digits bundle: feedback, online risk control, monitors, stats, events."""

from __future__ import annotations

import copy

import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.digits import load_digits_splits
from fallbackformer.data.shift import HELD_OUT, corrupt
from fallbackformer.evaluation.governance_report import governance_lines
from fallbackformer.governance.governor import govern
from fallbackformer.monitoring.metrics import prometheus_text
from fallbackformer.runtime.events import ListSink
from fallbackformer.runtime.online_risk import FeedbackConfig


@pytest.fixture(scope="module")
def bundle() -> ff.FallbackModel:
    return ff.load("checkpoints/digits")


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits_splits(seed=0)["test"]


def _fresh(bundle: ff.FallbackModel, **kw) -> ff.FallbackModel:
    router = copy.deepcopy(bundle.router) if bundle.router is not None else None  # own threshold buffer too
    model = bundle.rebuild(gates={n: _copy_gate(bundle.gates[n]) for n in bundle.path_names}, router=router, **kw)
    model.bundle_manifest = bundle.bundle_manifest
    return model


def _copy_gate(gate: ff.ConfidenceGate) -> ff.ConfidenceGate:
    return ff.ConfidenceGate.from_config(gate.to_config())  # own threshold buffer: the controller moves it


def _serve(model: ff.FallbackModel, x: torch.Tensor, y: torch.Tensor, label: bool = True) -> tuple[int, int]:
    answered = wrong = 0
    for i in range(len(y)):
        out = model(x[i:i + 1])
        if label:
            model.feedback(out.request_id, int(y[i]))
        if out.served_by[0] != "default":
            answered += 1
            wrong += int(out.prediction[0] != y[i])
    return answered, wrong


@pytest.mark.parametrize("corruption", [
    "zigzag", *[pytest.param(c, marks=pytest.mark.slow) for c in sorted(HELD_OUT - {"zigzag"})]])
def test_online_risk_control_on_held_out_shift_keeps_error_near_alpha(bundle, test_split, corruption) -> None:
    x, y = test_split
    model = _fresh(bundle)
    gov = govern(model)
    xs = torch.cat([corrupt(x, corruption, 5, seed=s) for s in range(3)])  # 3 x the test split, severity 5
    a1, w1 = _serve(model, x, y)
    a2, w2 = _serve(model, xs, y.repeat(3))
    fb = model.stats()["governance"]["feedback"]
    assert fb["n_labels"] >= 1000
    alpha = max(t["alpha"] for t in fb["targets"].values())
    assert (w1 + w2) / (a1 + a2) <= alpha + 0.02, (w1 + w2) / (a1 + a2)
    assert abs(fb["error_rate"] - (w1 + w2) / (a1 + a2)) < 1e-9
    # the thresholds in force are the buffers that save/ONNX read
    for name, t in fb["targets"].items():
        buffer = model.router.threshold if name == "router" else model.gates[name].threshold
        assert float(buffer) == pytest.approx(t["lambda"], abs=1e-6)
    # and the same stream without the controller breaks it
    static = _fresh(bundle)
    govern(static, feedback=False)
    s1, v1 = _serve(static, x, y, label=False)
    s2, v2 = _serve(static, xs, y.repeat(3), label=False)
    assert (v1 + v2) / (s1 + s2) > alpha + 0.1


def test_stats_events_signals_metrics_and_report_lines(bundle, test_split) -> None:
    x, y = test_split
    sink = ListSink()
    model = _fresh(bundle, sinks=[sink])
    govern(model, window=200, check_every=50)
    _serve(model, x, y)
    shifted = corrupt(x, "fog", 5, seed=0)
    fired = []
    for i in range(len(y)):
        out = model(shifted[i:i + 1])
        fired += out.signals
        model.feedback(out.request_id, int(y[i]))
    assert "routing_instability" in fired and "fallback_creep" in fired
    st = model.stats()
    assert st["signals"]["routing_instability"] == 1
    gov = st["governance"]
    assert gov["feedback"]["n_labels"] == 2 * len(y)
    ev = sink.events[-1].governance  # the controller's state travels in the events
    assert set(ev) == {"lambda", "error_rate", "n_labels", "label_free_accuracy"}
    text = prometheus_text(st)
    for name in ("fallbackformer_monitor_alarms_total", "fallbackformer_threshold_in_force",
                 "fallbackformer_label_free_accuracy", "fallbackformer_signals_total"):
        assert name in text
    lines = governance_lines(gov)
    assert len(lines) == 5 and lines[0].startswith("routing instability: 1 alarm")


def test_unknown_expired_and_ungoverned_feedback_never_raise(bundle, test_split) -> None:
    x, _ = test_split
    model = _fresh(bundle)
    assert not model.feedback("nope", 1).accepted  # no governor: a message, not an exception
    govern(model, feedback=FeedbackConfig(capacity=2))
    ids = [model(x[i:i + 1]).request_id for i in range(3)]
    r = model.feedback(ids[0], 1)
    assert not r.accepted and "expired" in r.message
    assert model.feedback(ids[2], [1]).accepted
    counts = model.stats()["governance"]["feedback"]["counts"]
    assert counts["unknown"] == 1 and counts["expired"] == 1
    assert model.observe_slices(ids[2], "site=a") and not model.observe_slices("nope", "site=a")
    assert not model.observe_slices(ids[2], ["no-equals"])


def test_label_free_estimate_tracks_accuracy_on_clean(bundle, test_split) -> None:
    x, y = test_split
    model = _fresh(bundle)
    gov = govern(model, feedback=FeedbackConfig(window=1000))
    a, w = _serve(model, x, y, label=False)
    est = gov.controller.label_free_accuracy()
    assert abs(est - (1 - w / a)) < 0.05


def test_caller_slices_reach_the_disparity_monitor(bundle, test_split) -> None:
    """Site b's client sends a third of its images out of range: the safe default serves those
    (``invalid_input``), site b's fallback rate leaves site a's behind, and the monitor names it."""
    import dataclasses

    x, y = test_split
    model = _fresh(bundle, policy=dataclasses.replace(bundle.policy, on_invalid_input="default"))
    gov = govern(model, window=400, check_every=100, slice_min_answers=40)
    broken = x.clone()
    broken[::3] = broken[::3] * 3 + 1  # out of the input spec's 0..16 range
    fired = []
    g = torch.Generator().manual_seed(0)
    for t in range(800):
        i = int(torch.randint(0, len(y), (1,), generator=g))
        site_b = t % 4 == 0
        out = model((broken if site_b else x)[i:i + 1])
        assert model.observe_slices(out.request_id, "site=b" if site_b else "site=a")
        fired += out.signals
    assert "slice_disparity" in fired
    worst = gov.stats()["monitors"]["slices"]["worst"]
    assert worst["slice"] == "site=b", worst
