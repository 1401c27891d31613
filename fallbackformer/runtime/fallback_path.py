"""The fallback path of one call: the student's logits (timed, bounded), its decision, its answers.

Without a router the student runs after the primary, on the samples the primary did not serve, and
its gate decides. With a router the student runs first, for every valid sample (its logits are part
of the evidence); the samples the primary could not finish are then judged by the router on the
student alone. With ``hedge="always"`` the student runs on a worker and the caller waits no later
than the deadline less the margin; a student that fails leaves the default in place, with the cause
in the call's detail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import NS_PER_MS
from fallbackformer.runtime.hedging import HedgeStatus
from fallbackformer.runtime.request_state import RequestState
from fallbackformer.runtime.walk import check_logits

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.policy import Policy
    from fallbackformer.runtime.runtime import Runtime

__all__ = ["StudentAnswer", "run_student", "student_answer", "student_first", "student_logits"]

#: (original indices [k], logits [k, C], accept [k], confidence [k], prediction [k])
StudentAnswer = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def student_first(rt: "Runtime", x: torch.Tensor, valid: torch.Tensor | None, state: RequestState,
                  policy: "Policy") -> None:
    """The router's evidence: the student's logits for every valid sample, ``[B, C]`` (NaN rows: none)."""
    n = x.shape[0] if valid is None else int(valid.numel())
    logits = student_logits(rt, x if valid is None else x[valid], n, state, policy)
    if logits is None:  # the router then sees no student evidence and accepts nothing: the default serves
        return
    if valid is not None:
        full = torch.full((x.shape[0], logits.shape[1]), float("nan"), dtype=logits.dtype, device=logits.device)
        full[valid] = logits
        logits = full
    state.student_logits = logits
    state.num_classes = logits.shape[1]


def student_logits(rt: "Runtime", xs: torch.Tensor, n: int, state: RequestState,
                   policy: "Policy", name: str = R.STUDENT) -> torch.Tensor | None:
    """The student's (or the fallback rung ``name``'s) logits on ``xs`` (``n`` samples), timed; ``None``
    when it failed or was late. Every rung runs like the student: on its worker pool under
    ``hedge="always"``, bounded by the deadline.

    With ``hedge="always"`` it runs on a worker and the caller waits no later than the deadline
    less the margin; a late student is cancelled (its worker counted stuck until it returns) and
    ``state.student_late`` makes the default answer with ``deadline_exceeded``.
    """
    clock = rt.clock
    t0 = clock.now_ns()
    unit = rt.steps.student if name == R.STUDENT else rt.steps.rungs[name]
    try:
        if policy.hedge != "always":
            logits = unit(xs)
        else:
            hedger = rt.hedger(policy, xs.device, "student")
            result = hedger.run(unit, state.deadline_ns - int(policy.margin_ms * NS_PER_MS), xs)
            if result.status in (HedgeStatus.TIMEOUT, HedgeStatus.BUSY):
                state.student_late = True
                state.add_detail(f"{name} did not answer by the deadline" if result.status == HedgeStatus.TIMEOUT
                                 else f"{name} workers busy")
                return None
            if result.error is not None:
                raise result.error
            logits = result.value
        check_logits(logits, n, name)
    except Exception as exc:  # the default (already in place) serves
        state.add_detail(f"{name} {type(exc).__name__}: {exc}"[:200])
        return None
    rt.profile.record(name, n, (clock.now_ns() - t0) / NS_PER_MS)
    return logits


def student_answer(rt: "Runtime", x: torch.Tensor, idx: torch.Tensor, state: RequestState,
                   policy: "Policy") -> StudentAnswer | None:
    """The student's answer on samples ``idx``, ``None`` if it failed."""
    n = int(idx.numel())
    steps = rt.steps
    if steps.router is not None:  # the student already ran: the router judges it alone
        if state.student_logits is None:
            return None  # it failed (recorded): the default serves
        logits = state.student_logits[idx]
        accept, conf, prediction = steps.route_student_alone(logits)
        return idx, logits, accept, conf, prediction
    logits = student_logits(rt, x if n == x.shape[0] else x[idx], n, state, policy)
    if logits is None:
        return None  # the default (already in place) serves
    state.num_classes = logits.shape[1]
    if rt.default is not None:  # a typed default reads the best logits there are
        state.keep_fallback_logits(idx, logits)
    accept, conf, prediction = steps.decide(R.STUDENT, logits)  # never accepts a non-finite row
    return idx, logits, accept, conf, prediction


def run_student(rt: "Runtime", x: torch.Tensor, idx: torch.Tensor, state: RequestState, policy: "Policy") -> None:
    """Serve the samples ``idx`` the primary did not by the student, where it is accepted."""
    if state.student_done:
        return
    if state.router_rejected is not None:  # judged by the router with the primary's evidence
        idx = idx[~torch.isin(idx, state.router_rejected.to(idx.device))]
        if idx.numel() == 0:
            return
    answer = student_answer(rt, x, idx, state, policy)
    if answer is not None:
        state.serve_student(*answer, x.shape[0])
