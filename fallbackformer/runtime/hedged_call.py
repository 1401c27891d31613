"""The hard deadline: the primary's walk on a worker, the student ready by the deadline.

The caller submits the walk to the primary's worker pool and waits until the latest moment that
still leaves the student its predicted p99, the margin and a hand-off (``"deferred"``), or not at
all (``"immediate"``). If the primary is not done by then, the caller computes the student's answer
for every sample not served yet and waits for the primary until the deadline less the margin; then
it answers with whatever is ready (``RequestState.freeze``), and a walk still running is cancelled
at its next stage (its worker counted stuck until it returns).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import NS_PER_MS
from fallbackformer.runtime.fallback_path import StudentAnswer, student_answer
from fallbackformer.runtime.hedging import HedgeStatus
from fallbackformer.runtime.request_state import RequestState
from fallbackformer.runtime.walk import BUSY, ERROR, OK, TIMEOUT, PrimaryWalk

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.policy import Policy
    from fallbackformer.runtime.runtime import Runtime

__all__ = ["HANDOFF_MS", "hedged_primary"]

#: time allowed for handing the student to its worker in a hedged call (it starts this much earlier)
HANDOFF_MS = 3.0


def _walk(rt: "Runtime", x: torch.Tensor, valid: torch.Tensor | None, state: RequestState, policy: "Policy",
          cancel: threading.Event) -> None:
    PrimaryWalk(rt, x, valid, state, policy, cancel).run()


def _student_start_ns(rt: "Runtime", state: RequestState, policy: "Policy", n: int) -> int:
    """When the caller stops waiting for the primary alone and computes the student's answer."""
    if policy.hedge_student_start == "immediate" or rt.profile.count(R.STUDENT) == 0:
        return rt.clock.now_ns()  # (the student's time is unknown before it ever ran)
    # the latest start that still leaves the student its p99 and the margin
    student_ms = rt.plan(n, policy, state.live, False, state.seq).student_ms + policy.margin_ms
    student_ms += min(HANDOFF_MS, 0.25 * policy.budget_ms)  # the student's own worker hand-off
    return state.deadline_ns - int(student_ms * NS_PER_MS)


def hedged_primary(rt: "Runtime", x: torch.Tensor, valid: torch.Tensor | None, state: RequestState,
                   policy: "Policy") -> str:
    """Run the primary on a worker and have the student ready by the deadline; return the outcome."""
    clock = rt.clock
    b = x.shape[0]
    student_at = _student_start_ns(rt, state, policy, b if valid is None else int(valid.numel()))
    state.shared = True
    cancel = threading.Event()
    t0 = clock.now_ns()
    ticket = rt.hedger(policy, x.device).submit(_walk, rt, x, valid, state, policy, cancel)
    if ticket is None:  # every worker is still busy with earlier calls: fall back at once
        state.set_reason(valid, R.DEADLINE_PREDICTED, b, caller=True)
        state.add_detail("hedge workers busy")
        state.primary_ms = (clock.now_ns() - t0) / NS_PER_MS
        return BUSY
    ticket.link_cancel(cancel)  # a cancelled walk stops at its next stage (its worker: stuck)
    first = ticket.wait(student_at)
    if first.status != HedgeStatus.TIMEOUT:
        state.primary_ms = (clock.now_ns() - t0) / NS_PER_MS
        if first.status == HedgeStatus.ERROR:  # a fault outside the walk's own handler (BaseException)
            return worker_error(first.error, valid, state, x.device)
        return state.outcome or OK  # the caller serves the rest with the student
    # The primary is not done: compute the student now for everything not served yet.
    candidates = state.unserved(valid, x.device)
    student = student_answer(rt, x, candidates, state, policy) if candidates is not None else None
    result = ticket.wait(state.deadline_ns - int(policy.margin_ms * NS_PER_MS))  # the margin: return path
    state.freeze()
    outcome = _at_deadline(rt, result, cancel, ticket, valid, state, x.device)
    state.primary_ms = (clock.now_ns() - t0) / NS_PER_MS
    if student is not None:
        _serve_student(student, state, b)
    state.student_done = True
    return outcome


def _at_deadline(rt: "Runtime", result, cancel: threading.Event, ticket, valid: torch.Tensor | None,
                 state: RequestState, device: torch.device) -> str:
    """The primary's outcome once the caller stopped waiting for it."""
    if result.status == HedgeStatus.TIMEOUT:
        cancel.set()
        ticket.cancel()
        rt.note_primary_timeout()
        rest = state.unserved(valid, device)
        if rest is None:  # the walk served every valid sample; only its bookkeeping ran late
            return state.outcome or OK
        state.set_reason(rest, R.DEADLINE_EXCEEDED, state.b, caller=True, only_unset=True)
        return TIMEOUT
    if result.status == HedgeStatus.ERROR:
        return worker_error(result.error, valid, state, device)
    return state.outcome or OK


def _serve_student(student: StudentAnswer, state: RequestState, b: int) -> None:
    """The student's accepted rows that nobody served meanwhile (and the router did not judge)."""
    idx, logits, accept, conf, prediction = student
    still = state.unserved_mask(idx).to(accept.device)  # [k]: the primary did not serve them since
    if state.router_rejected is not None:  # the router judged these with the primary's evidence
        still &= ~torch.isin(idx, state.router_rejected.to(idx.device)).to(accept.device)
    state.serve_student(idx, logits, still & accept, conf, prediction, b)


def worker_error(error: BaseException | None, valid: torch.Tensor | None, state: RequestState,
                 device: torch.device) -> str:
    """A hedging worker died outside the walk's handler: the unserved samples fall back with a record."""
    rest = state.unserved(valid, device)
    if rest is not None:
        state.set_reason(rest, R.PRIMARY_ERROR, state.b, caller=True, only_unset=True)
    state.add_detail(f"hedge worker {type(error).__name__}: {error}"[:200])
    return ERROR
