"""FallbackModel: one nn.Module that answers on time and says who answered and why.

One call, end to end (DESIGN.md):

1. Validate the input (a clear error, or the safe default for the bad samples only).
2. The circuit breaker may refuse the primary (reason ``breaker_open``; the rollback switch forces it).
3. Walk the primary's stages. Before each stage: past the deadline -> ``deadline_exceeded``; elapsed
   time + predicted p99 of the stages up to the next exit + the student's p99 + the margin over the
   budget -> the stage is not started (``deadline_predicted``). After each exit head its gate decides
   per sample; samples that exit leave the batch (compaction) and later stages run on the rest only.
   An exit whose answer comes after the deadline does not serve (``deadline_exceeded``).
4. Samples the primary cannot serve (its final gate rejects, it raises, its output is non-finite or
   malformed, a deadline) go to the student; samples the student's gate rejects get the safe default.
5. The hard deadline (``Policy.hedge="always"``, the default): the primary and the student run on
   worker threads and the call takes whatever is ready at the deadline; the student is started in
   time to be ready by then, and a student that is not leaves the default (``deadline_exceeded``).
   Workers whose call already answered are *stuck*; the pool grows beside them up to a cap (the
   bulkhead), beyond which a call falls back at once rather than queue.
6. Calls over ``Policy.max_concurrency`` go to the student at once; batches over ``max_batch`` are
   split under the one deadline (or refused). Events reach the sinks on a dispatcher thread.

Every stage's measured time goes into a :class:`~fallbackformer.runtime.latency.LatencyProfile`
(seed it with :meth:`FallbackModel.warm_up`), which the admission check reads. Every answer not
served by the primary is counted and, when sinks are attached, recorded as a :class:`FallbackEvent`.
One model may serve many threads at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import threading
import time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fallbackformer.gates.drift import ScoreDriftMonitor
from fallbackformer.gates.evidence import Evidence
from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.gates.router import Router
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.admission import AdmissionPlan, AdmissionPlanner
from fallbackformer.runtime.breaker import BreakerConfig, BreakerState, CircuitBreaker
from fallbackformer.runtime.clock import NS_PER_MS, Clock, MonotonicClock, median_ms
from fallbackformer.runtime.dispatch import EventDispatcher, build_events, deliver, register_for_exit, join_outputs
from fallbackformer.runtime.events import EventSink, FallbackEvent
from fallbackformer.runtime.hedging import Hedger, HedgeStatus
from fallbackformer.runtime.latency import LatencyProfile
from fallbackformer.runtime.output import FallbackOutput
from fallbackformer.runtime.policy import Policy
from fallbackformer.runtime.request_state import RequestState
from fallbackformer.runtime.warm import warm_start
from fallbackformer.runtime.validation import (
    InputSpec,
    InvalidInputError,
    bad_samples,
    check_batch,
    describe_bad_samples,
)

STUDENT_UNIT = R.STUDENT
TRANSFORM_UNIT = "transform"

# Outcomes of the primary path, for the breaker and the stall detector.
_OK, _PREDICTED, _EXCEEDED, _ERROR, _NONFINITE, _TIMEOUT, _BUSY = (
    "ok",
    "predicted",
    "exceeded",
    "error",
    "nonfinite",
    "timeout",
    "busy",
)
#: time allowed for handing the student to its worker in a hedged call (it starts this much earlier)
HANDOFF_MS = 3.0
#: healthy student workers a model may start (threads start only as needed: about one per call in flight)
STUDENT_WORKERS = 32
#: calls whose answers are tallied into the counters in one pass (stats() always counts them all)
TALLY_BATCH = 64

_FAILURES = frozenset({_EXCEEDED, _ERROR, _NONFINITE, _TIMEOUT, _BUSY})
_STALLS = frozenset({_EXCEEDED, _TIMEOUT, _BUSY})


class FallbackModel(nn.Module):
    """A primary with early exits, a fallback student, calibrated gates and a policy.

    Args:
        primary: the primary, a :class:`MultiExitNet` (any user model cut into stages and heads).
        student: any module mapping the raw input ``[B, ...]`` to logits ``[B, C]``.
        gates: one :class:`ConfidenceGate` per exit and one for the student, as a sequence
            ``[exit_1, ..., primary, student]`` or a mapping from those names.
        policy: the budget and the degradation rules.
        input_spec: the raw input's per-sample shape, dtype and value range, for validation.
        clock: the time source (``now_ns()``); a fake clock makes deadline tests deterministic.
        sinks: receivers of :class:`FallbackEvent`.
        class_names: optional names of the classes, carried into bundles.
        profile: the latency profile to read and update (a fresh one by default; a bundle may
            bring one from its manifest).
        breaker: a circuit breaker to use instead of the one ``policy.breaker`` describes.
        router: a certified :class:`~fallbackformer.gates.router.Router`. With one, the student runs
            first for every valid sample and the router decides at every exit from the evidence
            (the gates then only serve the calibration-drift check); without, each gate decides alone.

    >>> model = FallbackModel(primary, student, gates, policy=Policy(budget_ms=5.0))  # doctest: +SKIP
    >>> model.warm_up(x_example)  # doctest: +SKIP
    >>> out = model(x)  # doctest: +SKIP
    """

    def __init__(
        self,
        primary: MultiExitNet,
        student: nn.Module,
        gates: Sequence[ConfidenceGate] | Mapping[str, ConfidenceGate],
        policy: Policy | None = None,
        *,
        input_spec: InputSpec | None = None,
        clock: Clock | None = None,
        sinks: Iterable[EventSink] = (),
        class_names: Sequence[str] | None = None,
        profile: LatencyProfile | None = None,
        breaker: CircuitBreaker | None = None,
        router: Router | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(primary, MultiExitNet):
            raise TypeError(
                f"primary must be a fallbackformer.MultiExitNet; got {type(primary).__name__}. "
                "Wrap your model: MultiExitNet(stages=[...blocks...], heads={last_index: head})"
            )
        self.primary = primary
        self.student = student
        self.path_names: list[str] = primary.exit_names + [R.STUDENT]
        self.gates = nn.ModuleDict(_gates_by_name(gates, self.path_names))
        if router is not None and router.num_exits != primary.num_exits:
            raise ValueError(f"the router routes {router.num_exits} heads; the primary has {primary.num_exits}. "
                             "Fit the router on this primary")
        self.router = router
        self.policy = policy or Policy()
        self.input_spec = input_spec
        self.clock: Clock = clock or MonotonicClock()
        self.sinks: list[EventSink] = list(sinks)
        self.class_names = list(class_names) if class_names is not None else None
        self.model_hashes: dict[str, str] = {}
        self.profile = profile or LatencyProfile(window=self.policy.latency_window)
        self._lock = threading.Lock()
        self.served_counts: Counter[str] = Counter()
        self.reason_counts: Counter[str] = Counter()
        self.calls = 0
        # per call (served_by, reasons), counted into the counters above in batches (see _record)
        self._tallies: deque[tuple[tuple[str, ...], tuple[str, ...]]] = deque()
        self.sink_errors = 0
        self.compile_report: dict[str, dict[str, Any]] = {}
        #: the function ``compile`` policies use (tests swap it for a fake); called as ``fn(module)``
        self.compile_fn: Callable[[nn.Module], Callable[..., Any]] = _torch_compile
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]
        self.signal_counts: Counter[str] = Counter()
        self._drift: tuple[tuple[Any, ...], ScoreDriftMonitor] | None = None
        self._drift_lock = threading.Lock()
        self._given_breaker = breaker
        self.breaker: CircuitBreaker | None = breaker
        self._hedger: Hedger | None = None  # the primary's workers
        self._student_hedger: Hedger | None = None
        self._dispatcher: EventDispatcher | None = None
        self._concurrency, self.concurrency_refused = [0], 0  # calls in flight (under max_concurrency)
        self._hedge_calls_left = 0
        self._refused_in_row = 0  # calls in a row whose primary admission refused at stage 0
        self._synced: tuple[Any, ...] | None = None
        self._bounds: tuple[InputSpec | None, float | None, float | None] | None = None  # (spec, low, high)
        # The stage plan: names, exits, and for each stage the stages up to the next exit.
        n = len(primary.stages)
        self._stage_names = tuple(f"stage_{i}" for i in range(n))
        self._exit_name = {s: self.path_names[k] for k, s in enumerate(primary.exit_stages)}
        self._units: dict[str, Callable[..., Any]] = {}
        self._planner = AdmissionPlanner(self._stage_names)
        self._no_exit = [False] * n
        self._live_cache: tuple[tuple[tuple[torch.Tensor | None, int], ...], tuple[bool, ...]] | None = None
        self._early_exits = [(s, self._exit_name[s]) for s in primary.exit_stages[:-1]]
        self._head_units = {s: f"head_{s}" for s in primary.exit_stages}
        self._eager_units()
        self._sync()
        # --- governance hook (issue 14): feedback, online risk control, monitors. Attach with
        # fallbackformer.governance.governor.govern(model); None: off. Duck-typed: no import here.
        self.governor: Any = None

    # ------------------------------------------------------------------ public

    def forward(self, x: torch.Tensor) -> FallbackOutput:
        """Answer a batch of raw inputs ``[B, ...]`` within the policy's budget.

        ``latency_ms`` of the answer is the call's whole wall time, its bookkeeping included; sinks
        run on a dispatcher thread, never on the caller's time.

        Raises:
            InvalidInputError: bad input under ``on_invalid_input="raise"``.
            ValueError: a batch over ``Policy.max_batch`` under ``on_large_batch="raise"``.
        """
        clock = self.clock
        start_ns = clock.now_ns()
        policy = self._sync()
        deadline_ns = start_ns + int(policy.budget_ms * NS_PER_MS)
        x = check_batch(x, self.input_spec)
        limit = policy.max_batch
        concurrency, slots = self._concurrency, policy.concurrency_limit
        over = False  # a call over the limit holds no slot (a semaphore: `slots` calls walk the primary at once)
        if slots is not None:
            with self._lock:
                over = concurrency[0] >= slots
                concurrency[0] += not over
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
                    concurrency[0] -= 1
        out.latency_ms = (clock.now_ns() - start_ns) / NS_PER_MS
        return out

    def _serve(self, x: torch.Tensor, policy: Policy, start_ns: int, deadline_ns: int, over: bool) -> FallbackOutput:
        """One batch, checked and within ``max_batch``, served by ``deadline_ns``."""
        seq = next(self._ids)
        b = x.shape[0]
        state = RequestState(b, start_ns, deadline_ns, seq, self._live_exits())
        with contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode():
            valid = self._valid_indices(x, state, policy)  # None: every sample is valid
            n_valid = b if valid is None else int(valid.numel())
            if n_valid > 0 and self.router is not None:
                self._student_first(x, valid, state, policy)
            if n_valid > 0:
                outcome = self._primary(x, valid, state, policy, n_valid, over)
                if outcome is not None:
                    self._after_primary(outcome, state.primary_ms, policy)
                rest = state.unserved(valid, x.device)
                if rest is not None and rest.numel() > 0:
                    self._run_student(x, rest, state, policy)
                if state.student_late:  # the student could not answer in time: the default did
                    late = state.unserved(valid, x.device)
                    if late is not None:
                        state.set_reason(late, R.DEADLINE_EXCEEDED, b, caller=True)
            latency_ms = (self.clock.now_ns() - start_ns) / NS_PER_MS
            out = state.output(latency_ms, f"{self._id_prefix}-{seq}", self._default_prediction(policy), x.device)
            if policy.drift_check and state.drift_scores is not None:
                self._check_drift(out, state.drift_scores, policy)
            governor = self.governor
            if governor is not None:  # --- governance hook (issue 14): remember for feedback, feed the monitors
                fired = governor.after_answer(out, list(state.timings))
                if fired:
                    out.signals.extend(fired)
                    with self._lock:
                        self.signal_counts.update(fired)
        self._record(out, state, policy)
        return out

    def _primary(
        self, x: torch.Tensor, valid: torch.Tensor | None, state: RequestState, policy: Policy, n_valid: int, over: bool
    ) -> str | None:
        """Admit and walk the primary (inline or hedged); its outcome, ``None`` when it was not admitted."""
        b = x.shape[0]
        breaker = self.breaker
        if over:  # more calls in flight than the cores can serve on time: the student serves now
            state.set_reason(valid, R.DEADLINE_PREDICTED, b)
            state.add_detail(f"over max_concurrency={policy.concurrency_limit}")
            with self._lock:
                self.concurrency_refused += 1
            return None
        if policy.on_drift == "student" and self._drift_routes(policy):
            state.set_reason(valid, R.CALIBRATION_DRIFT, b)  # the student serves
            return None
        if breaker is not None and not breaker.try_acquire():
            state.set_reason(valid, R.BREAKER_OPEN, b)
            return None
        if policy.probe_every and self._refused_in_row >= policy.probe_every:
            state.probe = True  # admission has refused the primary for a while: try it once
            self._refused_in_row = 0
        if self._should_hedge(policy, state, n_valid):
            return self._hedged(x, valid, state, policy)
        t0 = self.clock.now_ns()
        self._walk_primary(x, valid, state, policy, None)
        state.primary_ms = (self.clock.now_ns() - t0) / NS_PER_MS
        return state.outcome

    def warm_up(
        self,
        x: torch.Tensor,
        repeats: int = 20,
        discard: int = 3,
        batch_sizes: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Seed the latency profile (and decide compilation) before serving.

        Times every stage (its head and gate included, as served), the input transform (counted in
        the first stage) and the student on ``x`` cut or tiled to each batch size, and records the
        durations in :attr:`profile`. With ``policy.compile == "auto"`` it first times each module
        eager and compiled (median of ``repeats`` after ``discard`` untimed calls, compilation
        included in those) and keeps the faster; the decision is in :attr:`compile_report`.

        Args:
            x: an example raw batch ``[B, ...]`` (valid input).
            repeats: timed calls per measurement.
            discard: untimed calls first (lazy initialisation, compilation, caches).
            batch_sizes: batch sizes to profile; default ``{1, B}``.

        Returns:
            ``{"compile": compile_report, "latency": profile.summary()}``.
        """
        policy = self._sync()
        x = check_batch(x, self.input_spec)
        sizes = sorted(set(batch_sizes or (1, x.shape[0])))
        with torch.inference_mode():
            if policy.compile == "auto":
                self._choose_compiled(x, repeats, discard)
            for bs in sizes:
                xb = _batch_of(x, bs)
                for _ in range(discard):
                    self._timed_segments(xb, record=False)
                for _ in range(repeats):
                    self._timed_segments(xb, record=True)
        return {"compile": dict(self.compile_report), "latency": self.profile.summary()}

    def warm_start(self, max_s: float = 0.25) -> dict[str, Any]:
        """Make the first call keep the budget (``ff.load`` calls it): see :func:`fallbackformer.runtime.warm.warm_start`."""
        return warm_start(self, max_s)

    def shed(self, x: torch.Tensor, detail: str) -> FallbackOutput:
        """Answer ``x`` with the safe default at once, running nothing, recorded like any call (reason
        ``deadline_predicted``, ``detail`` says why): for a caller that cannot run the model in time, a
        server over its in-flight bound. Bad input is handled as in :meth:`forward`."""
        start_ns, policy = self.clock.now_ns(), self._sync()
        x = check_batch(x, self.input_spec)
        seq, b = next(self._ids), x.shape[0]
        state = RequestState(b, start_ns, start_ns + int(policy.budget_ms * NS_PER_MS), seq, self._live_exits())
        state.set_reason(self._valid_indices(x, state, policy), R.DEADLINE_PREDICTED, b, only_unset=True)
        state.add_detail(detail)
        latency_ms = (self.clock.now_ns() - start_ns) / NS_PER_MS
        out = state.output(latency_ms, f"{self._id_prefix}-{seq}", self._default_prediction(policy), x.device)
        self._record(out, state, policy)
        return out

    def stats(self) -> dict[str, Any]:
        """Counters since construction: calls, answers by path, fallbacks by reason, hedging, breaker."""
        with self._lock:
            self._tally_locked()
            total = sum(self.served_counts.values())
            fallbacks = self.served_counts[R.STUDENT] + self.served_counts[R.DEFAULT]
            out: dict[str, Any] = {
                "calls": self.calls,
                "answers": total,
                "served_by": dict(self.served_counts),
                "reasons": dict(self.reason_counts),
                "fallback_rate": fallbacks / total if total else 0.0,
                "sink_errors": self.sink_errors,
                "signals": dict(self.signal_counts),
                "concurrency_refused": self.concurrency_refused,
                "events_dropped": 0 if self._dispatcher is None else self._dispatcher.dropped,
            }
        if self._drift is not None and self.policy.drift_check:
            out["drift"] = self._drift[1].state()
        if self._hedger is not None:
            out["hedge"] = self._hedger.stats()
        if self._student_hedger is not None:
            out["student_hedge"] = self._student_hedger.stats()
        if self.breaker is not None:
            out["breaker"] = self.breaker.metrics()
        if self.governor is not None:  # --- governance hook (issue 14)
            out["governance"] = self.governor.stats()
        return out

    # --- governance hooks (issue 14): delegate to self.governor (fallbackformer.governance.governor)

    def feedback(self, request_id: str, label: Any, sample: int | None = None) -> Any:
        """A delayed (and possibly sampled) label for an answer already given; see ``Governor.feedback``.

        Never raises: an unknown or expired id, or no governor attached, is counted and described in
        the returned result's ``message`` (and ``stats()["governance"]``).
        """
        governor = self.governor
        if governor is None:
            from types import SimpleNamespace

            return SimpleNamespace(accepted=False, message="no governor attached: call "
                                   "fallbackformer.governance.governor.govern(model) before serving")
        return governor.feedback(request_id, label, sample)

    def observe_slices(self, request_id: str, keys: Any) -> bool:
        """Slice keys (``"family=value"``) of a call's samples for the slice-disparity monitor."""
        governor = self.governor
        return False if governor is None else governor.observe_slices(request_id, keys)

    def rebuild(self, **changes: Any) -> "FallbackModel":
        """A new model sharing this one's modules, gates, router, input spec and class names.

        ``changes`` replace constructor arguments (``primary``, ``student``, ``policy``, ``clock``,
        ``sinks``, ``profile``, ...): the one way to derive a timed, sink-free or differently
        configured copy without dropping a part (the router, say). Counters start afresh.
        """
        args: dict[str, Any] = {
            "primary": self.primary, "student": self.student,
            "gates": {n: self.gates[n] for n in self.path_names}, "policy": self.policy,
            "input_spec": self.input_spec, "class_names": self.class_names, "router": self.router,
        }
        args.update(changes)
        return FallbackModel(**args).train(self.training)

    def set_rollback(self, on: bool = True) -> None:
        """The rollback switch: ``True`` serves every call by the fallback path (``breaker_open``)."""
        self.policy = dataclasses.replace(self.policy, rollback=bool(on))
        self._sync()

    @property
    def drift_monitor(self) -> ScoreDriftMonitor | None:
        """The calibration-drift monitor of ``policy.drift_check`` (None when off)."""
        return self._drift[1] if self._drift is not None and self.policy.drift_check else None

    @property
    def drift_gate(self) -> str:
        """The gate the drift check watches: the first that can serve (it sees every sample walked)."""
        live = self._live_exits()
        return self._exit_name[next(i for i, ok in enumerate(live) if ok)]

    def _drift_routes(self, policy: Policy) -> bool:
        """Whether a detected calibration drift holds (``on_drift`` routes away from the primary)."""
        drift = self._drift
        return policy.drift_check and drift is not None and drift[1].drifted

    def reset_drift(self) -> None:
        """Forget the drift state (after recalibrating the gates); answers flow normally again."""
        with self._drift_lock:
            self._drift = None

    def _check_drift(self, out: FallbackOutput, scores: torch.Tensor, policy: Policy) -> None:
        """Feed the first live gate's scores to the drift monitor; signal, and route if the policy says."""
        name = self.drift_gate
        key = (name, policy.drift_window, policy.drift_level, policy.drift_check_every, policy.drift_horizon)
        with self._drift_lock:
            if self._drift is None or self._drift[0] != key:
                reference = self.gates[name].reference_scores
                self._drift = (key, ScoreDriftMonitor(
                    reference, window=policy.drift_window, level=policy.drift_level,
                    check_every=policy.drift_check_every, horizon=policy.drift_horizon))
            monitor = self._drift[1]
            fired = monitor.update(scores)
            drifted = monitor.drifted
        if fired:
            out.signals.append(R.CALIBRATION_DRIFT)
            with self._lock:
                self.signal_counts[R.CALIBRATION_DRIFT] += 1
        if drifted and policy.on_drift == "default":
            default = self._default_prediction(policy)
            for i, who in enumerate(out.served_by):
                if who != R.DEFAULT:
                    out.served_by[i] = R.DEFAULT
                    out.reason[i] = R.CALIBRATION_DRIFT
            routed = torch.tensor([r == R.CALIBRATION_DRIFT for r in out.reason], device=out.prediction.device)
            with torch.inference_mode():  # (the answer's tensors are inference tensors)
                out.prediction[routed] = default
                out.confidence[routed] = float("nan")
                out.logits[routed] = float("nan")

    def close(self, timeout_s: float | None = 0.0) -> None:
        """Stop the hedging workers (a hung primary's thread is a daemon and is left behind).

        Args:
            timeout_s: how long to wait for each worker to end (0: do not wait). Waiting for idle
                workers before the interpreter exits keeps their thread teardown out of its
                finalization.
        """
        with self._lock:
            hedgers = (self._hedger, self._student_hedger)
            self._hedger = self._student_hedger = None
            dispatcher, self._dispatcher = self._dispatcher, None
        for hedger in hedgers:
            if hedger is not None:
                hedger.close(timeout_s)
        if dispatcher is not None:
            dispatcher.close(max(timeout_s or 0.0, 0.1))

    def flush_events(self, timeout_s: float = 5.0) -> bool:
        """Wait up to ``timeout_s`` real seconds until the queued events reached the sinks (tests, shutdown).

        Returns:
            ``True`` when every queued event was delivered.
        """
        dispatcher = self._dispatcher
        return True if dispatcher is None else dispatcher.flush(timeout_s)

    # ------------------------------------------------------------------ policy and units

    def _sync(self) -> Policy:
        """Apply the policy's breaker, rollback, hedging and compile settings when they changed."""
        p, clock = self.policy, self.clock
        key = (id(p), id(clock), id(p.breaker), p.rollback, p.compile, p.hedge_workers, p.hedge_max_stuck)
        if key == self._synced:
            return p
        with self._lock:
            old = self._synced
            if self._given_breaker is None:
                changed = old is None or old[1] != key[1] or old[2] != key[2]
                if p.breaker is None and not p.rollback:
                    self.breaker = None
                elif changed or self.breaker is None:
                    self.breaker = CircuitBreaker(p.breaker or BreakerConfig(), clock=clock)
            if self.breaker is not None:
                if p.rollback:
                    self.breaker.force_open()
                elif self.breaker.state == BreakerState.FORCED_OPEN:
                    self.breaker.reset()
            for attr in ("_hedger", "_student_hedger"):
                hedger = getattr(self, attr)
                if hedger is not None and (hedger.clock is not clock or hedger.max_stuck != p.hedge_max_stuck
                                           or hedger.max_workers != _pool_size(p, attr)):
                    setattr(self, attr, None)
                    hedger.close()
            if old is None or old[4] != p.compile:
                self._eager_units()
                if p.compile == "on":
                    for name, module in self._modules_by_unit().items():
                        self._units[name] = self.compile_fn(module)
                        self.compile_report[name] = {"choice": "compiled"}
            self._synced = key
        return p

    def _modules_by_unit(self) -> dict[str, nn.Module]:
        primary = self.primary
        units: dict[str, nn.Module] = {TRANSFORM_UNIT: primary.input_transform}
        for i, stage in enumerate(primary.stages):
            units[self._stage_names[i]] = stage
        for s in primary.exit_stages:
            units[f"head_{s}"] = primary.head(s)
        units[STUDENT_UNIT] = self.student
        return units

    def _eager_units(self) -> None:
        self._units = dict(self._modules_by_unit())
        self.compile_report = {}

    def _choose_compiled(self, x: torch.Tensor, repeats: int, discard: int) -> None:
        """``compile="auto"``: time each module eager and compiled on its real input; keep the faster."""
        inputs = self._unit_inputs(x)
        for name, module in self._modules_by_unit().items():
            inp = inputs[name]
            eager_ms = median_ms(lambda: module(inp), repeats, discard)
            try:
                compiled = self.compile_fn(module)
                compiled_ms = median_ms(lambda: compiled(inp), repeats, discard)
            except Exception as exc:  # a module torch.compile cannot handle stays eager
                self.compile_report[name] = {"eager_ms": eager_ms, "error": f"{type(exc).__name__}: {exc}"[:200], "choice": "eager"}
                continue
            choice = "compiled" if compiled_ms < eager_ms else "eager"
            self._units[name] = compiled if choice == "compiled" else module
            self.compile_report[name] = {"eager_ms": eager_ms, "compiled_ms": compiled_ms, "choice": choice}

    def _unit_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        primary = self.primary
        inputs = {TRANSFORM_UNIT: x, STUDENT_UNIT: x}
        h = primary.input_transform(x)
        for i, stage in enumerate(primary.stages):
            inputs[self._stage_names[i]] = h
            h = stage(h)
            if i in self._exit_name:
                inputs[f"head_{i}"] = h
        return inputs

    def _timed_segments(self, x: torch.Tensor, record: bool) -> None:
        """One pass of every segment as served (no exits taken), timed on the model's clock."""
        clock, units, n = self.clock, self._units, x.shape[0]
        live = self._live_exits()
        h = x
        for i, name in enumerate(self._stage_names):
            t0 = clock.now_ns()
            if i == 0:
                h = units[TRANSFORM_UNIT](h)
            h = units[name](h)
            if live[i]:
                logits = units[self._head_units[i]](h)
                int(self.gates[self._exit_name[i]](logits)[0].sum())
            if record:
                self.profile.record(name, n, (clock.now_ns() - t0) / NS_PER_MS)
        t0 = clock.now_ns()
        logits = units[STUDENT_UNIT](x)
        self.gates[R.STUDENT](logits)
        if record:
            self.profile.record(STUDENT_UNIT, n, (clock.now_ns() - t0) / NS_PER_MS)

    # ------------------------------------------------------------------ input

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

    # ------------------------------------------------------------------ the primary

    def _live_exits(self) -> tuple[bool, ...]:
        """Per stage: whether an exit after it can serve. The final exit always can; an early exit
        unless its gate's threshold is +inf (then its head is not even computed).

        Cached on the identity and version counter of each early gate's threshold buffer: a new gate,
        a new buffer or an in-place change (``fill_``) recomputes it.
        """
        if self.router is not None:  # the router decides at every exit
            return (True,) * len(self._no_exit)
        modules = self._modules["gates"]._modules  # (the hot path: no nn.Module attribute lookup)
        buffers = [modules[name]._buffers.get("threshold") for _, name in self._early_exits]
        cached = self._live_cache
        if cached is not None:
            for t, (ct, version) in zip(buffers, cached[0]):
                if t is not ct or (t is not None and t._version != version):
                    break
            else:
                return cached[1]
        live = self._no_exit[:]
        for (i, _), threshold in zip(self._early_exits, buffers):
            live[i] = threshold is None or not math.isinf(threshold.item())
        live[-1] = True
        key = tuple((t, t._version if t is not None else 0) for t in buffers)
        self._live_cache = (key, tuple(live))
        return self._live_cache[1]

    def _plan(self, n: int, policy: Policy, live: tuple[bool, ...], hedged: bool, seq: int) -> AdmissionPlan:
        return self._planner.plan(self.profile, n, policy, live, hedged, seq)

    def _walk_primary(
        self,
        x: torch.Tensor,
        valid: torch.Tensor | None,
        state: RequestState,
        policy: Policy,
        cancel: threading.Event | None,
    ) -> None:
        """Walk the stages for the samples ``valid`` (original indices; ``None``: all of them).

        Serves what the exits accept and gives every other sample a reason; sets ``state.outcome``.
        Runs on the calling thread, or on a hedging worker (then ``cancel`` is set at the deadline).
        """
        clock, units, profile = self.clock, self._units, self.profile
        gates = self._modules["gates"]._modules  # (the hot path: no nn.Module attribute lookup)
        live = state.live
        b = x.shape[0]
        active = valid  # original indices of the samples still in the batch; None: all
        n = b if active is None else int(active.numel())
        admission = policy.admission and not state.probe
        hedged = cancel is not None
        start_ns, deadline_ns = state.start_ns, state.deadline_ns
        budget_ns = deadline_ns - start_ns
        # per stage, the latest start (ns after the call's start): the deadline, and with admission
        # the deadline less the predicted time of the stages up to the next exit (and the student)
        limits = self._plan(n, policy, live, hedged, state.seq).limits if admission else (budget_ns,) * len(live)
        last = len(self._stage_names) - 1
        timings = state.timings  # (stage, batch size, ms): appended by this thread only
        h: Any = None
        router = self.router
        evidence = None if router is None else Evidence(student_logits=_rows(state.student_logits, active))
        try:
            for i, name in enumerate(self._stage_names):
                now = clock.now_ns()
                if now - start_ns > limits[i] or (hedged and cancel.is_set()):  # type: ignore[union-attr]
                    if now > deadline_ns or (hedged and cancel.is_set()):  # type: ignore[union-attr]
                        state.set_reason(active, R.DEADLINE_EXCEEDED, b)
                        state.outcome = _EXCEEDED
                    else:
                        state.set_reason(active, R.DEADLINE_PREDICTED, b)
                        state.outcome = _PREDICTED
                        if i == 0:
                            self._refused_in_row += 1  # (a lost update under threads only delays a probe)
                    return
                if i == 0:
                    if self._refused_in_row and admission:  # (nn.Module.__setattr__ is slow: write only a change)
                        self._refused_in_row = 0
                    h = units[TRANSFORM_UNIT](x if active is None else x[active])
                h = units[name](h)
                if not isinstance(h, torch.Tensor) or h.dim() == 0 or h.shape[0] != n:
                    shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                    raise ValueError(f"{name} returned {shape}; expected a batch of {n} samples")
                if not live[i]:
                    timings.append((name, n, (clock.now_ns() - now) / NS_PER_MS))
                    continue
                exit_name = self._exit_name[i]
                logits = units[self._head_units[i]](h)
                _check_logits(logits, n, exit_name)
                state.num_classes = logits.shape[1]
                if evidence is not None:  # the router decides from the evidence
                    if state.drift_scores is None and policy.drift_check:  # the drift check still reads the gate
                        state.drift_scores = gates[exit_name].decide(logits)[1]
                    evidence.exit_logits.append(logits)
                    evidence.feature_scores.append(router.feature_scores[len(evidence.exit_logits) - 1](h))
                    if i == last:
                        timings.append((name, n, (clock.now_ns() - now) / NS_PER_MS))
                        self._route_final(evidence, logits, active, state, b, deadline_ns)
                        break
                    accept, conf, prediction = router.decide_exit(evidence, len(evidence.exit_logits) - 1)
                else:
                    # The gate's confidence is NaN exactly on rows with a non-finite logit, never accepted.
                    accept, conf, prediction = gates[exit_name].decide(logits)
                    if state.drift_scores is None:
                        state.drift_scores = conf  # the first live gate sees every sample walked
                n_accept = int(accept.sum()) if n > 1 else int(accept.item())  # (one sync; no reduction at batch 1)
                done_ns = clock.now_ns()
                timings.append((name, n, (done_ns - now) / NS_PER_MS))
                if done_ns > deadline_ns:  # this exit answered too late: it does not serve
                    state.set_reason(active, R.DEADLINE_EXCEEDED, b)
                    state.outcome = _EXCEEDED
                    return
                if n_accept == n:
                    state.serve(active, None, exit_name, logits, conf, prediction, b)
                    break
                if n_accept:
                    if not state.serve(active, accept, exit_name, logits, conf, prediction, b):
                        return  # frozen: the caller has answered at the deadline
                nonfinite = torch.isnan(conf)
                if bool(nonfinite.any()):
                    state.set_reason(_select(active, nonfinite), R.NONFINITE_OUTPUT, b)
                    state.outcome = _NONFINITE
                    keep = ~accept & ~nonfinite
                elif n_accept:
                    keep = ~accept
                else:
                    keep = None  # nobody left the batch: no compaction
                if i == last:
                    rejected = active if keep is None else _select(active, keep)
                    state.set_reason(rejected, R.LOW_CONFIDENCE, b)
                    break
                if keep is not None:
                    active = _select(active, keep)
                    n = int(active.numel())
                    if n == 0:
                        break
                    h = h[keep]
                    if evidence is not None:
                        evidence = evidence.select(keep)
                    if admission:  # the rest of the walk is planned at the smaller batch
                        limits = self._plan(n, policy, live, hedged, state.seq).limits
            if state.outcome is None:
                state.outcome = _OK
        except Exception as exc:  # a fault in the primary gets a fallback and a record
            state.set_reason(active, R.PRIMARY_ERROR, b)
            state.add_detail(f"{type(exc).__name__}: {exc}"[:200])
            state.outcome = _ERROR
        finally:  # late stages of a timed-out walk are recorded too: the profile learns the stall
            if hedged:  # (its plans read medians, which any sample may move: recorded at once)
                profile.record_many(timings)
            else:
                profile.submit(timings)

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
        predicted = self._plan(n, policy, state.live, False, state.seq).total_ms
        return policy.budget_ms - predicted < policy.effective_hedge_slack_ms

    def _get_hedger(self, policy: Policy, device: torch.device, role: str = "primary") -> Hedger:
        """The pool of ``role`` (``"primary"`` or ``"student"``), made on first use."""
        attr = "_hedger" if role == "primary" else "_student_hedger"
        with self._lock:
            hedger = getattr(self, attr)
            if hedger is None:
                hedger = Hedger(  # students: one per call in flight (threads are made only when needed)
                    max_workers=_pool_size(policy, attr),
                    clock=self.clock,
                    name=f"fallbackformer-{role}",
                    cuda_streams=device.type == "cuda",
                    max_stuck=policy.hedge_max_stuck,
                )
                setattr(self, attr, hedger)
                # close the workers when the model is collected; at interpreter exit the exit hook
                # cancels and joins them (a thread killed inside a torch operator aborts the process)
                weakref.finalize(self, Hedger.close, hedger).atexit = False
                register_for_exit(hedger)
            return hedger

    def _hedged(self, x: torch.Tensor, valid: torch.Tensor | None, state: RequestState, policy: Policy) -> str:
        """Run the primary on a worker and have the student ready by the deadline; return the outcome."""
        clock = self.clock
        b = x.shape[0]
        n = b if valid is None else int(valid.numel())
        if policy.hedge_student_start == "immediate" or self.profile.count(STUDENT_UNIT) == 0:
            student_at = clock.now_ns()  # (the student's time is unknown before it ever ran)
        else:  # the latest start that still leaves the student its p99 and the margin
            student_ms = self._plan(n, policy, state.live, False, state.seq).student_ms + policy.margin_ms
            student_ms += min(HANDOFF_MS, 0.25 * policy.budget_ms)  # the student's own worker hand-off
            student_at = state.deadline_ns - int(student_ms * NS_PER_MS)
        state.shared = True
        cancel = threading.Event()
        t0 = clock.now_ns()
        ticket = self._get_hedger(policy, x.device).submit(self._walk_primary, x, valid, state, policy, cancel)
        if ticket is not None:
            ticket.link_cancel(cancel)  # a cancelled walk stops at its next stage (its worker: stuck)
        if ticket is None:  # every worker is still busy with earlier calls: fall back at once
            state.set_reason(valid, R.DEADLINE_PREDICTED, b, caller=True)
            state.add_detail("hedge workers busy")
            state.primary_ms = (clock.now_ns() - t0) / NS_PER_MS
            return _BUSY
        first = ticket.wait(student_at)
        if first.status != HedgeStatus.TIMEOUT:
            state.primary_ms = (clock.now_ns() - t0) / NS_PER_MS
            if first.status == HedgeStatus.ERROR:  # a fault outside the walk's own handler (BaseException)
                return self._worker_error(first.error, valid, state, x.device)
            return state.outcome or _OK  # the caller serves the rest with the student
        # The primary is not done: compute the student now for everything not served yet.
        candidates = state.unserved(valid, x.device)
        student = self._student_answer(x, candidates, state, policy) if candidates is not None else None
        result = ticket.wait(state.deadline_ns - int(policy.margin_ms * NS_PER_MS))  # the margin: return path
        state.freeze()
        if result.status == HedgeStatus.TIMEOUT:
            cancel.set()
            ticket.cancel()
            hedger = self._hedger
            if hedger is not None:
                hedger.note_timeout()
            rest = state.unserved(valid, x.device)
            if rest is None:  # the walk served every valid sample; only its bookkeeping ran late
                outcome = state.outcome or _OK
            else:
                state.set_reason(rest, R.DEADLINE_EXCEEDED, b, caller=True, only_unset=True)
                outcome = _TIMEOUT
        elif result.status == HedgeStatus.ERROR:
            outcome = self._worker_error(result.error, valid, state, x.device)
        else:
            outcome = state.outcome or _OK
        state.primary_ms = (clock.now_ns() - t0) / NS_PER_MS
        if student is not None:
            idx, logits, accept, conf, prediction = student
            still = state.unserved_mask(idx).to(accept.device)  # [k]: the primary did not serve them since
            if state.router_rejected is not None:  # the router judged these with the primary's evidence
                still &= ~torch.isin(idx, state.router_rejected.to(idx.device)).to(accept.device)
            state.serve_student(idx, logits, still & accept, conf, prediction, b)
        state.student_done = True
        return outcome

    def _worker_error(
        self, error: BaseException | None, valid: torch.Tensor | None, state: RequestState, device: torch.device
    ) -> str:
        """A hedging worker died outside the walk's handler: the unserved samples fall back with a record."""
        rest = state.unserved(valid, device)
        if rest is not None:
            state.set_reason(rest, R.PRIMARY_ERROR, state.b, caller=True, only_unset=True)
        state.add_detail(f"hedge worker {type(error).__name__}: {error}"[:200])
        return _ERROR

    def _after_primary(self, outcome: str, duration_ms: float, policy: Policy) -> None:
        """Report the primary's outcome to the breaker and the stall detector."""
        if self.breaker is not None:
            if outcome in _FAILURES:
                self.breaker.on_error(duration_ms)
            else:
                self.breaker.on_success(duration_ms)
        if outcome in _STALLS and policy.hedge == "auto":
            with self._lock:
                self._hedge_calls_left = policy.hedge_after_stall_calls

    # ------------------------------------------------------------------ the router

    def _student_first(self, x: torch.Tensor, valid: torch.Tensor | None, state: RequestState, policy: Policy) -> None:
        """The router's evidence: the student's logits for every valid sample, ``[B, C]`` (NaN rows: none)."""
        n = x.shape[0] if valid is None else int(valid.numel())
        logits = self._student_logits(x if valid is None else x[valid], n, state, policy)
        if logits is None:  # the router then sees no student evidence and accepts nothing: the default serves
            return
        if valid is not None:
            full = torch.full((x.shape[0], logits.shape[1]), float("nan"), dtype=logits.dtype, device=logits.device)
            full[valid] = logits
            logits = full
        state.student_logits = logits
        state.num_classes = logits.shape[1]

    def _student_logits(self, xs: torch.Tensor, n: int, state: RequestState, policy: Policy) -> torch.Tensor | None:
        """The student's logits on ``xs`` (``n`` samples), timed; ``None`` when it failed or was late.

        With ``hedge="always"`` it runs on a worker and the caller waits no later than the deadline
        less the margin; a late student is cancelled (its worker counted stuck until it returns) and
        ``state.student_late`` makes the default answer with ``deadline_exceeded``.
        """
        clock = self.clock
        t0 = clock.now_ns()
        unit = self._units[STUDENT_UNIT]
        try:
            if policy.hedge != "always":
                logits = unit(xs)
            else:
                hedger = self._get_hedger(policy, xs.device, "student")
                result = hedger.run(unit, state.deadline_ns - int(policy.margin_ms * NS_PER_MS), xs)
                if result.status in (HedgeStatus.TIMEOUT, HedgeStatus.BUSY):
                    state.student_late = True
                    state.add_detail("student did not answer by the deadline" if result.status == HedgeStatus.TIMEOUT
                                     else "student workers busy")
                    return None
                if result.error is not None:
                    raise result.error
                logits = result.value
            _check_logits(logits, n, R.STUDENT)
        except Exception as exc:  # the default (already in place) serves
            state.add_detail(f"student {type(exc).__name__}: {exc}"[:200])
            return None
        self.profile.record(STUDENT_UNIT, n, (clock.now_ns() - t0) / NS_PER_MS)
        return logits

    def _route_final(self, evidence: Evidence, logits: torch.Tensor, active: torch.Tensor | None,
                     state: RequestState, b: int, deadline_ns: int) -> None:
        """After the final head: the primary, the student (``router_preferred``) or the default."""
        if self.clock.now_ns() > deadline_ns:  # the primary answered too late: it does not serve
            state.set_reason(active, R.DEADLINE_EXCEEDED, b)
            state.outcome = _EXCEEDED
            return
        accept, use_student, conf, prediction = self.router.decide_final(evidence)
        primary_rows = accept & ~use_student
        student_rows = accept & use_student
        if bool(primary_rows.any()):
            if not state.serve(active, primary_rows, R.PRIMARY, logits, conf, prediction, b):
                return  # frozen: the caller has answered at the deadline
        if bool(student_rows.any()):
            if not state.serve(active, student_rows, R.STUDENT, evidence.student_logits, conf, prediction, b):
                return
            state.set_reason(_select(active, student_rows), R.ROUTER_PREFERRED, b)
        rejected = ~accept
        if bool(rejected.any()):
            finite = torch.isfinite(logits).all(1)
            rows = _select(active, rejected & finite)
            state.set_reason(rows, R.LOW_CONFIDENCE, b)
            state.router_rejected = rows  # the router judged both answers: the default serves them
            if not bool(finite.all()):
                state.set_reason(_select(active, rejected & ~finite), R.NONFINITE_OUTPUT, b)
                state.outcome = _NONFINITE

    # ------------------------------------------------------------------ the student

    def _student_answer(
        self, x: torch.Tensor, idx: torch.Tensor, state: RequestState, policy: Policy
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The student's ``(idx, logits, accept, confidence, prediction)`` on samples ``idx``, ``None`` if it failed."""
        n = int(idx.numel())
        router = self.router
        if router is not None:  # the student already ran: the router judges it alone
            if state.student_logits is None:
                return None  # it failed (recorded): the default serves
            logits = state.student_logits[idx]
            accept, conf, prediction = router.decide_student_alone(logits)
            return idx, logits, accept, conf, prediction
        logits = self._student_logits(x if n == x.shape[0] else x[idx], n, state, policy)
        if logits is None:
            return None  # the default (already in place) serves
        state.num_classes = logits.shape[1]
        accept, conf, prediction = self.gates[R.STUDENT].decide(logits)  # never accepts a non-finite row
        return idx, logits, accept, conf, prediction

    def _run_student(self, x: torch.Tensor, idx: torch.Tensor, state: RequestState, policy: Policy) -> None:
        if state.student_done:
            return
        if state.router_rejected is not None:  # judged by the router with the primary's evidence
            idx = idx[~torch.isin(idx, state.router_rejected.to(idx.device))]
            if idx.numel() == 0:
                return
        answer = self._student_answer(x, idx, state, policy)
        if answer is not None:
            state.serve_student(*answer, x.shape[0])

    # ------------------------------------------------------------------ records

    def _tally_locked(self) -> None:
        """Count the queued answers into the counters (held lock)."""
        tallies, served_counts, reason_counts = self._tallies, self.served_counts, self.reason_counts
        calls = 0
        while True:
            try:
                served_by, reasons = tallies.popleft()  # (atomic: a concurrent append is never lost)
            except IndexError:
                break
            calls += 1
            if len(served_by) == 1 or len(set(served_by)) == 1:
                served_counts[served_by[0]] += len(served_by)
            else:
                served_counts.update(served_by)
            if reasons[0] or len(reasons) > 1:
                reason_counts.update(r for r in reasons if r)
        self.__dict__["calls"] += calls  # (a plain int: skip nn.Module.__setattr__)

    def _default_prediction(self, policy: Policy) -> int:
        return -1 if policy.default_class is None else int(policy.default_class)

    def _record(self, out: FallbackOutput, state: RequestState, policy: Policy) -> None:
        """Tally the answer (in batches; :meth:`stats` counts every call) and emit its events."""
        tallies = self._tallies
        tallies.append((tuple(out.served_by), tuple(out.reason)))  # (atomic; copies: the caller owns out)
        if len(tallies) >= TALLY_BATCH:
            with self._lock:
                self._tally_locked()
        sinks = self.sinks
        if not sinks or all(who == R.PRIMARY for who in out.served_by):
            return
        governance = self.governor.event_state() if self.governor is not None else {}  # (issue 14)
        payload = (out.request_id, time.time(), tuple(out.served_by), tuple(out.reason), out.confidence.tolist(),
                   policy.budget_ms, out.latency_ms, state.stage_ms_snapshot(), state.detail, governance)
        inline = [sink for sink in sinks if getattr(sink, "nonblocking", False)]
        if inline:  # an in-memory list or a queueing sink: in order, on this thread, never blocking
            deliver(build_events(payload, self.model_hashes), inline, self._count_sink_error)
        queued = [sink for sink in sinks if not getattr(sink, "nonblocking", False)]
        if queued:
            hashes = self.model_hashes
            self._get_dispatcher(policy).put(lambda: (build_events(payload, hashes), queued))

    def _count_sink_error(self) -> None:
        with self._lock:
            self.sink_errors += 1

    def _get_dispatcher(self, policy: Policy) -> EventDispatcher:
        dispatcher = self._dispatcher
        if dispatcher is None:
            with self._lock:
                if self._dispatcher is None:
                    self._dispatcher = EventDispatcher(policy.event_queue, _SinkErrors(self))
                    weakref.finalize(self, EventDispatcher.close, self._dispatcher, 0.0).atexit = False
                dispatcher = self._dispatcher
        return dispatcher


class _SinkErrors:
    """Counts a sink's failure on its model, through a weak reference (the dispatcher outlives no model)."""

    def __init__(self, model: FallbackModel) -> None:
        self._model = weakref.ref(model)

    def __call__(self) -> None:
        model = self._model()
        if model is not None:
            model._count_sink_error()


def _pool_size(policy: Policy, attr: str) -> int:
    """Healthy workers of a pool: ``hedge_workers`` primaries; a student per call in flight (made as needed;
    calls over ``max_concurrency`` need one too)."""
    return policy.hedge_workers if attr == "_hedger" else STUDENT_WORKERS


def _rows(t: torch.Tensor | None, active: torch.Tensor | None) -> torch.Tensor | None:
    """The rows ``active`` of ``t`` (all of them when ``active`` is ``None``)."""
    return t if t is None or active is None else t[active]


def _select(active: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """Original indices of the rows ``mask`` selects (``active`` ``None``: rows are the indices)."""
    rows = torch.nonzero(mask).flatten()
    return rows if active is None else active[rows]


def _accepted_range(spec: InputSpec | None) -> tuple[float | None, float | None]:
    """The raw values the spec accepts, its range widened by the tolerance of ``bad_samples``."""
    if spec is None or spec.value_range is None:
        return None, None
    lo, hi = spec.value_range
    tol = 1e-3 * (hi - lo)
    return lo - tol, hi + tol


def _batch_of(x: torch.Tensor, bs: int) -> torch.Tensor:
    """``x`` cut or tiled to ``bs`` samples."""
    if x.shape[0] >= bs:
        return x[:bs]
    reps = -(-bs // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:bs]


def _torch_compile(module: nn.Module) -> Callable[..., Any]:
    """``torch.compile`` with dynamic batch sizes (compaction changes them every call)."""
    return torch.compile(module, dynamic=True)


def _check_logits(logits: Any, n: int, name: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} returned {shape}; expected logits [{n}, C]")


def _gates_by_name(
    gates: Sequence[ConfidenceGate] | Mapping[str, ConfidenceGate], names: list[str]
) -> dict[str, ConfidenceGate]:
    if isinstance(gates, Mapping):
        missing, extra = set(names) - set(gates), set(gates) - set(names)
        if missing or extra:
            raise ValueError(
                f"gates are keyed {sorted(gates)}; expected exactly {names} (missing {sorted(missing)}, "
                f"unexpected {sorted(extra)})"
            )
        return {n: gates[n] for n in names}
    gates = list(gates)
    if len(gates) != len(names):
        raise ValueError(
            f"got {len(gates)} gates; expected {len(names)}, one per path in order {names}"
        )
    return dict(zip(names, gates))
