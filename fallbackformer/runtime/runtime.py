"""Runtime: what a graph cannot hold, driving the decision module stage by stage.

One call (:meth:`Runtime.serve`):

1. Validate the input (a clear error, or the safe default for the bad samples only).
2. With a router, the student runs first for every valid sample (its logits are evidence).
3. Admission: calls over ``max_concurrency``, a drift that routes away, an open breaker (or the
   rollback switch) keep the primary from starting; after ``probe_every`` refusals in a row a call
   probes it anyway.
4. The primary's walk (:mod:`~fallbackformer.runtime.walk`), inline or on a worker under the hard
   deadline (:mod:`~fallbackformer.runtime.hedged_call`); its outcome goes to the breaker and the
   stall detector (``hedge="auto"`` hedges the next calls after a stall).
5. The student for the samples the primary did not serve (:mod:`~fallbackformer.runtime.fallback_path`),
   the safe default for the rest; the drift check and the governor read the answer; the records
   count it and send its events (:mod:`~fallbackformer.runtime.records`).

The policy is applied when it is set (``runtime.policy = p``): the breaker, the rollback switch,
the worker pools and compilation follow it. A thread may serve its calls under its own policy
(:meth:`Runtime.policy_override`, for per-request budgets); the breaker, pools and compilation keep
following the shared one.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from fallbackformer.rungs.cache import CacheConfig, ResponseCache
from fallbackformer.rungs.defaults import SafeDefault
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.admission import AdmissionPlan, AdmissionPlanner
from fallbackformer.runtime.breaker import BreakerConfig, BreakerState, CircuitBreaker
from fallbackformer.runtime.clock import NS_PER_MS, Clock, MonotonicClock
from fallbackformer.runtime.decisions import Decisions
from fallbackformer.runtime.dispatch import join_outputs, register_for_exit
from fallbackformer.runtime.drift_guard import DriftGuard
from fallbackformer.runtime.events import EventSink
from fallbackformer.runtime.fallback_path import run_student, student_first
from fallbackformer.runtime.hedged_call import hedged_primary
from fallbackformer.runtime.hedging import Hedger
from fallbackformer.runtime.ladder_path import apply_default, run_ladder
from fallbackformer.runtime.latency import LatencyProfile
from fallbackformer.runtime.output import FallbackOutput
from fallbackformer.runtime.policy import Policy
from fallbackformer.runtime.records import Records
from fallbackformer.runtime.request_state import RequestState
from fallbackformer.runtime.units import CompileFn, batch_of, choose_compiled, compiled_units, timed_pass, torch_compile
from fallbackformer.runtime.validation import InputSpec, InvalidInputError, bad_samples, check_batch, describe_bad_samples
from fallbackformer.runtime.walk import FAILURES, STALLS, PrimaryWalk

__all__ = ["STUDENT_WORKERS", "Runtime"]

#: healthy student workers a model may start (threads start only as needed: about one per call in flight)
STUDENT_WORKERS = 32


class Runtime:
    """The deadline, admission, hedging, breaker, monitors, counters and sinks of one model.

    Args:
        decisions: the decision module it drives.
        policy: the budget and the degradation rules.
        input_spec: the raw input's per-sample shape, dtype and value range, for validation.
        clock: the time source; a fake clock makes deadline tests deterministic.
        sinks: receivers of fallback events.
        profile: the latency profile admission reads (a fresh one by default).
        breaker: a circuit breaker to use instead of the one ``policy.breaker`` describes.
        cache: the response cache rung's configuration (``None``: no cache).
        default: the typed safe default (``None``: ``policy.default_class`` decides, as a class or -1).
    """

    def __init__(self, decisions: Decisions, policy: Policy | None = None, *, input_spec: InputSpec | None = None,
                 clock: Clock | None = None, sinks: Iterable[EventSink] = (), profile: LatencyProfile | None = None,
                 breaker: CircuitBreaker | None = None, cache: CacheConfig | None = None,
                 default: SafeDefault | None = None) -> None:
        policy = policy if policy is not None else Policy()
        self.decisions = decisions
        self.input_spec = input_spec
        self.clock: Clock = clock or MonotonicClock()
        self.sinks: list[EventSink] = list(sinks)
        self.model_hashes: dict[str, str] = {}
        self.profile = profile or LatencyProfile(window=policy.latency_window)
        self.records = Records()
        self.drift = DriftGuard()
        self.governor: Any = None  # (issue 14) fallbackformer.governance.governor.govern(model) sets it
        #: the function ``compile`` policies use (tests swap it for a fake); called as ``fn(module)``
        self.compile_fn: CompileFn = torch_compile
        self.compile_report: dict[str, dict[str, Any]] = {}
        self.refused_in_row = 0  # calls in a row whose primary admission refused at stage 0
        self._planner = AdmissionPlanner(decisions.stage_names)
        self._lock = threading.Lock()
        self._given_breaker = breaker
        self.breaker: CircuitBreaker | None = breaker
        self._hedgers: dict[str, Hedger | None] = {"primary": None, "student": None}
        self._hedge_calls_left = 0
        self._in_flight = 0  # calls holding a slot under max_concurrency
        self._bounds: tuple[InputSpec | None, float | None, float | None] | None = None
        self._local: threading.local | None = None  # per-thread policies (policy_override)
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]
        self.steps = decisions.steps()
        self.cache, self.default = ladder_ends(cache, default, policy, self.clock)
        self._policy: Policy | None = None
        self.policy = policy

    # ------------------------------------------------------------------ the policy

    @property
    def policy(self) -> Policy:
        """The policy of calls on this thread: its override (:meth:`policy_override`), else the shared one."""
        local = self._local
        if local is not None:
            override = getattr(local, "policy", None)
            if override is not None:
                return override
        return self._policy  # type: ignore[return-value]

    @policy.setter
    def policy(self, policy: Policy) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a fallbackformer.Policy; got {type(policy).__name__}. "
                            "Derive one with dataclasses.replace(model.policy, budget_ms=...)")
        with self._lock:
            old, self._policy = self._policy, policy
            self._apply_breaker(old, policy)
            for role, hedger in self._hedgers.items():  # a pool of another size is made afresh on next use
                if hedger is not None and (hedger.max_stuck != policy.hedge_max_stuck
                                           or hedger.max_workers != _pool_size(policy, role)):
                    self._hedgers[role] = None
                    hedger.close()
            if old is None or old.compile != policy.compile:
                self.use_units(*compiled_units(self.decisions, self.compile_fn) if policy.compile == "on"
                                else (self.decisions.pieces(), {}))

    @property
    def base_policy(self) -> Policy:
        """The shared policy (what calls without a thread override use)."""
        return self._policy  # type: ignore[return-value]

    @contextlib.contextmanager
    def policy_override(self, policy: Policy | None) -> Iterator[None]:
        """Within the block, calls on this thread use ``policy`` (``None``: the shared one)."""
        if self._local is None:
            with self._lock:
                if self._local is None:
                    self._local = threading.local()
        local = self._local
        previous = getattr(local, "policy", None)
        local.policy = policy
        try:
            yield
        finally:
            local.policy = previous

    def _apply_breaker(self, old: Policy | None, policy: Policy) -> None:
        """The breaker the policy describes (unless one was given) and the rollback switch (held lock)."""
        if self._given_breaker is None:
            if policy.breaker is None and not policy.rollback:
                self.breaker = None
            elif self.breaker is None or old is None or old.breaker != policy.breaker:
                self.breaker = CircuitBreaker(policy.breaker or BreakerConfig(), clock=self.clock)
        breaker = self.breaker
        if breaker is not None:
            if policy.rollback:
                breaker.force_open()
            elif breaker.state == BreakerState.FORCED_OPEN:
                breaker.reset()

    def use_units(self, units: dict[str, Any], report: dict[str, dict[str, Any]]) -> None:
        """Run the decision module's pieces through ``units`` from the next call on (``report``: how each runs)."""
        self.compile_report = report
        self.steps = self.decisions.steps(units)

    def warm_up(self, x: torch.Tensor, repeats: int, discard: int, batch_sizes: Sequence[int] | None) -> dict[str, Any]:
        """Seed the profile (and decide compilation): see ``FallbackModel.warm_up``."""
        x = check_batch(x, self.input_spec)
        sizes = sorted(set(batch_sizes or (1, x.shape[0])))
        with torch.inference_mode():
            if self.policy.compile == "auto":
                self.use_units(*choose_compiled(self.decisions, self.compile_fn, x, repeats, discard))
            for bs in sizes:
                xb = batch_of(x, bs)
                for _ in range(discard):
                    timed_pass(self.steps, xb, self.clock, None)
                for _ in range(repeats):
                    timed_pass(self.steps, xb, self.clock, self.profile)
        return {"compile": dict(self.compile_report), "latency": self.profile.summary()}

    # ------------------------------------------------------------------ one call

    def serve(self, x: torch.Tensor) -> FallbackOutput:
        """Answer a batch of raw inputs ``[B, ...]`` within the policy's budget (``FallbackModel.forward``)."""
        clock = self.clock
        start_ns = clock.now_ns()
        policy = self.policy
        deadline_ns = start_ns + int(policy.budget_ms * NS_PER_MS)
        x = check_batch(x, self.input_spec)
        limit = policy.max_batch
        slots = policy.concurrency_limit
        over = self._enter(slots)
        try:
            if limit is None or x.shape[0] <= limit:
                out = self._serve(x, policy, start_ns, deadline_ns, over)
            elif policy.on_large_batch == "raise":
                raise ValueError(
                    f"a batch of {x.shape[0]} samples is over Policy.max_batch={limit}; send batches of at "
                    f"most {limit}, raise max_batch, or set on_large_batch='split'"
                )
            else:  # chunks one after the other under the one deadline; each is recorded as a call
                out = join_outputs([self._serve(x[i:i + limit], policy, start_ns, deadline_ns, over)
                                    for i in range(0, x.shape[0], limit)])
        finally:
            if slots is not None and not over:
                with self._lock:
                    self._in_flight -= 1
        out.latency_ms = (clock.now_ns() - start_ns) / NS_PER_MS
        return out

    def _enter(self, slots: int | None) -> bool:
        """Take one of ``slots`` (``Policy.concurrency_limit``); whether the call is over it (it then
        holds none: a semaphore, so that many calls walk the primary at once however many are over)."""
        if slots is None:
            return False
        with self._lock:
            if self._in_flight >= slots:
                return True
            self._in_flight += 1
            return False

    def shed(self, x: torch.Tensor, detail: str) -> FallbackOutput:
        """The safe default at once, running nothing, recorded like any call (``FallbackModel.shed``)."""
        start_ns, policy = self.clock.now_ns(), self.policy
        x = check_batch(x, self.input_spec)
        seq, b = next(self._ids), x.shape[0]
        state = RequestState(b, start_ns, start_ns + int(policy.budget_ms * NS_PER_MS), seq, self.steps.live_exits())
        state.set_reason(self._valid_indices(x, state, policy), R.DEADLINE_PREDICTED, b, only_unset=True)
        state.add_detail(detail)
        latency_ms = (self.clock.now_ns() - start_ns) / NS_PER_MS
        out = state.output(latency_ms, f"{self._id_prefix}-{seq}", default_prediction(policy), x.device)
        if self.default is not None:
            apply_default(self, out, x, state)
        self.records.record(out, state, policy.budget_ms, self.sinks, self.model_hashes, self.governor,
                            policy.event_queue)
        return out

    def _serve(self, x: torch.Tensor, policy: Policy, start_ns: int, deadline_ns: int, over: bool) -> FallbackOutput:
        """One batch, checked and within ``max_batch``, served by ``deadline_ns``."""
        seq = next(self._ids)
        b = x.shape[0]
        state = RequestState(b, start_ns, deadline_ns, seq, self.steps.live_exits())
        with contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode():
            valid = self._valid_indices(x, state, policy)  # None: every sample is valid
            n_valid = b if valid is None else int(valid.numel())
            if n_valid > 0 and self.steps.router is not None:
                student_first(self, x, valid, state, policy)
            if n_valid > 0:
                outcome = self._primary(x, valid, state, policy, n_valid, over)
                if outcome is not None:
                    self._after_primary(outcome, state.primary_ms, policy)
                if self.has_ladder:
                    run_ladder(self, x, valid, state, policy)
                else:
                    rest = state.unserved(valid, x.device)
                    if rest is not None and rest.numel() > 0:
                        run_student(self, x, rest, state, policy)
                if state.student_late:  # the student could not answer in time: the default did
                    late = state.unserved(valid, x.device)
                    if late is not None:
                        state.set_reason(late, R.DEADLINE_EXCEEDED, b, caller=True)
            latency_ms = (self.clock.now_ns() - start_ns) / NS_PER_MS
            out = state.output(latency_ms, f"{self._id_prefix}-{seq}", default_prediction(policy), x.device)
            if self.default is not None:
                apply_default(self, out, x, state)
            if self.cache is not None:  # confident answers of the primary's path, for identical inputs later
                self.cache.store(x, out.prediction, out.confidence, out.served_by, out.logits)
            self._watch(out, state, policy)
        self.records.record(out, state, policy.budget_ms, self.sinks, self.model_hashes, self.governor,
                            policy.event_queue)
        return out

    @property
    def has_ladder(self) -> bool:
        """Whether anything besides the student stands between the primary and the default."""
        return bool(self.steps.rungs) or bool(self.steps.veto) or self.cache is not None

    def _valid_indices(self, x: torch.Tensor, state: RequestState, policy: Policy) -> torch.Tensor | None:
        """Indices of the valid samples, ``None`` when all are (the fast path: one reduction)."""
        spec = self.input_spec
        bounds = self._bounds
        if bounds is None or bounds[0] is not spec:
            bounds = self._bounds = (spec, *_accepted_range(spec))
        if bounds[1] is not None:
            x_min, x_max = x.aminmax()  # (the method and .item(): the cheapest calls for a scalar)
            if bounds[1] <= x_min.item() and x_max.item() <= bounds[2]:  # NaN fails both
                return None
        elif bool(torch.isfinite(x).all()):
            return None
        bad = bad_samples(x, spec)
        if not bool(bad.any()):
            return None
        if policy.on_invalid_input == "raise":
            raise InvalidInputError(describe_bad_samples(x, bad, spec))
        state.set_reason(torch.nonzero(bad).flatten(), R.INVALID_INPUT, x.shape[0])
        return torch.nonzero(~bad).flatten()

    def _primary(self, x: torch.Tensor, valid: torch.Tensor | None, state: RequestState, policy: Policy,
                 n_valid: int, over: bool) -> str | None:
        """Admit and walk the primary (inline or hedged); its outcome, ``None`` when it was not admitted."""
        b = x.shape[0]
        if over:  # more calls in flight than the cores can serve on time: the student serves now
            state.set_reason(valid, R.DEADLINE_PREDICTED, b)
            state.add_detail(f"over max_concurrency={policy.concurrency_limit}")
            self.records.count_refused()
            return None
        if policy.on_drift == "student" and self.drift.routes(policy):
            state.set_reason(valid, R.CALIBRATION_DRIFT, b)  # the student serves
            return None
        breaker = self.breaker
        if breaker is not None and not breaker.try_acquire():
            state.set_reason(valid, R.BREAKER_OPEN, b)
            return None
        if policy.probe_every and self.refused_in_row >= policy.probe_every:
            state.probe = True  # admission has refused the primary for a while: try it once
            self.refused_in_row = 0
        if self._should_hedge(policy, state, n_valid):
            return hedged_primary(self, x, valid, state, policy)
        t0 = self.clock.now_ns()
        PrimaryWalk(self, x, valid, state, policy, None).run()
        state.primary_ms = (self.clock.now_ns() - t0) / NS_PER_MS
        return state.outcome

    def _after_primary(self, outcome: str, duration_ms: float, policy: Policy) -> None:
        """Report the primary's outcome to the breaker and the stall detector."""
        if self.breaker is not None:
            if outcome in FAILURES:
                self.breaker.on_error(duration_ms)
            else:
                self.breaker.on_success(duration_ms)
        if outcome in STALLS and policy.hedge == "auto":
            with self._lock:
                self._hedge_calls_left = policy.hedge_after_stall_calls

    def _watch(self, out: FallbackOutput, state: RequestState, policy: Policy) -> None:
        """The drift check and the governor read the answer; their signals are counted."""
        if policy.drift_check and state.drift_scores is not None:
            gate = self.drift_gate(state.live)
            reference = self.decisions.gates[gate].reference_scores
            if self.drift.check(out, state.drift_scores, policy, gate, reference, default_prediction(policy)):
                self.records.count_signals([R.CALIBRATION_DRIFT])
        governor = self.governor
        if governor is not None:  # --- governance hook (issue 14): remember for feedback, feed the monitors
            fired = governor.after_answer(out, list(state.timings))
            if fired:
                out.signals.extend(fired)
                self.records.count_signals(fired)

    def drift_gate(self, live: tuple[bool, ...] | None = None) -> str:
        """The gate the drift check watches: the first that can serve (it sees every sample walked)."""
        steps = self.steps
        live = steps.live_exits() if live is None else live
        return steps.exit_at[next(i for i, ok in enumerate(live) if ok)]

    # ------------------------------------------------------------------ hedging and admission

    def plan(self, n: int, policy: Policy, live: tuple[bool, ...], hedged: bool, seq: int) -> AdmissionPlan:
        """Admission at batch size ``n`` (cached per batch bucket; see ``runtime/admission.py``)."""
        return self._planner.plan(self.profile, n, policy, live, hedged, seq)

    def _should_hedge(self, policy: Policy, state: RequestState, n: int) -> bool:
        mode = policy.hedge
        if mode == "off":
            return False
        if mode == "always" or state.probe:
            return True
        if self._hedge_calls_left > 0:  # (an unlocked read first: the lock only when a stall was seen)
            with self._lock:
                if self._hedge_calls_left > 0:
                    self._hedge_calls_left -= 1
                    return True
        predicted = self.plan(n, policy, state.live, False, state.seq).total_ms
        return policy.budget_ms - predicted < policy.effective_hedge_slack_ms

    def hedger(self, policy: Policy, device: torch.device, role: str = "primary") -> Hedger:
        """The worker pool of ``role`` (``"primary"`` or ``"student"``), made on first use."""
        with self._lock:
            hedger = self._hedgers[role]
            if hedger is None:
                hedger = self._hedgers[role] = Hedger(  # students: one per call in flight (made only when needed)
                    max_workers=_pool_size(policy, role),
                    clock=self.clock,
                    name=f"fallbackformer-{role}",
                    cuda_streams=device.type == "cuda",
                    max_stuck=policy.hedge_max_stuck,
                )
                # close the workers when the runtime is collected; at interpreter exit the exit hook
                # cancels and joins them (a thread killed inside a torch operator aborts the process)
                weakref.finalize(self, Hedger.close, hedger).atexit = False
                register_for_exit(hedger)
            return hedger

    def note_primary_timeout(self) -> None:
        """A hedged call stopped waiting for its primary (its worker is now stuck)."""
        hedger = self._hedgers["primary"]
        if hedger is not None:
            hedger.note_timeout()

    # ------------------------------------------------------------------ counters and shutdown

    def stats(self) -> dict[str, Any]:
        """Counters since construction: calls, answers by path, fallbacks by reason, hedging, breaker."""
        out = self.records.counters()
        policy = self.base_policy
        monitor = self.drift.monitor(policy)
        if monitor is not None:
            out["drift"] = monitor.state()
        for role, key in (("primary", "hedge"), ("student", "student_hedge")):
            hedger = self._hedgers[role]
            if hedger is not None:
                out[key] = hedger.stats()
        if self.breaker is not None:
            out["breaker"] = self.breaker.metrics()
        if self.governor is not None:  # --- governance hook (issue 14)
            out["governance"] = self.governor.stats()
        return out

    def close(self, timeout_s: float | None = 0.0) -> None:
        """Stop the worker pools and the event dispatcher (a hung primary's thread is a daemon)."""
        with self._lock:
            hedgers = list(self._hedgers.values())
            self._hedgers = {"primary": None, "student": None}
        for hedger in hedgers:
            if hedger is not None:
                hedger.close(timeout_s)
        self.records.close(timeout_s)


def ladder_ends(cache: CacheConfig | None, default: SafeDefault | None, policy: Policy,
                clock: Clock) -> tuple[ResponseCache | None, SafeDefault | None]:
    """The response cache (on the runtime's clock) and the typed default, checked."""
    if cache is not None and not isinstance(cache, CacheConfig):
        raise TypeError(f"cache must be a fallbackformer.rungs.CacheConfig or None; got {type(cache).__name__}")
    if default is not None:
        if not isinstance(default, SafeDefault):
            raise TypeError(f"default must be a fallbackformer.rungs.SafeDefault (Abstain, ConstantClass, Prior, "
                            f"Coarse, CallableDefault); got {type(default).__name__}")
        if policy.default_class is not None:
            raise ValueError(f"both Policy.default_class={policy.default_class} and default={default!r} are set; "
                             "give the default one way: default=ConstantClass(c), and default_class=None")
    return (None if cache is None else ResponseCache.from_config(cache, clock)), default


def default_prediction(policy: Policy) -> int:
    """The safe default's class, ``-1`` where it abstains."""
    return -1 if policy.default_class is None else int(policy.default_class)


def _pool_size(policy: Policy, role: str) -> int:
    """Healthy workers of a pool: ``hedge_workers`` primaries; a student per call in flight (made as needed;
    calls over ``max_concurrency`` need one too)."""
    return policy.hedge_workers if role == "primary" else STUDENT_WORKERS


def _accepted_range(spec: InputSpec | None) -> tuple[float | None, float | None]:
    """The raw values the spec accepts, its range widened by the tolerance of ``bad_samples``."""
    if spec is None or spec.value_range is None:
        return None, None
    lo, hi = spec.value_range
    tol = 1e-3 * (hi - lo)
    return lo - tol, hi + tol
