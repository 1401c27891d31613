"""Policy: the reliability contract a FallbackModel serves under."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fallbackformer.runtime.breaker import BreakerConfig

INVALID_INPUT_ACTIONS = ("raise", "default")
DRIFT_ACTIONS = ("alert", "default", "student")
HEDGE_MODES = ("off", "auto", "always")
HEDGE_STARTS = ("deferred", "immediate")
LARGE_BATCH_ACTIONS = ("split", "raise")
COMPILE_MODES = ("off", "on", "auto")
#: ``Policy.max_concurrency``: as many calls as this process has cores to run them on
CORES = "cores"


@functools.cache
def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, read once; ``os.cpu_count()`` without one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (no affinity on macOS and Windows)
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Policy:
    """What the runtime promises and how it degrades.

    Frozen: derive a changed policy with ``dataclasses.replace(policy, budget_ms=...)`` and assign it
    (``model.policy = ...``); the model applies it then (breaker, rollback, worker pools, compile).

    Attributes:
        budget_ms: the latency budget of one call.
        default_class: the safe default's class, or ``None`` for the default to abstain (-1).
        on_invalid_input: ``"raise"`` a clear error, or serve the safe ``"default"`` with reason
            ``invalid_input`` for the bad samples only.
        margin_ms: safety margin kept free for the fallback path when checking the deadline.
        admission: before each stage, skip it (reason ``deadline_predicted``) when the elapsed time
            plus the predicted p99 of the stages up to the next exit, the student's p99 and the margin
            would overrun the budget. In a hedged call the student is already provided for and the
            deadline is enforced by the caller, so a stage is started when it is more likely than not
            to finish by budget - margin (its predicted p50 is used; a stage that would then miss
            costs compute on the worker, never latency). Predictions come from the model's latency
            profile (seed it with ``FallbackModel.warm_up``); a path without measurements is
            predicted at 0 ms. Inline calls read them from a plan per batch bucket that is rebuilt
            as soon as a new measurement may raise a p99, and every 64 calls: in between its
            figures are never below the profile's, so admission only errs on the safe side.
        hedge: the hard deadline. ``"always"`` (the default): the primary runs on a worker thread and
            the call returns by budget - margin whatever it does, on the first call too and when the
            primary hangs forever; the student (and the router's student-first pass) runs on a worker
            as well, so a slow or hanging student makes the default answer (``deadline_exceeded``),
            and sinks run on a dispatcher thread. No call returns later than the budget plus the
            return path after the deadline (the margin absorbs it; under 1 ms on an idle machine).
            It costs a thread hand-off per call (about 75 us on the 2-core benchmark machine; two
            with a router: the student first, then the primary) and there a primary about 30% slower
            on a worker that wakes on cold caches (BENCHMARKS.md: ``ratio hedged``). ``"auto"`` (an
            opt-in for less overhead, accepting the risk): inline while the predicted slack is
            comfortable and the primary has not stalled recently, hedged otherwise, so a primary that
            hangs before it ever stalled holds the call (forever if it hangs forever), and the student
            runs inline. ``"off"``: everything on the calling thread (deadline checks between stages
            only; a hang holds the call).
        hedge_slack_ms: ``"auto"`` hedges when budget minus the predicted p99 of the whole primary,
            the student and the margin is below this; ``None`` means a quarter of the budget.
        hedge_after_stall_calls: ``"auto"`` hedges this many calls after the primary missed a deadline.
        hedge_student_start: in a hedged call, ``"deferred"`` starts the student only when waiting
            longer for the primary would leave it no time (deadline - student p99 - margin - a hand-off
            allowance of min(3 ms, budget / 4)), so it runs only when needed (at once while the student has never been timed); ``"immediate"`` starts
            it at once, beside the primary.
        hedge_workers: primaries (and, separately, students) that may run at once on healthy workers.
        hedge_max_stuck: the bulkhead: a worker whose call has already answered without it (its task
            timed out) is *stuck*; the pool grows by up to this many workers beside stuck ones, so
            healthy calls are not starved by stalls (``stats()["hedge"]["stuck"]`` counts them).
            Beyond that a call does not queue: it falls back at once (reason ``deadline_predicted``).
        max_concurrency: calls that may walk the primary at once on this model (they share the same
            cores); a call that finds them all taken is served by the student at once (reason
            ``deadline_predicted``, detail ``over max_concurrency=N``), so a burst costs the excess
            calls a student's time instead of making every call wait its turn on the cores and miss
            its deadline. ``"cores"`` (the default): the number of cores this process may run on
            (:func:`usable_cores`; a bundle keeps ``"cores"``, so it follows the machine it is
            loaded on). A single caller is never over it. ``None``: no limit.
        max_batch: the largest batch served as one; ``None``: no limit.
        on_large_batch: a batch over ``max_batch`` is ``"split"`` into chunks served one after the
            other under the one deadline (later chunks fall back when time runs out), or refused with
            a ``ValueError`` (``"raise"``).
        event_queue: events waiting for the sinks that run on the dispatcher thread; a full queue
            drops the event and counts it (``stats()["events_dropped"]``), never blocks a call.
        breaker: a :class:`~fallbackformer.runtime.breaker.BreakerConfig` (or its dict) to put a
            circuit breaker in front of the primary (reason ``breaker_open``); ``None`` for none.
        rollback: the rollback switch: the breaker is forced open and every call is served by the
            fallback path (reason ``breaker_open``).
        compile: ``"off"``: eager; ``"on"``: ``torch.compile`` each stage, head and the student
            (compiled on first use: call ``FallbackModel.warm_up`` before serving); ``"auto"``:
            ``warm_up`` times eager against compiled per module and keeps the faster.
        latency_window: recent samples per stage and batch bucket kept by the latency profile.
        probe_every: after this many calls in a row in which admission did not even start the
            primary, the next call starts it anyway (hedged unless ``hedge="off"``), so its
            profile is refreshed once it is fast again; 0 never probes.
        drift_check: watch the calibration-time distribution of the first live gate's score
            (it sees every request the primary walks) with a sequential two-sample KS test
            (:class:`~fallbackformer.gates.drift.ScoreDriftMonitor`); a rejection raises the
            signal ``calibration_drift`` (in ``FallbackOutput.signals`` and ``stats()``).
        on_drift: ``"alert"``: signal and count only; ``"default"``: once drift is detected, every
            answer is the safe default with reason ``calibration_drift`` until
            ``FallbackModel.reset_drift()`` (after recalibration); ``"student"``: from the call
            after the detection until ``reset_drift()``, the primary and its exits are skipped and
            the student answers (reason ``calibration_drift``; where the student's gate rejects, the
            default), for a student that holds up better under shift than the primary (the shift
            report's mCE tells whether yours does).
        drift_window: recent scores tested.
        drift_level: false-alarm probability over ``drift_horizon`` requests (Bonferroni over looks).
        drift_check_every: scores between two looks.
        drift_horizon: stream length over which ``drift_level`` holds.
    """

    budget_ms: float = 50.0
    default_class: int | None = None
    on_invalid_input: str = "raise"
    margin_ms: float = 0.5
    admission: bool = True
    hedge: str = "always"
    hedge_slack_ms: float | None = None
    hedge_after_stall_calls: int = 100
    hedge_student_start: str = "deferred"
    hedge_workers: int = 2
    hedge_max_stuck: int = 16
    max_concurrency: int | str | None = CORES
    max_batch: int | None = None
    on_large_batch: str = "split"
    event_queue: int = 1024
    breaker: BreakerConfig | None = None
    rollback: bool = False
    compile: str = "off"
    latency_window: int = 512
    probe_every: int = 100
    drift_check: bool = False
    on_drift: str = "alert"
    drift_window: int = 100
    drift_level: float = 0.01
    drift_check_every: int = 25
    drift_horizon: int = 5000

    def __post_init__(self) -> None:
        if not self.budget_ms > 0:
            raise ValueError(f"Policy.budget_ms must be > 0; got {self.budget_ms!r}")
        if self.margin_ms < 0:
            raise ValueError(f"Policy.margin_ms must be >= 0; got {self.margin_ms!r}")
        if self.on_invalid_input not in INVALID_INPUT_ACTIONS:
            raise ValueError(
                f"Policy.on_invalid_input={self.on_invalid_input!r}; use one of {INVALID_INPUT_ACTIONS}"
            )
        if self.default_class is not None and (not isinstance(self.default_class, int) or self.default_class < 0):
            raise ValueError(
                f"Policy.default_class={self.default_class!r}; use a class index >= 0, or None to abstain"
            )
        for name, allowed in (
            ("hedge", HEDGE_MODES),
            ("hedge_student_start", HEDGE_STARTS),
            ("compile", COMPILE_MODES),
            ("on_drift", DRIFT_ACTIONS),
            ("on_large_batch", LARGE_BATCH_ACTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Policy.{name}={getattr(self, name)!r}; use one of {allowed}")
        if self.hedge_slack_ms is not None and not self.hedge_slack_ms >= 0:
            raise ValueError(f"Policy.hedge_slack_ms must be >= 0 or None; got {self.hedge_slack_ms!r}")
        if not 0.0 < self.drift_level < 1.0:
            raise ValueError(f"Policy.drift_level must lie in (0, 1); got {self.drift_level!r}")
        for name in ("hedge_after_stall_calls", "hedge_workers", "latency_window", "probe_every",
                     "drift_window", "drift_check_every", "drift_horizon", "hedge_max_stuck", "event_queue"):
            v = getattr(self, name)
            minimum = 0 if name in ("hedge_after_stall_calls", "probe_every", "hedge_max_stuck") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"Policy.{name} must be an int >= {minimum}; got {v!r}")
        for name in ("max_concurrency", "max_batch"):
            v = getattr(self, name)
            if name == "max_concurrency" and v == CORES:
                continue
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                also = f", {CORES!r} (one per core)" if name == "max_concurrency" else ""
                raise ValueError(f"Policy.{name} must be an int >= 1{also}, or None for no limit; got {v!r}")
        if isinstance(self.breaker, Mapping):  # from a manifest or a Hydra config
            object.__setattr__(self, "breaker", BreakerConfig.from_dict(dict(self.breaker)))
        if self.breaker is not None and not isinstance(self.breaker, BreakerConfig):
            raise ValueError(
                f"Policy.breaker must be a BreakerConfig, its dict, or None; got {type(self.breaker).__name__}"
            )

    @property
    def effective_hedge_slack_ms(self) -> float:
        """The slack below which ``hedge="auto"`` hedges."""
        return 0.25 * self.budget_ms if self.hedge_slack_ms is None else float(self.hedge_slack_ms)

    @property
    def concurrency_limit(self) -> int | None:
        """``max_concurrency`` as a number of calls (``"cores"`` resolved on this machine), ``None``: no limit."""
        v = self.max_concurrency
        return usable_cores() if v == CORES else v  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Policy":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Policy fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)
