"""The runtime calibration check: calibration_drift signalled, counted, and routed as the policy says."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.shift import corrupt
from fallbackformer.runtime.events import ListSink


def _stream(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x[torch.randint(0, len(x), (n,), generator=g)]


def test_clean_traffic_raises_no_drift_and_a_switch_to_a_corruption_does(digits_system):
    x_test = digits_system.splits["test"][0]
    policy = ff.Policy(budget_ms=1e6, drift_check=True, drift_window=100, drift_check_every=25, hedge="off")
    model = digits_system.fresh_model(policy=policy)
    clean = _stream(x_test, 600, seed=0)
    signals = [s for xb in clean.split(8) for s in model(xb).signals]
    assert signals == []
    assert model.stats()["drift"]["n_checks"] > 0
    shifted = corrupt(_stream(x_test, 400, seed=1), "pixelate", 5, seed=0)
    first = None
    for k, xb in enumerate(shifted.split(8)):
        if "calibration_drift" in model(xb).signals:
            first = (k + 1) * 8
            break
    assert first is not None and first <= 200, f"drift noticed after {first} requests"
    assert model.stats()["signals"]["calibration_drift"] >= 1
    # alert-only: answers still flow from the models
    assert set(model(x_test[:8]).served_by) != {"default"}


def test_on_drift_default_routes_every_answer_to_the_default_until_reset(digits_system):
    x_test = digits_system.splits["test"][0]
    sink = ListSink()
    policy = ff.Policy(budget_ms=1e6, drift_check=True, on_drift="default", hedge="off")
    model = digits_system.fresh_model(policy=policy, sinks=[sink])
    shifted = corrupt(_stream(x_test, 400, seed=2), "pixelate", 5, seed=0)
    for xb in shifted.split(8):
        model(xb)
    assert model.drift_monitor is not None and model.drift_monitor.drifted
    out = model(x_test[:5])
    assert out.served_by == ["default"] * 5 and out.reason == ["calibration_drift"] * 5
    assert out.prediction.tolist() == [-1] * 5 and torch.isnan(out.confidence).all()
    assert any(e.reason == "calibration_drift" for e in sink.events)
    model.reset_drift()
    assert "default" not in model(x_test[:5]).served_by


def test_drift_policy_is_validated():
    with pytest.raises(ValueError, match="on_drift"):
        ff.Policy(on_drift="panic")
    with pytest.raises(ValueError, match="drift_level"):
        ff.Policy(drift_level=1.5)
    assert dataclasses.asdict(ff.Policy())["drift_check"] is False


def test_on_drift_student_skips_the_primary_from_the_next_call_until_reset(digits_system):
    x_test, y_test = digits_system.splits["test"]
    policy = ff.Policy(budget_ms=1e6, drift_check=True, on_drift="student", hedge="off")
    model = digits_system.fresh_model(policy=policy)
    shifted = corrupt(_stream(x_test, 400, seed=2), "pixelate", 5, seed=0)
    detected = None
    for k, xb in enumerate(shifted.split(8)):
        out = model(xb)
        if "calibration_drift" in out.signals:
            detected = k
            assert "calibration_drift" not in out.reason  # the detecting call keeps its answers
            break
    assert detected is not None
    out = model(x_test)
    assert set(out.served_by) <= {"student", "default"} and set(out.reason) == {"calibration_drift"}
    served = [i for i, s in enumerate(out.served_by) if s == "student"]
    student_pred = model.student(x_test[served]).argmax(1)
    assert torch.equal(out.prediction[served], student_pred)
    assert (out.prediction == y_test).double().mean() > 0.9  # the student on clean digits
    model.reset_drift()
    assert "calibration_drift" not in model(x_test[:5]).reason
