"""DecisionSteps: the decision module, one step at a time, as the runtime drives it.

A plain object (no ``nn.Module`` attribute lookups on the serving path) built from a
:class:`~fallbackformer.runtime.decisions.Decisions` and the callables that run its pieces (the
modules themselves, or their compiled forms). It answers the runtime's questions in order: which
exits can serve at all, the input transform, each stage and head, each gate's or the router's
decision, the student's logits and its decision. It holds no time, no counters and no threads: the
runtime (:mod:`fallbackformer.runtime.walk`, :mod:`fallbackformer.runtime.fallback_path`) decides
when each step runs and what happens when it cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from fallbackformer.gates.evidence import Evidence
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.decisions import TRANSFORM_UNIT, accepts_nothing

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.decisions import Decisions

__all__ = ["DecisionSteps"]

Decision = tuple[Tensor, Tensor, Tensor]  # (accept [B] bool, confidence [B], prediction [B] long)


class DecisionSteps:
    """The stage-by-stage view of a :class:`Decisions` (see the module docstring).

    Args:
        decisions: the decision module.
        units: unit name -> callable: ``transform``, ``stage_<i>``, ``head_<i>``, ``student``.
    """

    __slots__ = ("units", "gates", "router", "stage_names", "exit_at", "heads", "last",
                 "transform", "stages", "student", "rungs", "veto", "veto_below", "_early", "_live", "_all_live")

    def __init__(self, decisions: "Decisions", units: dict[str, Callable[..., Any]]) -> None:
        self.units = units
        self.gates = decisions.gates
        self.router = decisions.router
        self.stage_names = decisions.stage_names
        self.exit_at = dict(decisions.exit_at)  # stage index -> path name
        self.heads = {s: units[f"head_{s}"] for s in self.exit_at}
        self.last = len(self.stage_names) - 1
        self.transform = units[TRANSFORM_UNIT]
        self.stages = tuple(units[name] for name in self.stage_names)
        self.student = units[R.STUDENT]
        #: the fallback rungs after the student, by name, in order
        self.rungs = {name: units[name] for name in decisions.fallback_names[1:]}
        self.veto = decisions.veto
        self.veto_below = decisions.veto_below  # the veto reviews answers less confident than this
        self._early = tuple((s, name) for s, name in sorted(self.exit_at.items()) if s != self.last)
        self._live: dict[tuple[bool, ...], tuple[bool, ...]] = {}
        self._all_live = (True,) * len(self.stage_names)

    def live_exits(self) -> tuple[bool, ...]:
        """Per stage: whether an exit after it can serve. The final exit always can; an early exit unless
        its gate's threshold is infinite (then its head is not even computed). With a router, every exit.

        Read from the gates on every call, so a gate replaced or changed in place is seen at once.
        """
        if self.router is not None:
            return self._all_live
        gates = self.gates
        off = tuple([accepts_nothing(gates[name]) for _, name in self._early])
        live = self._live.get(off)
        if live is None:
            flags = [False] * len(self.stage_names)
            for (s, _), dead in zip(self._early, off):
                flags[s] = not dead
            flags[-1] = True
            live = self._live[off] = tuple(flags)
        return live

    # ------------------------------------------------------------------ the gates

    def decide(self, path: str, logits: Tensor) -> Decision:
        """Path ``path``'s gate on ``logits`` [B, C]. The confidence is NaN exactly on rows with a
        non-finite logit, which it never accepts."""
        return self.gates[path].decide(logits)

    # ------------------------------------------------------------------ the router

    def evidence(self, student_logits: Tensor | None) -> Evidence:
        """A request's evidence, starting from the student's logits (rows of the samples walked)."""
        return Evidence(student_logits=student_logits)

    def grow(self, evidence: Evidence, logits: Tensor, h: Tensor) -> int:
        """Add exit ``k``'s logits and its feature-space score on the stage output ``h``; returns ``k``."""
        k = len(evidence.exit_logits)
        evidence.exit_logits.append(logits)
        evidence.feature_scores.append(self.router.feature_scores[k](h))
        return k

    def route_exit(self, evidence: Evidence, k: int) -> Decision:
        """The router at early exit ``k``."""
        return self.router.decide_exit(evidence, k)

    def route_final(self, evidence: Evidence) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The router after the final head: ``(accept, use_student, confidence, prediction)``."""
        return self.router.decide_final(evidence)

    def route_student_alone(self, student_logits: Tensor) -> Decision:
        """The router on the student alone (the primary could not finish)."""
        return self.router.decide_student_alone(student_logits)
