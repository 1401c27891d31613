"""FallbackModel: one nn.Module that answers on time and says who answered and why.

One call walks the primary's stages; after each exit head the exit's gate decides per sample.
Samples that exit leave the batch (compaction), later stages run on the rest only. Samples the
primary cannot serve (its final gate rejects, it raises, its output is non-finite or malformed,
the deadline passes) go to the student; samples the student's gate rejects get the safe default.
Every answer not served by the primary is counted and, when sinks are attached, recorded.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import Clock, MonotonicClock
from fallbackformer.runtime.events import EventSink, FallbackEvent
from fallbackformer.runtime.output import FallbackOutput
from fallbackformer.runtime.policy import Policy
from fallbackformer.runtime.validation import (
    InputSpec,
    InvalidInputError,
    bad_samples,
    check_batch,
    describe_bad_samples,
)


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

    >>> model = FallbackModel(primary, student, gates, policy=Policy(budget_ms=5.0))  # doctest: +SKIP
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
        self.policy = policy or Policy()
        self.input_spec = input_spec
        self.clock: Clock = clock or MonotonicClock()
        self.sinks: list[EventSink] = list(sinks)
        self.class_names = list(class_names) if class_names is not None else None
        self.model_hashes: dict[str, str] = {}
        self._lock = threading.Lock()
        self.served_counts: Counter[str] = Counter()
        self.reason_counts: Counter[str] = Counter()
        self.calls = 0

    # ------------------------------------------------------------------ public

    def forward(self, x: torch.Tensor) -> FallbackOutput:  # noqa: C901 (one request, end to end)
        """Answer a batch of raw inputs ``[B, ...]`` within the policy's budget."""
        start_ns = self.clock.now_ns()
        request_id = uuid.uuid4().hex[:16]
        x = check_batch(x, self.input_spec)
        b = x.shape[0]
        state = _RequestState(b, self._default_prediction(), x.device)

        with torch.inference_mode():
            bad = bad_samples(x, self.input_spec)
            if bool(bad.any()):
                if self.policy.on_invalid_input == "raise":
                    raise InvalidInputError(describe_bad_samples(x, bad, self.input_spec))
                state.reasons_for(torch.nonzero(bad).flatten(), R.INVALID_INPUT)
            todo = torch.nonzero(~bad).flatten()
            if todo.numel() > 0:
                to_student = self._run_primary(x, todo, state, start_ns)
                if to_student.numel() > 0:
                    self._run_student(x, to_student, state)

        latency_ms = (self.clock.now_ns() - start_ns) / 1e6
        out = state.output(latency_ms, request_id)
        self._record(out, state, start_ns)
        return out

    def stats(self) -> dict[str, Any]:
        """Counters since construction: calls, answers by path, fallbacks by reason."""
        with self._lock:
            total = sum(self.served_counts.values())
            fallbacks = self.served_counts[R.STUDENT] + self.served_counts[R.DEFAULT]
            return {
                "calls": self.calls,
                "answers": total,
                "served_by": dict(self.served_counts),
                "reasons": dict(self.reason_counts),
                "fallback_rate": fallbacks / total if total else 0.0,
            }

    # ------------------------------------------------------------------ stages

    def _elapsed_ms(self, start_ns: int) -> float:
        return (self.clock.now_ns() - start_ns) / 1e6

    def _run_primary(
        self, x: torch.Tensor, todo: torch.Tensor, state: "_RequestState", start_ns: int
    ) -> torch.Tensor:
        """Walk the stages; return the original indices of samples the student must serve."""
        primary, budget = self.primary, self.policy.budget_ms
        exit_pos = {s: i for i, s in enumerate(primary.exit_stages)}
        active = todo  # original indices of the samples still in the batch
        to_student: list[torch.Tensor] = []
        try:
            h = primary.input_transform(x[active])
            for stage_index, stage in enumerate(primary.stages):
                if stage_index > 0 and self._elapsed_ms(start_ns) > budget:
                    state.reasons_for(active, R.DEADLINE_EXCEEDED)
                    to_student.append(active)
                    return torch.cat(to_student)
                t0 = self.clock.now_ns()
                h = stage(h)
                state.stage_ms.append((self.clock.now_ns() - t0) / 1e6)
                if stage_index not in exit_pos:
                    continue
                k = exit_pos[stage_index]
                name = self.path_names[k]
                logits = primary.head(stage_index)(h)
                _check_logits(logits, h.shape[0], name)
                state.num_classes = logits.shape[1]
                finite = torch.isfinite(logits).all(dim=1)
                accept, conf = self.gates[name](logits)
                accept &= finite
                is_last = k == primary.num_exits - 1
                if is_last and self._elapsed_ms(start_ns) > budget:
                    # The primary answered, but too late: it does not serve.
                    state.reasons_for(active, R.DEADLINE_EXCEEDED)
                    to_student.append(active)
                    return torch.cat(to_student)
                if bool(accept.any()):
                    state.serve(active[accept], name, logits[accept], conf[accept])
                nonfinite = ~finite
                if bool(nonfinite.any()):
                    state.reasons_for(active[nonfinite], R.NONFINITE_OUTPUT)
                    to_student.append(active[nonfinite])
                keep = ~accept & finite
                if is_last:
                    rejected = active[keep]
                    state.reasons_for(rejected, R.LOW_CONFIDENCE)
                    to_student.append(rejected)
                    active = active[:0]
                    break
                active, h = active[keep], h[keep]
                if active.numel() == 0:
                    break
        except Exception as exc:  # a fault in the primary gets a fallback and a record
            state.reasons_for(active, R.PRIMARY_ERROR)
            state.detail = f"{type(exc).__name__}: {exc}"[:200]
            to_student.append(active)
        return torch.cat(to_student) if to_student else todo[:0]

    def _run_student(self, x: torch.Tensor, idx: torch.Tensor, state: "_RequestState") -> None:
        try:
            logits = self.student(x[idx])
            _check_logits(logits, idx.numel(), R.STUDENT)
            state.num_classes = logits.shape[1]
        except Exception as exc:
            state.detail = (state.detail + "; " if state.detail else "") + f"student {type(exc).__name__}: {exc}"[:200]
            return  # the default (already in place) serves
        finite = torch.isfinite(logits).all(dim=1)
        accept, conf = self.gates[R.STUDENT](logits)
        accept &= finite
        if bool(accept.any()):
            state.serve(idx[accept], R.STUDENT, logits[accept], conf[accept])

    # ------------------------------------------------------------------ records

    def _default_prediction(self) -> int:
        return -1 if self.policy.default_class is None else int(self.policy.default_class)

    def _record(self, out: FallbackOutput, state: "_RequestState", start_ns: int) -> None:
        with self._lock:
            self.calls += 1
            self.served_counts.update(out.served_by)
            self.reason_counts.update(r for r in out.reason if r)
        if not self.sinks:
            return
        now = time.time()
        for i, (who, why) in enumerate(zip(out.served_by, out.reason)):
            if who == R.PRIMARY:
                continue
            c = float(out.confidence[i])
            event = FallbackEvent(
                request_id=out.request_id,
                sample=i,
                time_unix=now,
                served_by=who,
                reason=why,
                budget_ms=self.policy.budget_ms,
                elapsed_ms=out.latency_ms,
                stage_ms=list(state.stage_ms),
                confidence=None if c != c else c,
                model_hashes=dict(self.model_hashes),
                detail=state.detail,
            )
            for sink in self.sinks:
                sink.emit(event)


class _RequestState:
    """Per-call bookkeeping, per sample, in the original order."""

    def __init__(self, b: int, default_prediction: int, device: torch.device) -> None:
        self.prediction = torch.full((b,), default_prediction, dtype=torch.long, device=device)
        self.confidence = torch.full((b,), float("nan"), device=device)
        self.served_by = [R.DEFAULT] * b
        self.reason = [""] * b
        self.logits: torch.Tensor | None = None
        self.num_classes = 0
        self.b = b
        self.stage_ms: list[float] = []
        self.detail = ""

    def serve(self, idx: torch.Tensor, name: str, logits: torch.Tensor, conf: torch.Tensor) -> None:
        if self.logits is None:
            self.logits = torch.full((self.b, logits.shape[1]), float("nan"), device=logits.device)
        self.logits[idx] = logits.float()
        self.prediction[idx] = logits.argmax(dim=1)
        self.confidence[idx] = conf.float()
        for i in idx.tolist():
            self.served_by[i] = name

    def reasons_for(self, idx: torch.Tensor, reason: str) -> None:
        for i in idx.tolist():
            self.reason[i] = reason

    def output(self, latency_ms: float, request_id: str) -> FallbackOutput:
        logits = self.logits
        if logits is None:
            logits = torch.full((self.b, self.num_classes), float("nan"), device=self.prediction.device)
        return FallbackOutput(
            prediction=self.prediction,
            served_by=self.served_by,
            reason=self.reason,
            confidence=self.confidence,
            latency_ms=latency_ms,
            logits=logits,
            request_id=request_id,
        )


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
