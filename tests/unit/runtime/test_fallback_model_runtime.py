"""FallbackModel runtime mechanisms on a fake clock with scripted stage latencies.

Each test names the mechanism and the reason it must produce; times are exact (fake clock).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.runtime.breaker import BreakerConfig, BreakerState
from fallbackformer.runtime.clock import HANG
from fallbackformer.runtime.events import ListSink
from fallbackformer.runtime.latency import LatencyProfile
from fallbackformer.runtime.testing import ConstHead, FeatureHead, build, seed

X1 = torch.zeros(1, 4)


# ---------------------------------------------------------------- admission: deadline_predicted


def test_a_stage_predicted_to_overrun_is_not_started() -> None:
    model, clock, stages, student = build([2.0, 2.0, 2.0], student_script=1.0, budget_ms=6.0, hedge="off")
    seed(model, {"stage_0": 2.0, "stage_1": 2.0, "stage_2": 3.0, "student": 1.0})
    out = model(X1)
    # stage 0: 0 + 2 + 1 <= 6; stage 1: 2 + 2 + 1 <= 6; stage 2: 4 + 3 + 1 > 6 -> not started
    assert [s.calls for s in stages] == [1, 1, 0]
    assert out.served_by == ["student"] and out.reason == ["deadline_predicted"]
    assert out.latency_ms == 5.0


def test_admission_counts_the_stages_up_to_the_next_exit_that_can_serve() -> None:
    # exit_1 after stage 0 accepts nothing (threshold inf): its head is skipped and the first
    # segment runs to the final exit, so the whole primary (4 ms) must fit at once.
    model, clock, stages, student = build(
        [2.0, 2.0], student_script=1.0, thresholds=[float("inf"), 0.5, 0.5], budget_ms=4.5, hedge="off"
    )
    seed(model, {"stage_0": 2.0, "stage_1": 2.0, "student": 1.0})
    out = model(X1)
    assert [s.calls for s in stages] == [0, 0]
    assert out.reason == ["deadline_predicted"] and out.latency_ms == 1.0
    model.policy = ff.Policy(budget_ms=4.5, margin_ms=0.0, hedge="off", admission=False)
    assert model(X1).served_by == ["primary"]


def test_the_margin_is_kept_free() -> None:
    model, clock, stages, student = build([2.0], student_script=1.0, budget_ms=4.0, margin_ms=1.5, hedge="off")
    seed(model, {"stage_0": 2.0, "student": 1.0})
    assert model(X1).reason == ["deadline_predicted"]  # 2 + 1 + 1.5 > 4
    model.policy = ff.Policy(budget_ms=4.0, margin_ms=1.0, hedge="off")
    assert model(X1).served_by == ["primary"]  # 2 + 1 + 1 <= 4


# ---------------------------------------------------------------- cooperative check: deadline_exceeded


def test_a_stage_slower_than_predicted_stops_the_walk_at_the_next_stage() -> None:
    model, clock, stages, student = build([8.0, 2.0], student_script=1.0, budget_ms=6.0, hedge="off")
    out = model(X1)  # no profile: admission predicts 0 ms and lets stage 0 start
    assert [s.calls for s in stages] == [1, 0]
    assert out.served_by == ["student"] and out.reason == ["deadline_exceeded"]
    assert out.latency_ms == 9.0  # without hedging the overrun is not bounded: hedge="always" is


def test_an_exit_that_answers_after_the_deadline_does_not_serve() -> None:
    heads = {0: ConstHead(1), 1: ConstHead(2)}  # exit_1 is confident on everything
    model, clock, stages, student = build([7.0, 1.0], heads=heads, thresholds=[0.5, 0.5, 0.5], budget_ms=6.0, hedge="off")
    out = model(X1)
    assert out.served_by == ["student"] and out.reason == ["deadline_exceeded"]
    assert stages[1].calls == 0


# ---------------------------------------------------------------- hard deadline: hedging


def test_hedged_call_returns_at_the_deadline_when_the_primary_hangs_then_refuses_at_once() -> None:
    model, clock, stages, student = build(
        [1.0, HANG], student_script=1.0, budget_ms=10.0, hedge="always", hedge_workers=1, hedge_max_stuck=0
    )
    seed(model, {"student": 1.0})
    out = model(X1)
    assert out.served_by == ["student"] and out.reason == ["deadline_exceeded"]
    assert out.latency_ms == 10.0  # the student ran at 10 - 1 - 0 = 9 ms, done by the deadline
    out = model(X1)  # the worker is still stuck: no queueing behind it
    assert out.reason == ["deadline_predicted"] and out.served_by == ["student"]
    assert out.latency_ms == 1.0 and stages[0].calls == 1
    assert model.stats()["hedge"] == {"submitted": 1, "refused": 1, "timeouts": 1, "workers": 1, "busy_workers": 1,
                                      "stuck": 1}
    stages[1].release()
    clock.advance(0)
    assert model.stats()["hedge"]["busy_workers"] == 0
    model.close()


def test_deferred_student_is_not_computed_when_the_primary_is_on_time() -> None:
    model, clock, stages, student = build([2.0, 2.0], student_script=1.0, budget_ms=10.0, hedge="always")
    seed(model, {"student": 1.0})
    out = model(X1)
    assert out.served_by == ["primary"] and out.latency_ms == 4.0
    assert student.calls == 0
    model.close()


def test_immediate_student_runs_beside_the_primary() -> None:
    model, clock, stages, student = build(
        [2.0, 2.0], student_script=1.0, budget_ms=10.0, hedge="always", hedge_student_start="immediate"
    )
    out = model(X1)
    assert out.served_by == ["primary"] and out.latency_ms == 4.0 and student.calls == 1
    model.close()


def test_a_slow_primary_still_serves_when_it_beats_the_deadline_after_the_student_started() -> None:
    # the student is due at 10 - 1 (p99) - 0 (margin) - 2.5 (hand-off allowance: min(3, 10 / 4)) = 6.5 ms
    model, clock, stages, student = build([3.0, 3.0], student_script=1.0, budget_ms=10.0, hedge="always")
    seed(model, {"student": 1.0})
    out = model(X1)  # the primary answered at 6, before the student was due
    assert out.served_by == ["primary"] and student.calls == 0 and out.latency_ms == 6.0
    model.close()
    model, clock, stages, student = build([4.0, 5.5], student_script=1.0, budget_ms=10.0, hedge="always")
    seed(model, {"student": 1.0})
    out = model(X1)  # the student ran from 6.5 to 7.5, the primary answered at 9.5: the primary serves
    assert out.served_by == ["primary"] and student.calls == 1 and out.latency_ms == 9.5
    model.close()


def test_early_exits_taken_before_the_deadline_stand_in_a_hedged_call() -> None:
    heads = {0: FeatureHead(0, 1), 1: ConstHead(2)}
    model, clock, stages, student = build(
        [1.0, HANG], heads=heads, thresholds=[0.9, 0.5, 0.5], student_script=1.0, budget_ms=10.0, hedge="always"
    )
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [2.0, 0, 0, 0]])
    out = model(x)
    assert out.served_by == ["exit_1", "student", "exit_1"]
    assert out.reason == ["", "deadline_exceeded", ""]
    assert out.prediction.tolist() == [1, 0, 1] and out.latency_ms == 10.0
    stages[1].release()
    model.close()


def test_auto_hedges_after_a_stall_and_when_slack_is_small() -> None:
    model, clock, stages, student = build([20.0, 1.0], student_script=1.0, budget_ms=10.0, hedge_after_stall_calls=2,
                                          hedge="auto")
    out = model(X1)  # calm so far: inline, the stall is seen only afterwards
    assert out.reason == ["deadline_exceeded"] and "hedge" not in model.stats()
    stages[0].script = [1.0]
    stages[0].calls = 0
    model(X1)
    model(X1)
    assert model.stats()["hedge"]["submitted"] == 2  # the next two calls were hedged
    model(X1)
    assert model.stats()["hedge"]["submitted"] == 2  # then inline again
    seed(model, {"stage_0": 4.0, "stage_1": 4.0, "student": 1.0})  # slack 10 - 9 < 2.5
    model(X1)
    assert model.stats()["hedge"]["submitted"] == 3
    model.close()


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "primary_error"),
        (RuntimeError("boom"), "primary_error"),
    ],
)
@pytest.mark.parametrize("hedge", ["off", "always"])
def test_exceptions_fall_back_with_primary_error(step: BaseException, reason: str, hedge: str) -> None:
    sink = ListSink()
    model, clock, stages, student = build([1.0, step], student_script=1.0, hedge=hedge)
    model.sinks.append(sink)
    out = model(torch.zeros(2, 4))
    assert out.served_by == ["student", "student"] and out.reason == [reason, reason]
    assert type(step).__name__ in sink.events[0].detail
    model.close()


def test_nonfinite_rows_fall_back_per_sample() -> None:
    class HalfNaN(nn.Module):
        def forward(self, h):
            out = torch.zeros(h.shape[0], 3)
            out[:, 2] = 10.0
            out[h[:, 0] > 0] = float("nan")
            return out

    model, clock, stages, student = build([1.0, 1.0], heads={0: ConstHead(1, 0.0), 1: HalfNaN()})
    out = model(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    assert out.served_by == ["student", "primary"] and out.reason == ["nonfinite_output", ""]


def test_a_stage_that_changes_the_batch_size_is_a_primary_error() -> None:
    class Drop(nn.Module):
        def forward(self, h):
            return h[:1]

    model, clock, stages, student = build([1.0, 1.0])
    stages[1].inner = Drop()  # the second stage (its scripted time kept) now drops samples
    out = model(torch.zeros(3, 4))
    assert out.reason == ["primary_error"] * 3


def test_a_failing_student_leaves_the_default_and_says_why() -> None:
    sink = ListSink()
    model, clock, stages, student = build([RuntimeError("primary down")], student_script=ValueError("student down"), default_class=2)
    model.sinks.append(sink)
    out = model(X1)
    assert out.served_by == ["default"] and out.reason == ["primary_error"] and out.prediction.tolist() == [2]
    assert "primary down" in sink.events[0].detail and "student down" in sink.events[0].detail


# ---------------------------------------------------------------- breaker and rollback


def test_the_breaker_opens_on_failures_and_lets_a_trial_through_later() -> None:
    cfg = BreakerConfig(sliding_window_size=4, minimum_number_of_calls=4, wait_duration_in_open_ms=100.0,
                        permitted_number_of_calls_in_half_open=1)
    boom = RuntimeError("boom")
    model, clock, stages, student = build([[boom, boom, boom, boom, 1.0]], student_script=0.0, breaker=cfg)
    for _ in range(4):
        assert model(X1).reason == ["primary_error"]
    assert model.breaker.state == BreakerState.OPEN
    out = model(X1)
    assert out.reason == ["breaker_open"] and out.served_by == ["student"] and stages[0].calls == 4
    clock.advance(100)
    assert model(X1).served_by == ["primary"]  # the half-open trial succeeds
    assert model.breaker.state == BreakerState.CLOSED
    assert model.stats()["breaker"]["transitions"] == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


def test_timeouts_count_as_breaker_failures() -> None:
    cfg = BreakerConfig(sliding_window_size=2, minimum_number_of_calls=2)
    model, clock, stages, student = build([30.0], student_script=0.0, budget_ms=10.0, hedge="off", breaker=cfg)
    model(X1)
    model(X1)
    assert model.breaker.state == BreakerState.OPEN


def test_the_rollback_switch_serves_the_fallback_path_until_it_is_turned_off() -> None:
    model, clock, stages, student = build([1.0], student_script=0.0, rollback=True)
    out = model(torch.zeros(2, 4))
    assert out.served_by == ["student"] * 2 and out.reason == ["breaker_open"] * 2 and stages[0].calls == 0
    assert model.breaker.state == BreakerState.FORCED_OPEN
    model.set_rollback(False)
    assert model(X1).served_by == ["primary"]
    model.set_rollback(True)
    assert model(X1).reason == ["breaker_open"]


def test_policy_round_trip_with_the_new_fields() -> None:
    p = ff.Policy(budget_ms=5.0, hedge="always", breaker=BreakerConfig(sliding_window_size=7), compile="auto")
    assert ff.Policy.from_dict(p.to_dict()) == p
    assert ff.Policy.from_dict({"breaker": {"sliding_window_size": 3}}).breaker == BreakerConfig(sliding_window_size=3)
    for bad in ({"hedge": "sometimes"}, {"compile": "yes"}, {"hedge_workers": 0}, {"hedge_student_start": "late"}):
        with pytest.raises(ValueError, match="Policy"):
            ff.Policy(**bad)


# ---------------------------------------------------------------- early exits


def test_per_sample_exits_compact_the_batch_and_keep_the_order() -> None:
    heads = {0: FeatureHead(0, 1), 1: FeatureHead(1, 2), 2: ConstHead(0)}
    model, clock, stages, student = build([1.0, 1.0, 1.0], heads=heads, thresholds=[0.9, 0.9, 0.5, 0.5])
    seen: list[int] = []
    stages[2].inner = _RowCounter(seen)
    x = torch.tensor([[1.0, -1, 0, 0], [-1.0, 1, 0, 0], [-1.0, -1, 0, 0], [1.0, 1, 0, 0]])
    out = model(x)
    assert out.served_by == ["exit_1", "exit_2", "primary", "exit_1"]
    assert out.prediction.tolist() == [1, 2, 0, 1]
    assert seen == [1]  # only the one sample no exit took reached the last stage


class _RowCounter(nn.Module):
    def __init__(self, seen: list[int]) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, h):
        self.seen.append(h.shape[0])
        return h


# ---------------------------------------------------------------- warm-up, compile, events


def test_warm_up_seeds_the_profile_with_what_serving_measures() -> None:
    model, clock, stages, student = build([2.0, 3.0], student_script=0.5)
    report = model.warm_up(torch.zeros(4, 4), repeats=8, discard=1, batch_sizes=[1, 4])
    assert model.profile.p99("stage_1", 4) == 3.0 and model.profile.p99("student", 1) == 0.5
    assert model.profile.count("stage_0") == 16
    assert report["latency"]["stage_0"][4]["p50"] == 2.0


class _Slow(nn.Module):
    """Stands for a compiled module that is slower (or faster) than eager."""

    def __init__(self, inner: nn.Module, seconds: float) -> None:
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, *a):
        if self.seconds:
            import time

            time.sleep(self.seconds)
        return self.inner(*a)


def test_compile_auto_keeps_the_faster_per_module_and_on_uses_compiled() -> None:
    model, clock, stages, student = build([0.0, 0.0], compile="auto")
    compiled: list[str] = []

    def fake_compile(module: nn.Module):
        compiled.append(type(module).__name__)
        return _Slow(module, 0.002 if isinstance(module, ConstHead) else 0.0)

    model.compile_fn = fake_compile
    model.warm_up(torch.zeros(2, 4), repeats=3, discard=1)
    report = model.compile_report
    assert report["head_1"]["choice"] == "eager" and report["head_1"]["compiled_ms"] > report["head_1"]["eager_ms"]
    assert set(report) == {"transform", "stage_0", "stage_1", "head_0", "head_1", "student"}
    assert model(X1).served_by == ["primary"]

    model, clock, stages, student = build([0.0], compile="off")
    ran: list[str] = []

    class _Ran(_Slow):  # a "compiled" module that says when it runs
        def forward(self, *a):
            ran.append(type(self.inner).__name__)
            return super().forward(*a)

    model.compile_fn = lambda m: _Ran(m, 0.0)
    assert model(X1).served_by == ["primary"] and ran == []  # compile="off": eager modules
    model.policy = ff.Policy(budget_ms=10.0, compile="on")  # the next call runs compiled modules
    assert model(X1).served_by == ["primary"]
    assert {"Identity", "ScriptedDelay", "ConstHead"} <= set(ran)  # the transform, stage_0 and its head ran compiled


def test_events_carry_the_audit_fields() -> None:
    sink = ListSink()
    model, clock, stages, student = build([2.0, 30.0], student_script=1.0, budget_ms=10.0, hedge="off")
    model.sinks.append(sink)
    model.model_hashes = {"primary": "abc"}
    out = model(torch.zeros(2, 4))
    assert len(sink.events) == 2
    e = sink.events[1]
    assert (e.request_id, e.sample, e.served_by, e.reason) == (out.request_id, 1, "student", "deadline_exceeded")
    assert e.budget_ms == 10.0 and e.elapsed_ms == out.latency_ms == 33.0
    assert e.stage_ms == [2.0, 30.0] and e.model_hashes == {"primary": "abc"} and e.confidence > 0.9


def test_a_broken_sink_does_not_break_serving() -> None:
    class Broken:
        def emit(self, event):
            raise OSError("disk full")

    model, clock, stages, student = build([RuntimeError("x")])
    model.sinks.append(Broken())
    assert model(X1).served_by == ["student"]
    assert model.flush_events(timeout_s=10.0)  # (sinks run on the dispatcher thread)
    assert model.stats()["sink_errors"] == 1


# ---------------------------------------------------------------- admission when hedged, probes


def test_hedged_admission_starts_a_stage_that_will_likely_finish_in_time() -> None:
    # p99 of stage 0 is a stall (20 ms) but its median is 2 ms: inline admission refuses it, a
    # hedged call starts it (the student covers the stall).
    model, clock, stages, student = build([2.0], student_script=1.0, budget_ms=10.0, hedge="off")
    for ms in [2.0] * 90 + [20.0] * 10:
        model.profile.record("stage_0", 1, ms)
    seed(model, {"student": 1.0})
    assert model(X1).reason == ["deadline_predicted"] and stages[0].calls == 0
    model.policy = ff.Policy(budget_ms=10.0, margin_ms=0.0, hedge="always")
    assert model(X1).served_by == ["primary"] and stages[0].calls == 1
    model.close()


def test_a_probe_refreshes_a_profile_that_keeps_refusing_the_primary() -> None:
    model, clock, stages, student = build([1.0], student_script=0.0, budget_ms=10.0, hedge="off", probe_every=3)
    model.profile = LatencyProfile(window=4, min_samples=1)
    model.profile.record("stage_0", 1, 50.0)  # an old stall
    assert [model(X1).reason[0] for _ in range(3)] == ["deadline_predicted"] * 3
    assert stages[0].calls == 0
    out = model(X1)  # the probe: admission lifted once
    assert out.served_by == ["primary"] and stages[0].calls == 1
    for _ in range(4):
        model(X1)
    assert stages[0].calls == 2  # the old stall still in the window: refused 3 times, probed again
