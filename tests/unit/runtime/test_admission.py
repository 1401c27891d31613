"""Admission plans: the limits they compute, and when a cached plan is rebuilt."""

from __future__ import annotations

import math

import pytest

import fallbackformer as ff
from fallbackformer.runtime.admission import PLAN_REFRESH_CALLS, AdmissionPlan, AdmissionPlanner
from fallbackformer.runtime.latency import LatencyProfile

STAGES = ("stage_0", "stage_1", "stage_2")


def _profile(**p99: float) -> LatencyProfile:
    profile = LatencyProfile(window=4, min_samples=1)
    for name, ms in p99.items():
        profile.record(name, 1, ms)
    return profile


def test_limits_count_the_segment_up_to_the_next_live_exit_and_the_student() -> None:
    profile = _profile(stage_0=1.0, stage_1=2.0, stage_2=3.0, student=0.5)
    policy = ff.Policy(budget_ms=10.0, margin_ms=0.25)
    plan = AdmissionPlan.build(profile, STAGES, (1, 1, 2), 1, policy, hedged=False)  # exits after 1 and 2
    assert plan.limits == pytest.approx([(10 - 3 - 0.75) * 1e6, (10 - 2 - 0.75) * 1e6, (10 - 3 - 0.75) * 1e6])
    assert plan.student_ms == 0.5 and plan.total_ms == pytest.approx(6.75)
    hedged = AdmissionPlan.build(profile, STAGES, (1, 1, 2), 1, policy, hedged=True)  # medians, no student
    assert hedged.limits == pytest.approx([(10 - 3 - 0.25) * 1e6, (10 - 2 - 0.25) * 1e6, (10 - 3 - 0.25) * 1e6])
    roomy = AdmissionPlan.build(LatencyProfile(), STAGES, (2, 2, 2), 1, ff.Policy(budget_ms=1.0, margin_ms=0.0), False)
    assert roomy.limits == (1_000_000,) * 3  # nothing measured: the deadline itself, never beyond


def test_a_plan_stays_conservative_and_follows_a_faster_machine_within_the_refresh() -> None:
    planner, policy, live = AdmissionPlanner(("stage_0",)), ff.Policy(budget_ms=10.0, margin_ms=0.0), (True,)
    profile = _profile(student=1.0)
    for ms in [6.0, 1.0, 1.0, 1.0]:
        profile.record("stage_0", 1, ms)
    stale = planner.plan(profile, 1, policy, live, False, seq=0)
    assert stale.limits[0] == (10.0 - 6.0 - 1.0) * 1e6
    profile.submit([("stage_0", 1, 1.0)])  # pushes the 6 ms out of the window
    assert profile.predict_p99("stage_0", 1) == 1.0  # what a reader sees is exact ...
    assert planner.plan(profile, 1, policy, live, False, seq=1) is stale  # ... the plan: higher, kept
    fresh = planner.plan(profile, 1, policy, live, False, seq=PLAN_REFRESH_CALLS)
    assert fresh.limits[0] == (10.0 - 1.0 - 1.0) * 1e6


def test_a_plan_is_rebuilt_when_a_p99_may_rise_or_the_policy_or_exits_change() -> None:
    planner, live = AdmissionPlanner(STAGES), (False, True, True)
    profile = _profile(stage_0=1.0, stage_1=1.0, stage_2=1.0, student=1.0)
    policy = ff.Policy(budget_ms=10.0)
    plan = planner.plan(profile, 1, policy, live, False, seq=0)
    assert planner.plan(profile, 1, policy, live, False, seq=1) is plan
    assert planner.plan(profile, 3, policy, live, False, seq=1) is not plan  # another batch bucket
    profile.submit([("stage_1", 1, 4.0)])  # a slow stage: added at once, p99_version moves
    slow = planner.plan(profile, 1, policy, live, False, seq=2)
    assert slow is not plan and slow.limits[0] < plan.limits[0]
    assert planner.plan(profile, 1, ff.Policy(budget_ms=12.0), live, False, seq=2) is not slow
    assert planner.plan(profile, 1, policy, (True, True, True), False, seq=2).limits[0] > slow.limits[0]
    assert planner.segment_ends((False, True, True)) == (1, 1, 2)
    assert math.isfinite(slow.total_ms)
