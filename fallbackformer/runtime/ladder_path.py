"""The ladder below the primary for one call: the cache, the student, the further rungs, the veto, the default.

Used when the model has more than the single student (:meth:`Runtime.has_ladder`); the single-student
form keeps the shorter path in :mod:`~fallbackformer.runtime.runtime`. In order:

1. the agreement veto (``veto``): answers of the primary's path less confident than ``veto_below`` that
   no vetoing rung agrees with are taken back (``rung_disagreement``) and go down the ladder;
2. the response cache, for the rows the primary's path could not answer at all (a deadline, an
   error, an open breaker: :data:`~fallbackformer.runtime.reasons.PRIMARY_DOWN`): identical inputs
   only, ``served_by="cache"``;
3. the student (its answers need the veto's agreement too);
4. each further rung in order, under its own gate, bounded like the student (a rung that raises or is
   late leaves a record in the call's detail, and the next rung tries; a vetoing rung that already ran
   over the whole batch for the veto is not run again);
5. what is left gets the typed safe default (:meth:`Runtime.finish_default`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.fallback_path import run_student, student_logits
from fallbackformer.runtime.request_state import RequestState

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.output import FallbackOutput
    from fallbackformer.runtime.policy import Policy
    from fallbackformer.runtime.runtime import Runtime

__all__ = ["apply_default", "run_ladder"]


def run_ladder(rt: "Runtime", x: torch.Tensor, valid: torch.Tensor | None, state: RequestState,
               policy: "Policy") -> None:
    """Serve the valid samples the primary's path did not, down the ladder (see the module docstring)."""
    ran: dict[str, torch.Tensor | None] = {}  # a vetoing rung's logits on the whole batch (None: it failed)
    if rt.steps.veto:
        _veto(rt, x, state, policy, set(rt.decisions.primary.exit_names), ran)
    if rt.cache is not None:
        _from_cache(rt, x, valid, state)
    rest = state.unserved(valid, x.device)
    if rest is not None:
        run_student(rt, x, rest, state, policy)
    if rt.steps.veto:
        _veto(rt, x, state, policy, {R.STUDENT}, ran)
    for name in rt.steps.rungs:
        if state.student_late:  # past the deadline: the default answers
            return
        rest = state.unserved(valid, x.device)
        if rest is None:
            return
        _run_rung(rt, name, x, rest, state, policy, ran.get(name))


def _run_rung(rt: "Runtime", name: str, x: torch.Tensor, idx: torch.Tensor, state: RequestState,
              policy: "Policy", whole: torch.Tensor | None) -> None:
    """Rung ``name`` on the samples ``idx``: its gate's accepted rows are served by it. ``whole``: its
    logits on the whole batch when the veto already ran it (not run again)."""
    n = int(idx.numel())
    if whole is not None:
        logits = whole[idx.to(whole.device)]
    else:
        logits = student_logits(rt, x if n == x.shape[0] else x[idx], n, state, policy, name)
    if logits is None:
        return  # raised or late: recorded in the detail; the next rung tries
    state.num_classes = logits.shape[1]
    if rt.default is not None:
        state.keep_fallback_logits(idx, logits)
    accept, conf, prediction = rt.steps.decide(name, logits)
    state.serve_rung(name, idx, logits, accept, conf, prediction)


def _answers(state: RequestState, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The served predictions and confidences of ``rows`` (original indices)."""
    pred = torch.full((state.b,), -1, dtype=torch.long)
    conf = torch.full((state.b,), float("nan"))
    with state.lock:
        parts = list(state.parts)
    for idx, _, cf, pd in parts:
        target = slice(None) if idx is None else idx.cpu()
        pred[target] = pd.cpu()
        conf[target] = cf.float().cpu()
    return pred[rows], conf[rows]


def _veto(rt: "Runtime", x: torch.Tensor, state: RequestState, policy: "Policy", paths: set[str],
          ran: dict[str, torch.Tensor | None]) -> None:
    """Take back the answers of ``paths`` less confident than ``veto_below`` that no vetoing rung agrees
    with (``rung_disagreement``)."""
    rows = state.served_rows(paths)
    if rows.numel() == 0:
        return
    pred, conf = _answers(state, rows)
    agree = ~(conf < rt.steps.veto_below)  # confident enough: not reviewed
    if bool(agree.all()):  # nothing to review: the vetoing rungs need not run
        return
    for name in rt.steps.veto:
        if name not in ran:  # one pass of the rung over the whole batch, shared by both checks and its rung
            ran[name] = student_logits(rt, x, x.shape[0], state, policy, name)
        logits = ran[name]
        if logits is not None:  # a rung that failed gives no vote
            agree |= logits.argmax(dim=1).cpu()[rows] == pred
    refused = rows[~agree]
    if refused.numel():
        state.unserve(refused.to(x.device), R.RUNG_DISAGREEMENT)


def _from_cache(rt: "Runtime", x: torch.Tensor, valid: torch.Tensor | None, state: RequestState) -> None:
    """Identical inputs the primary's path answered before, for rows it could not answer now."""
    rest = state.unserved(valid, x.device)
    if rest is None:
        return
    with state.lock:
        down = [i for i in rest.tolist() if state.reason[i] in R.PRIMARY_DOWN]
    if not down:
        return
    idx = torch.tensor(down, dtype=torch.long, device=x.device)
    found = rt.cache.lookup(x[idx])
    if bool(found.hit.any()) and found.logits.shape[1] > 0:
        state.serve_rung(R.CACHE, idx, found.logits, found.hit, found.confidence, found.prediction)


def apply_default(rt: "Runtime", out: "FallbackOutput", x: torch.Tensor, state: RequestState) -> None:
    """The typed default's answer for the rows served by ``default`` (its prediction, confidence, set)."""
    default = rt.default
    rows = [i for i, s in enumerate(out.served_by) if s == R.DEFAULT]
    c = out.logits.shape[1]
    if not rows or c == 0:
        return
    idx = torch.tensor(rows, dtype=torch.long, device=out.prediction.device)
    kept = state.fallback_logits
    logits = kept[idx].float() if kept is not None else torch.full((len(rows), c), float("nan"))
    answer = default.answer(logits.to(out.logits.device), x[idx])
    sets = out.prediction_set.clone()
    out.prediction[idx] = answer.prediction.to(out.prediction.device)
    out.confidence[idx] = answer.confidence.to(out.confidence.device).float()
    sets[idx] = answer.prediction_set.to(sets.device)
    out.prediction_set = sets
