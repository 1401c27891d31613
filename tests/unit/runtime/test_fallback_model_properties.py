"""Properties of the deadline machinery over random latency scripts (fake clock, hypothesis)."""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fallbackformer.runtime.latency import LatencyProfile
from fallbackformer.runtime.testing import ConstHead, FeatureHead, build

NS = 1_000_000

stage_ms = st.one_of(
    st.floats(min_value=0.0, max_value=4.0),  # usual
    st.floats(min_value=10.0, max_value=200.0),  # a stall
)


@st.composite
def systems(draw: Any) -> dict[str, Any]:
    n_stages = draw(st.integers(min_value=1, max_value=4))
    calls = 8
    return {
        "scripts": [draw(st.lists(stage_ms, min_size=calls, max_size=calls)) for _ in range(n_stages)],
        "student_ms": draw(st.floats(min_value=0.0, max_value=2.0)),
        "budget_ms": draw(st.floats(min_value=0.5, max_value=40.0)),
        "margin_ms": draw(st.sampled_from([0.0, 0.5, 1.0])),
        # early exits: live (a per-sample gate) or off (threshold inf); the final exit is always live
        "live": [draw(st.booleans()) for _ in range(n_stages - 1)],
        "batch": draw(st.integers(min_value=1, max_value=4)),
        "calls": calls,
    }


def _model(sysd: dict[str, Any], **policy: Any):
    n = len(sysd["scripts"])
    heads = {i: FeatureHead(i % 4, 1) for i in range(n - 1)}
    heads[n - 1] = FeatureHead(3, 2)
    thresholds = [0.9 if live else math.inf for live in sysd["live"]] + [0.9, 0.0]
    model, clock, stages, student = build(
        sysd["scripts"],
        student_script=sysd["student_ms"],
        heads=heads,
        thresholds=thresholds,
        budget_ms=sysd["budget_ms"],
        margin_ms=sysd["margin_ms"],
        profile=LatencyProfile(min_samples=1),
        **policy,
    )
    for s in stages:
        s.cycle = False
    return model, clock, stages, student


class _StartSpy:
    """A forward pre-hook: checks the admission inequality each time its stage starts."""

    def __init__(self, index: int, ctx: dict[str, Any]) -> None:
        self.index, self.ctx = index, ctx

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        h, ctx, i = args[0], self.ctx, self.index
        model = ctx["model"]
        elapsed = (model.clock.now_ns() - ctx["start_ns"]) / NS
        live = ctx["live"] + [True]
        end = next(j for j in range(i, len(live)) if live[j])
        p = model.profile
        n = h.shape[0]
        predicted = sum(p.predict_p99(f"stage_{j}", n) for j in range(i, end + 1)) + p.predict_p99("student", n)
        ctx["starts"].append((i, elapsed, predicted))
        # (an assert here would be caught by the runtime as a primary error: record, check outside)
        if elapsed + predicted + model.policy.margin_ms > model.policy.budget_ms + 1e-9:
            ctx["violations"].append((i, elapsed, predicted))


class _AnswerSpy:
    """A forward hook: records when each exit head answered, per call."""

    def __init__(self, name: str, ctx: dict[str, Any]) -> None:
        self.name, self.ctx = name, ctx

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        self.ctx["answered"][self.name] = self.ctx["model"].clock.now_ns()


def _instrument(model: Any, sysd: dict[str, Any]) -> dict[str, Any]:
    ctx: dict[str, Any] = {"model": model, "live": list(sysd["live"]), "starts": [], "answered": {}, "violations": []}
    primary = model.primary
    for i, stage in enumerate(primary.stages):
        stage.register_forward_pre_hook(_StartSpy(i, ctx))
    for k, s in enumerate(primary.exit_stages):
        primary.head(s).register_forward_hook(_AnswerSpy(primary.exit_names[k], ctx))
    return ctx


def _inputs(batch: int, call: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(call)
    return torch.randn(batch, 4, generator=g)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(systems())
def test_inline_never_starts_a_stage_predicted_to_overrun_and_never_serves_late(sysd: dict[str, Any]) -> None:
    model, clock, stages, student = _model(sysd, hedge="off")
    ctx = _instrument(model, sysd)
    for call in range(sysd["calls"]):
        ctx["answered"].clear()
        ctx["start_ns"] = clock.now_ns()
        out = model(_inputs(sysd["batch"], call))
        deadline = ctx["start_ns"] + sysd["budget_ms"] * NS
        for who in out.served_by:
            if who.startswith("exit_") or who == "primary":
                assert ctx["answered"][who] <= deadline, (who, out)
        assert set(out.reason) <= {"", "low_confidence", "deadline_predicted", "deadline_exceeded"}
    assert ctx["violations"] == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(systems(), st.sampled_from(["deferred", "immediate"]))
def test_hedged_calls_return_by_the_deadline_and_never_serve_late(sysd: dict[str, Any], start: str) -> None:
    model, clock, stages, student = _model(sysd, hedge="always", hedge_student_start=start, hedge_workers=1)
    model.profile.record("student", sysd["batch"], sysd["student_ms"])  # the student's time is known
    ctx = _instrument(model, sysd)
    try:
        for call in range(sysd["calls"]):
            ctx["answered"].clear()
            ctx["start_ns"] = clock.now_ns()
            out = model(_inputs(sysd["batch"], call))
            # the only fake time that is not the primary's is the student's own
            assert out.latency_ms <= max(sysd["budget_ms"], sysd["student_ms"] + sysd["margin_ms"]) + 1e-5  # (ns rounding)
            if sysd["budget_ms"] >= sysd["student_ms"] + sysd["margin_ms"]:
                assert out.latency_ms <= sysd["budget_ms"] + 1e-5
            deadline = ctx["start_ns"] + sysd["budget_ms"] * NS
            for i, who in enumerate(out.served_by):
                if who.startswith("exit_") or who == "primary":
                    assert ctx["answered"][who] <= deadline, (who, out)
    finally:
        clock.advance(10_000)  # let a stalled worker finish
        model.close()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(-1, 1)), min_size=1, max_size=12),
    st.lists(st.booleans(), min_size=2, max_size=2),
)
def test_batched_answers_equal_one_sample_at_a_time(rows: list[tuple[float, float, float]], live: list[bool]) -> None:
    """Compaction keeps every sample's answer and the original order."""
    heads = {0: FeatureHead(0, 1), 1: FeatureHead(1, 2), 2: FeatureHead(2, 0)}
    thresholds = [0.9 if live[0] else math.inf, 0.9 if live[1] else math.inf, 0.9, 0.0]
    model, clock, stages, student = build([0.0] * 3, heads=heads, thresholds=thresholds, student_head=ConstHead(1, 5.0))
    x = torch.tensor([[a, b, c, 0.0] for a, b, c in rows])
    out = model(x)
    for i in range(len(rows)):
        one = model(x[i : i + 1])
        assert out.served_by[i] == one.served_by[0] and out.reason[i] == one.reason[0]
        assert out.prediction[i] == one.prediction[0]
        assert torch.allclose(out.logits[i], one.logits[0], equal_nan=True)
