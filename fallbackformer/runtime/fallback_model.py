"""FallbackModel: one nn.Module that answers on time and says who answered and why.

It is built by composition of two parts (docs/architecture.md):

- :class:`~fallbackformer.runtime.decisions.Decisions` (``model.decisions``), the pure decision
  module: the primary's input transform, stages and exit heads, the student, the gates or the
  router and its evidence. Deterministic given its inputs; what ONNX and ``torch.export`` capture.
- :class:`~fallbackformer.runtime.runtime.Runtime` (``model.runtime``), what a graph cannot hold:
  the policy, the clock, the latency profile, admission, hedging, the breaker, the drift check, the
  counters and the sinks. It drives the decision module stage by stage.

One call: validate the input; with a router, the student first; admission (concurrency, drift,
breaker); the primary's stages with a deadline check before each and per-sample exits after each
live head (answered samples leave the batch); the student for what the primary did not serve; the
safe default for the rest. With ``Policy.hedge="always"`` (the default) the primary and the student
run on worker threads and the call returns by the deadline whatever they do. Every answer not served
by the primary is counted and, when sinks are attached, recorded as a :class:`FallbackEvent`. One
model may serve many threads at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fallbackformer.gates.drift import ScoreDriftMonitor
from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.gates.router import Router
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime.breaker import CircuitBreaker
from fallbackformer.runtime.clock import Clock
from fallbackformer.rungs.cache import CacheConfig, ResponseCache
from fallbackformer.rungs.defaults import SafeDefault, default_from_policy
from fallbackformer.rungs.ladder import Rung, check_ladder
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.decisions import Decisions, gates_by_name
from fallbackformer.runtime.events import EventSink
from fallbackformer.runtime.label_free import label_free_estimator
from fallbackformer.runtime.latency import LatencyProfile
from fallbackformer.runtime.output import FallbackOutput
from fallbackformer.runtime.policy import Policy
from fallbackformer.runtime.runtime import Runtime
from fallbackformer.runtime.units import CompileFn
from fallbackformer.runtime.validation import InputSpec
from fallbackformer.runtime.warm import warm_start

__all__ = ["FallbackModel", "ladder_gates"]


def ladder_gates(primary: MultiExitNet, gates: Sequence[ConfidenceGate] | Mapping[str, ConfidenceGate],
                 rungs: Sequence[Rung]) -> Any:
    """The gates of every path: the user's for the exits and the student, each rung's own after them."""
    if not isinstance(primary, MultiExitNet):  # (Decisions says how to wrap it)
        return gates if isinstance(gates, Mapping) else list(gates)
    names = primary.exit_names + [R.STUDENT]
    given = dict(gates) if isinstance(gates, Mapping) else None
    if given is not None:  # a mapping may also hold the rungs' gates (model.gates as it is): they replace the rungs'
        rungs = [Rung(r.name, r.module, given.pop(r.name)) if r.name in given else r for r in rungs]
    own = gates_by_name(given if given is not None else gates, names)
    for rung in rungs:
        if rung.gate is None:
            raise ValueError(f"rung {rung.name!r} has no gate; give it one calibrated on held-out data: "
                             f"Rung({rung.name!r}, module, ff.calibrate(...)-style ConfidenceGate)")
        own[rung.name] = rung.gate
    return own


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
        fallbacks: the ladder's further rungs after the student, each a
            :class:`~fallbackformer.rungs.Rung` (a name, a module, its gate), tried in order; each
            answers as ``served_by=<its name>`` and is bounded in time like the student.
        veto: names of rungs in ``fallbacks`` (classical ones, say): an answer of the primary's path or
            the student is kept only where at least one of them predicts the same class; otherwise it
            goes down the ladder with ``rung_disagreement``. Off (empty) by default.
        veto_below: the veto reviews only answers whose confidence (the router's probability that the
            answer is right, or the path's calibrated gate confidence) is below this level; ``inf``
            (the default) reviews every answer.
        cache: a :class:`~fallbackformer.rungs.CacheConfig` for the response cache rung, consulted for
            identical inputs when the primary's path cannot answer (``served_by="cache"``).
        default: a typed safe default (:class:`~fallbackformer.rungs.SafeDefault`); ``None``: the
            policy's ``default_class`` (a class, or -1 to abstain).

    The modules are read when the model is built: to swap a stage, head or student, build a new model
    (:meth:`rebuild`). Gates may be replaced (``model.gates["exit_1"] = gate``) or changed in place.

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
        fallbacks: Sequence[Rung] = (),
        veto: Sequence[str] = (),
        veto_below: float = math.inf,
        cache: CacheConfig | None = None,
        default: SafeDefault | None = None,
    ) -> None:
        super().__init__()
        rungs = list(fallbacks)
        names = [R.STUDENT] + check_ladder(rungs)
        self.decisions = Decisions(primary, [student] + [r.module for r in rungs],
                                   ladder_gates(primary, gates, rungs), router, fallback_names=names, veto=veto,
                                   veto_below=veto_below)
        self.runtime = Runtime(self.decisions, policy, input_spec=input_spec, clock=clock, sinks=sinks,
                               profile=profile, breaker=breaker, cache=cache, default=default)
        self.class_names = list(class_names) if class_names is not None else None

    def forward(self, x: torch.Tensor) -> FallbackOutput:
        """Answer a batch of raw inputs ``[B, ...]`` within the policy's budget.

        ``latency_ms`` of the answer is the call's whole wall time, its bookkeeping included; sinks
        run on a dispatcher thread, never on the caller's time.

        Raises:
            InvalidInputError: bad input under ``on_invalid_input="raise"``.
            ValueError: a batch over ``Policy.max_batch`` under ``on_large_batch="raise"``.
        """
        return self.runtime.serve(x)

    def shed(self, x: torch.Tensor, detail: str) -> FallbackOutput:
        """Answer ``x`` with the safe default at once, running nothing, recorded like any call (reason
        ``deadline_predicted``, ``detail`` says why): for a caller that cannot run the model in time, a
        server over its in-flight bound. Bad input is handled as in :meth:`forward`."""
        return self.runtime.shed(x, detail)

    # ------------------------------------------------------------------ the decisions

    @property
    def primary(self) -> MultiExitNet:
        """The primary: raw input to the logits of every exit."""
        return self.decisions.primary

    @property
    def student(self) -> nn.Module:
        """The student: raw input ``[B, ...]`` to logits ``[B, C]``."""
        return self.decisions.student

    @property
    def fallbacks(self) -> list[Rung]:
        """The ladder's rungs after the student, in order (with their current gates)."""
        return [Rung(name, module, self.gates[name]) for name, module in self.decisions.rungs.items()]

    @property
    def veto(self) -> tuple[str, ...]:
        """The rungs whose agreement an answer of the primary's path or the student needs (empty: no veto)."""
        return self.decisions.veto

    @property
    def veto_below(self) -> float:
        """The veto reviews only answers less confident than this (``inf``: every answer)."""
        return self.decisions.veto_below

    @property
    def cache(self) -> ResponseCache | None:
        """The response cache rung, or ``None``."""
        return self.runtime.cache

    @property
    def default(self) -> SafeDefault:
        """The typed safe default (the policy's ``default_class`` as one when none was given)."""
        return self.runtime.default or default_from_policy(self.policy.default_class)

    @property
    def gates(self) -> nn.ModuleDict:
        """One gate per path, keyed by :attr:`path_names`."""
        return self.decisions.gates

    @property
    def router(self) -> Router | None:
        """The router, when it decides instead of the gates."""
        return self.decisions.router

    @property
    def path_names(self) -> list[str]:
        """Every path in order: ``exit_1 .. exit_{E-1}``, ``primary``, ``student``."""
        return self.decisions.path_names

    # ------------------------------------------------------------------ the runtime

    @property
    def policy(self) -> Policy:
        """The policy of this thread's calls; assigning one applies it (breaker, rollback, pools, compile)."""
        return self.runtime.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.runtime.policy = policy

    def policy_override(self, policy: Policy | None) -> contextlib.AbstractContextManager[None]:
        """Within the block, this thread's calls use ``policy`` (per-request budgets; ``None``: the shared one).

        The breaker, the rollback switch, the worker pools and compilation keep following the shared
        policy (``model.policy = ...``).
        """
        return self.runtime.policy_override(policy)

    @property
    def input_spec(self) -> InputSpec | None:
        return self.runtime.input_spec

    @property
    def clock(self) -> Clock:
        return self.runtime.clock

    @property
    def sinks(self) -> list[EventSink]:
        """Receivers of the fallback events (a list: append to it, or assign a new one)."""
        return self.runtime.sinks

    @sinks.setter
    def sinks(self, sinks: Iterable[EventSink]) -> None:
        self.runtime.sinks = list(sinks)

    @property
    def profile(self) -> LatencyProfile:
        """The latency profile admission reads (seed it with :meth:`warm_up`)."""
        return self.runtime.profile

    @profile.setter
    def profile(self, profile: LatencyProfile) -> None:
        self.runtime.profile = profile

    @property
    def breaker(self) -> CircuitBreaker | None:
        return self.runtime.breaker

    @property
    def model_hashes(self) -> dict[str, str]:
        """Digests of the models (set by a loaded bundle), carried into every event."""
        return self.runtime.model_hashes

    @model_hashes.setter
    def model_hashes(self, hashes: Mapping[str, str]) -> None:
        self.runtime.model_hashes = dict(hashes)

    @property
    def governor(self) -> Any:
        """The governance hook (issue 14; ``fallbackformer.governance.governor.govern`` sets it), or ``None``."""
        return self.runtime.governor

    @governor.setter
    def governor(self, governor: Any) -> None:
        self.runtime.governor = governor

    @property
    def compile_fn(self) -> CompileFn:
        """The function ``compile`` policies use, called as ``fn(module)`` (``torch.compile``, dynamic shapes)."""
        return self.runtime.compile_fn

    @compile_fn.setter
    def compile_fn(self, fn: CompileFn) -> None:
        self.runtime.compile_fn = fn

    @property
    def compile_report(self) -> dict[str, dict[str, Any]]:
        """Per unit, whether it runs compiled (and the timings ``compile="auto"`` compared)."""
        return self.runtime.compile_report

    # ------------------------------------------------------------------ before serving

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
        return self.runtime.warm_up(x, repeats, discard, batch_sizes)

    def warm_start(self, max_s: float = 0.25) -> dict[str, Any]:
        """Make the first call keep the budget (``ff.load`` calls it): see :func:`fallbackformer.runtime.warm.warm_start`."""
        return warm_start(self.runtime, max_s)

    # ------------------------------------------------------------------ while serving

    def stats(self) -> dict[str, Any]:
        """Counters since construction: calls, answers by path, fallbacks by reason, hedging, breaker."""
        return self.runtime.stats()

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
        configured copy without dropping a part (the router, say). Counters start afresh. The
        label-free estimator the model carries (``label_free``, or its bundle's) travels with it, so a
        copy reports the same estimate (the evaluation's decider is such a copy).
        """
        args: dict[str, Any] = {
            "primary": self.primary, "student": self.student,
            "gates": {n: self.gates[n] for n in self.primary.exit_names + [R.STUDENT]},
            "policy": self.runtime.base_policy, "input_spec": self.input_spec, "class_names": self.class_names,
            "router": self.router, "fallbacks": self.fallbacks, "veto": self.veto,
            "veto_below": self.veto_below,
            "cache": None if self.cache is None else self.cache.config, "default": self.runtime.default,
        }
        args.update(changes)
        copy = FallbackModel(**args).train(self.training)
        estimator = label_free_estimator(self)
        if estimator is not None:
            copy.label_free = estimator
        return copy

    def set_rollback(self, on: bool = True) -> None:
        """The rollback switch: ``True`` serves every call by the fallback path (``breaker_open``)."""
        self.runtime.policy = dataclasses.replace(self.runtime.base_policy, rollback=bool(on))

    @property
    def drift_monitor(self) -> ScoreDriftMonitor | None:
        """The calibration-drift monitor of ``policy.drift_check`` (None when off or before the first check)."""
        return self.runtime.drift.monitor(self.policy)

    @property
    def drift_gate(self) -> str:
        """The gate the drift check watches: the first that can serve (it sees every sample walked)."""
        return self.runtime.drift_gate()

    def reset_drift(self) -> None:
        """Forget the drift state (after recalibrating the gates); answers flow normally again."""
        self.runtime.drift.reset()

    def close(self, timeout_s: float | None = 0.0) -> None:
        """Stop the hedging workers and the event dispatcher (a hung primary's thread is a daemon and is
        left behind).

        Args:
            timeout_s: how long to wait for each worker to end (0: do not wait). Waiting for idle
                workers before the interpreter exits keeps their thread teardown out of its
                finalization.
        """
        self.runtime.close(timeout_s)

    def flush_events(self, timeout_s: float = 5.0) -> bool:
        """Wait up to ``timeout_s`` real seconds until the queued events reached the sinks (tests, shutdown).

        Returns:
            ``True`` when every queued event was delivered.
        """
        return self.runtime.records.flush(timeout_s)
