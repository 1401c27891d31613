"""Admission: when a stage may still start, read off the latency profile once per batch bucket.

Before each stage the runtime compares the time elapsed with the stage's *limit*: the budget less
the predicted time of the stages up to the next exit that can serve, the student's p99 (it must
still fit after them) and the margin. Reading those predictions is the costliest part of admission,
so an :class:`AdmissionPlanner` keeps one :class:`AdmissionPlan` per batch bucket and rebuilds it
only when it could be wrong on the unsafe side: when a new measurement may raise a p99
(``LatencyProfile.p99_version``), when the budget, margin or live exits change, and every
``PLAN_REFRESH_CALLS`` calls so that admission also follows a machine that got faster. In between, a
plan's p99 figures are never below the profile's exact ones (tested in
``tests/unit/runtime/test_latency.py``), so it only ever refuses a stage the exact check would admit,
never the reverse. A hedged walk plans with medians, which any new sample may move: its plans follow
every change of the profile.
"""

from __future__ import annotations

from typing import Any

from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import NS_PER_MS
from fallbackformer.runtime.latency import LatencyProfile
from fallbackformer.runtime.policy import Policy

__all__ = ["PLAN_REFRESH_CALLS", "AdmissionPlan", "AdmissionPlanner"]

#: an inline admission plan is rebuilt at least this often (calls), to follow a machine that got faster
PLAN_REFRESH_CALLS = 64


class AdmissionPlan:
    """Admission at one batch bucket, read off the latency profile once and reused across calls.

    ``limits[i]``: the latest time (ns after the call's start) at which stage ``i`` may start: the
    budget less the predicted time of the stages up to the next live exit, the student's p99 (inline
    calls; a hedged call has its student provided for) and the margin, never past the budget.
    Inline plans predict each stage by its p99, hedged ones by its p50 (see ``Policy.admission``).
    """

    __slots__ = ("limits", "student_ms", "total_ms")

    def __init__(self, limits: tuple[float, ...], student_ms: float, total_ms: float) -> None:
        self.limits = limits
        self.student_ms = student_ms  # the student's predicted p99 (inline plans)
        self.total_ms = total_ms  # every stage's and the student's p99, and the margin (inline plans)

    @classmethod
    def build(
        cls,
        profile: LatencyProfile,
        stages: tuple[str, ...],
        ends: tuple[int, ...],
        n: int,
        policy: Policy,
        hedged: bool,
    ) -> AdmissionPlan:
        budget_ms, margin = policy.budget_ms, policy.margin_ms
        budget_ns = int(budget_ms * NS_PER_MS)
        if hedged:  # more likely than not to finish by budget - margin
            per_stage = profile.predict_many(stages, n, 0.5)
            student = 0.0
        else:  # the segment's p99 and then the student's p99 fit, with the margin
            *per_stage, student = profile.predict_p99_many((*stages, R.STUDENT), n)
        limits = tuple(
            min(budget_ns, (budget_ms - (sum(per_stage[i : ends[i] + 1]) + student + margin)) * NS_PER_MS)
            for i in range(len(stages))
        )
        return cls(limits, student, sum(per_stage) + student + margin)


class AdmissionPlanner:
    """The plans of one model's stages, per (batch bucket, hedged), with the validity rule above.

    Args:
        stages: the names of the primary's stages, in order (``stage_0``, ...).
    """

    def __init__(self, stages: tuple[str, ...]) -> None:
        self.stages = stages
        self._plans: dict[tuple[int, bool], tuple[tuple[Any, ...], AdmissionPlan]] = {}
        self._segments: dict[tuple[bool, ...], tuple[int, ...]] = {}

    def segment_ends(self, live: tuple[bool, ...]) -> tuple[int, ...]:
        """Per stage ``i``: the stage whose exit ends the segment that starts at ``i``."""
        ends = self._segments.get(live)
        if ends is None:
            n = len(live)
            ends = tuple(next(j for j in range(i, n) if live[j]) for i in range(n))
            self._segments[live] = ends
        return ends

    def plan(
        self, profile: LatencyProfile, n: int, policy: Policy, live: tuple[bool, ...], hedged: bool, seq: int
    ) -> AdmissionPlan:
        """The plan at batch size ``n`` for call number ``seq`` (cached; see the module docstring)."""
        version = profile.version if hedged else profile.p99_version
        key = (profile, version, seq // PLAN_REFRESH_CALLS, policy.budget_ms, policy.margin_ms, live)
        slot = (1 << (n - 1).bit_length(), hedged)
        entry = self._plans.get(slot)
        if entry is not None and entry[0] == key:
            return entry[1]
        plan = AdmissionPlan.build(profile, self.stages, self.segment_ends(live), n, policy, hedged)
        self._plans[slot] = (key, plan)  # (a dict store is atomic: threads at worst build twice)
        return plan
