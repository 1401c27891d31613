"""The walk of the primary's stages for one call: deadline checks, admission, exits and compaction.

Before each stage: past the deadline -> ``deadline_exceeded``; past the stage's admission limit (the
budget less the predicted time of the stages up to the next exit, the student and the margin) ->
``deadline_predicted``, the stage is not started. After each live exit head its gate (or the router)
decides per sample; the samples that exit leave the batch and later stages run on the rest only. An
exit whose answer comes after the deadline does not serve. A stage or head that raises or returns a
malformed batch is a ``primary_error``; non-finite logits a ``nonfinite_output``. The walk runs on
the calling thread or on a hedging worker (then ``cancel`` is set at the deadline and the caller may
have answered already: ``RequestState`` then ignores the worker's writes).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch

from fallbackformer.gates.evidence import Evidence
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import NS_PER_MS
from fallbackformer.runtime.request_state import RequestState

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.policy import Policy
    from fallbackformer.runtime.runtime import Runtime

__all__ = ["OK", "PREDICTED", "EXCEEDED", "ERROR", "NONFINITE", "TIMEOUT", "BUSY", "FAILURES", "STALLS",
           "PrimaryWalk", "check_logits", "select"]

# Outcomes of the primary path, for the breaker and the stall detector.
OK, PREDICTED, EXCEEDED, ERROR, NONFINITE, TIMEOUT, BUSY = (
    "ok", "predicted", "exceeded", "error", "nonfinite", "timeout", "busy")
FAILURES = frozenset({EXCEEDED, ERROR, NONFINITE, TIMEOUT, BUSY})
STALLS = frozenset({EXCEEDED, TIMEOUT, BUSY})

# What the walk does after an exit.
_NEXT, _DONE, _ABORT = 0, 1, 2


def select(active: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """Original indices of the rows ``mask`` selects (``active`` ``None``: rows are the indices)."""
    rows = torch.nonzero(mask).flatten()
    return rows if active is None else active[rows]


def check_logits(logits: Any, n: int, name: str) -> None:
    """A path's output must be logits ``[n, C]``; a clear error otherwise (a primary error, or the default)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} returned {shape}; expected logits [{n}, C]")


def _not_a_batch(h: Any, n: int, name: str) -> ValueError:
    shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
    return ValueError(f"{name} returned {shape}; expected a batch of {n} samples")


def _rows(t: torch.Tensor | None, active: torch.Tensor | None) -> torch.Tensor | None:
    """The rows ``active`` of ``t`` (all of them when ``active`` is ``None``)."""
    return t if t is None or active is None else t[active]


class PrimaryWalk:
    """One walk of the primary for the samples ``valid`` (original indices; ``None``: all of them).

    Serves what the exits accept and gives every other sample a reason; sets ``state.outcome``.
    """

    __slots__ = ("rt", "steps", "clock", "x", "state", "policy", "cancel", "b", "active", "n", "admission",
                 "limits", "h", "evidence")

    def __init__(self, rt: "Runtime", x: torch.Tensor, valid: torch.Tensor | None, state: RequestState,
                 policy: "Policy", cancel: threading.Event | None) -> None:
        self.rt, self.steps, self.clock = rt, rt.steps, rt.clock
        self.x, self.state, self.policy, self.cancel = x, state, policy, cancel
        self.b = x.shape[0]
        self.active = valid  # original indices of the samples still in the batch; None: all
        self.n = self.b if valid is None else int(valid.numel())
        self.admission = policy.admission and not state.probe
        # per stage, the latest start (ns after the call's start): the deadline, and with admission
        # the deadline less the predicted time of the stages up to the next exit (and the student)
        self.limits = (self._plan() if self.admission
                       else (state.deadline_ns - state.start_ns,) * len(state.live))
        self.h: Any = None
        router_on = self.steps.router is not None
        self.evidence = self.steps.evidence(_rows(state.student_logits, valid)) if router_on else None

    def _plan(self) -> tuple[float, ...]:
        state = self.state
        return self.rt.plan(self.n, self.policy, state.live, self.cancel is not None, state.seq).limits

    def run(self) -> None:
        """Walk the stages; a fault in the primary gets a fallback and a record."""
        state, steps, clock = self.state, self.steps, self.clock
        live, stages = state.live, steps.stages
        timings = state.timings  # (stage, batch size, ms): appended by this thread only
        try:
            for i, name in enumerate(steps.stage_names):
                now = clock.now_ns()
                if self._stopped(i, now):
                    return
                if i == 0:
                    self.h = self._transform()
                h = self.h = stages[i](self.h)
                if not isinstance(h, torch.Tensor) or h.dim() == 0 or h.shape[0] != self.n:
                    raise _not_a_batch(h, self.n, name)
                if not live[i]:
                    timings.append((name, self.n, (clock.now_ns() - now) / NS_PER_MS))
                    continue
                step = self._exit(i, name, now)
                if step == _ABORT:
                    return
                if step == _DONE:
                    break
            if state.outcome is None:
                state.outcome = OK
        except Exception as exc:
            state.set_reason(self.active, R.PRIMARY_ERROR, self.b)
            state.add_detail(f"{type(exc).__name__}: {exc}"[:200])
            state.outcome = ERROR
        finally:  # late stages of a timed-out walk are recorded too: the profile learns the stall
            if self.cancel is not None:  # (its plans read medians, which any sample may move: recorded at once)
                self.rt.profile.record_many(timings)
            else:
                self.rt.profile.submit(timings)

    def _stopped(self, i: int, now: int) -> bool:
        """Before stage ``i``: stop when past its limit (or cancelled), with the reason."""
        state, cancel = self.state, self.cancel
        cancelled = cancel is not None and cancel.is_set()
        if not (now - state.start_ns > self.limits[i] or cancelled):
            return False
        if now > state.deadline_ns or cancelled:
            state.set_reason(self.active, R.DEADLINE_EXCEEDED, self.b)
            state.outcome = EXCEEDED
        else:
            state.set_reason(self.active, R.DEADLINE_PREDICTED, self.b)
            state.outcome = PREDICTED
            if i == 0:
                self.rt.refused_in_row += 1  # (a lost update under threads only delays a probe)
        return True

    def _transform(self) -> torch.Tensor:
        rt = self.rt
        if rt.refused_in_row and self.admission:
            rt.refused_in_row = 0
        active = self.active
        return self.steps.transform(self.x if active is None else self.x[active])

    def _exit(self, i: int, name: str, now: int) -> int:
        """After stage ``i``: its head, the decision, the answers served; what the walk does next."""
        state, steps, n = self.state, self.steps, self.n
        path = steps.exit_at[i]
        logits = steps.heads[i](self.h)
        check_logits(logits, n, path)
        state.num_classes = logits.shape[1]
        if self.evidence is not None:  # the router decides from the evidence
            decision = self._route(i, name, now, path, logits)
            if decision is None:
                return _DONE
            accept, conf, prediction = decision
        else:
            accept, conf, prediction = steps.decide(path, logits)
            if state.drift_scores is None:
                state.drift_scores = conf  # the first live gate sees every sample walked
        n_accept = int(accept.sum()) if n > 1 else int(accept.item())  # (one sync; no reduction at batch 1)
        done_ns = self.clock.now_ns()
        state.timings.append((name, n, (done_ns - now) / NS_PER_MS))
        if done_ns > state.deadline_ns:  # this exit answered too late: it does not serve
            state.set_reason(self.active, R.DEADLINE_EXCEEDED, self.b)
            state.outcome = EXCEEDED
            return _ABORT
        if n_accept == n:
            state.serve(self.active, None, path, logits, conf, prediction, self.b)
            return _DONE
        if n_accept and not state.serve(self.active, accept, path, logits, conf, prediction, self.b):
            return _ABORT  # frozen: the caller has answered at the deadline
        return self._rest(i, accept, conf, n_accept)

    def _route(self, i: int, name: str, now: int, path: str, logits: torch.Tensor) -> Any:
        """The router at the exit after stage ``i``; ``None`` after the final head (it decided there)."""
        state, steps, evidence = self.state, self.steps, self.evidence
        if state.drift_scores is None and self.policy.drift_check:  # the drift check still reads the gate
            state.drift_scores = steps.decide(path, logits)[1]
        k = steps.grow(evidence, logits, self.h)
        if i == steps.last:
            state.timings.append((name, self.n, (self.clock.now_ns() - now) / NS_PER_MS))
            self._route_final(logits)
            return None
        return steps.route_exit(evidence, k)

    def _rest(self, i: int, accept: torch.Tensor, conf: torch.Tensor, n_accept: int) -> int:
        """The samples the exit after stage ``i`` did not serve: a reason for the non-finite ones (and at
        the last exit for every one), the rest go on in a compacted batch."""
        state, active = self.state, self.active
        nonfinite = torch.isnan(conf)
        if bool(nonfinite.any()):
            state.set_reason(select(active, nonfinite), R.NONFINITE_OUTPUT, self.b)
            state.outcome = NONFINITE
            keep = ~accept & ~nonfinite
        elif n_accept:
            keep = ~accept
        else:
            keep = None  # nobody left the batch: no compaction
        if i == self.steps.last:
            rejected = active if keep is None else select(active, keep)
            state.set_reason(rejected, R.LOW_CONFIDENCE, self.b)
            return _DONE
        if keep is not None:
            self.active = select(active, keep)
            self.n = int(self.active.numel())
            if self.n == 0:
                return _DONE
            self.h = self.h[keep]
            if self.evidence is not None:
                self.evidence = self.evidence.select(keep)
            if self.admission:  # the rest of the walk is planned at the smaller batch
                self.limits = self._plan()
        return _NEXT

    def _route_final(self, logits: torch.Tensor) -> None:
        """After the final head: the primary, the student (``router_preferred``) or the default."""
        state, active, b = self.state, self.active, self.b
        evidence: Evidence = self.evidence  # type: ignore[assignment]
        if self.clock.now_ns() > state.deadline_ns:  # the primary answered too late: it does not serve
            state.set_reason(active, R.DEADLINE_EXCEEDED, b)
            state.outcome = EXCEEDED
            return
        accept, use_student, conf, prediction = self.steps.route_final(evidence)
        primary_rows = accept & ~use_student
        student_rows = accept & use_student
        if bool(primary_rows.any()):
            if not state.serve(active, primary_rows, R.PRIMARY, logits, conf, prediction, b):
                return  # frozen: the caller has answered at the deadline
        if bool(student_rows.any()):
            if not state.serve(active, student_rows, R.STUDENT, evidence.student_logits, conf, prediction, b):
                return
            state.set_reason(select(active, student_rows), R.ROUTER_PREFERRED, b)
        rejected = ~accept
        if bool(rejected.any()):
            finite = torch.isfinite(logits).all(1)
            rows = select(active, rejected & finite)
            state.set_reason(rows, R.LOW_CONFIDENCE, b)
            state.router_rejected = rows  # the router judged both answers: the default serves them
            if not bool(finite.all()):
                state.set_reason(select(active, rejected & ~finite), R.NONFINITE_OUTPUT, b)
                state.outcome = NONFINITE
