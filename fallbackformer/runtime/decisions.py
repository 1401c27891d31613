"""The decision module: what a :class:`~fallbackformer.runtime.fallback_model.FallbackModel` decides.

:class:`Decisions` is a pure ``nn.Module``: the primary (its input transform, stages and exit heads),
the fallback rungs (today one, the student), one gate per path and the optional router with its
evidence. Given its inputs it is deterministic; it holds no clock, no counters and no threads.
Two ways to run it:

- **whole batch** (:meth:`Decisions.forward`): every stage and the student run on the whole batch
  and ``torch.where`` selects per sample. One straight graph: what ONNX and ``torch.export``
  capture (through :class:`~fallbackformer.export.graph.CombinedGraph`, which adds the input check
  and the safe default's class).
- **stage by stage** (:meth:`Decisions.steps`): the runtime walks the stages itself, checks the
  deadline between them and lets answered samples leave the batch; the
  :class:`~fallbackformer.runtime.steps.DecisionSteps` it drives makes the same per-sample decisions.

The fallback rungs are a sequence, the ladder: the student first, then any named rungs (classical
models, reduced-input students) tried in order, each with its own gate. With a router, the router
judges the student; the rungs after it keep their gates, and the veto applies as without one. An
optional agreement veto (``veto``, the names of rungs) keeps an answer of the primary's path or the
student whose confidence is below ``veto_below`` (the router's probability that it is right, or the
gate's calibrated confidence; ``inf``: every answer) only where at least one of those rungs predicts
the same class; a vetoed answer goes down the ladder (``rung_disagreement``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fallbackformer.common.paths import served_by_codes
from fallbackformer.gates.evidence import Evidence
from fallbackformer.gates.router import Router
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime import reasons as R

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.steps import DecisionSteps

__all__ = ["Answer", "Decisions", "accepts_nothing", "gates_by_name", "initial_answer", "take"]

TRANSFORM_UNIT = "transform"

#: (prediction [B] long, served_by code [B] long, confidence [B] float32, logits [B, C] float32)
Answer = tuple[Tensor, Tensor, Tensor, Tensor]


def gates_by_name(gates: Sequence[nn.Module] | Mapping[str, nn.Module], names: list[str]) -> dict[str, nn.Module]:
    """The gates keyed by path name, from a sequence in path order or a mapping with exactly ``names``."""
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
        raise ValueError(f"got {len(gates)} gates; expected {len(names)}, one per path in order {names}")
    return dict(zip(names, gates))


class Decisions(nn.Module):
    """The decisions as one module: primary, fallback rungs, gates and router (see the module docstring).

    Args:
        primary: the primary, a :class:`MultiExitNet`.
        fallbacks: the fallback rungs in order, each mapping the raw input ``[B, ...]`` to logits
            ``[B, C]``; the student first.
        gates: one gate per path (``[exit_1, ..., primary, student, *rungs]``), a sequence or a mapping.
        router: a certified router that decides at every exit from the evidence instead of the gates.
        fallback_names: the ``served_by`` name of each fallback rung; ``["student", ...]`` (the default
            names only the student).
        veto: names of fallback rungs (after the student) whose agreement an answer of the primary's
            path or the student needs; empty: no veto.
        veto_below: the veto reviews only answers whose confidence is below this level (``inf``: all).
    """

    def __init__(
        self,
        primary: MultiExitNet,
        fallbacks: Sequence[nn.Module],
        gates: Sequence[nn.Module] | Mapping[str, nn.Module],
        router: Router | None = None,
        fallback_names: Sequence[str] | None = None,
        veto: Sequence[str] = (),
        veto_below: float = math.inf,
    ) -> None:
        super().__init__()
        if not isinstance(primary, MultiExitNet):
            raise TypeError(
                f"primary must be a fallbackformer.MultiExitNet; got {type(primary).__name__}. "
                "Wrap your model: MultiExitNet(stages=[...blocks...], heads={last_index: head})"
            )
        fallbacks = list(fallbacks)
        names = [R.STUDENT] if fallback_names is None else list(fallback_names)
        if len(names) != len(fallbacks) or not names or names[0] != R.STUDENT:
            raise ValueError(f"fallback_names {names} must name each of the {len(fallbacks)} fallback rungs, "
                             "'student' first")
        veto = list(veto)
        if not set(veto) <= set(names[1:]) or len(set(veto)) != len(veto):
            raise ValueError(f"veto {veto} must name distinct rungs of the ladder after the student: {names[1:]}")
        if isinstance(veto_below, bool) or not isinstance(veto_below, (int, float)) or not veto_below > 0:
            raise ValueError(f"veto_below={veto_below!r} must be a confidence level > 0 (inf: the veto reviews every answer)")
        if router is not None and router.num_exits != primary.num_exits:
            raise ValueError(f"the router routes {router.num_exits} heads; the primary has {primary.num_exits}. "
                             "Fit the router on this primary")
        self.primary = primary
        self.fallbacks = nn.ModuleList(fallbacks)
        #: the served_by name of each fallback rung, in order
        self.fallback_names: list[str] = names
        #: the rungs whose agreement an answer of the primary's path or the student needs (empty: no veto)
        self.veto: tuple[str, ...] = tuple(veto)
        #: the veto reviews only answers whose confidence is below this level (inf: every answer)
        self.veto_below = float(veto_below)
        #: every path in order: the exits (the primary's final head last), then the fallback rungs
        self.path_names: list[str] = primary.exit_names + self.fallback_names
        self.gates = nn.ModuleDict(gates_by_name(gates, self.path_names))
        self.router = router
        self.stage_names: tuple[str, ...] = tuple(f"stage_{i}" for i in range(len(primary.stages)))
        #: stage index -> the path name of the exit after it
        self.exit_at: dict[int, str] = {s: self.path_names[k] for k, s in enumerate(primary.exit_stages)}

    @property
    def student(self) -> nn.Module:
        """The first fallback rung: raw input ``[B, ...]`` to logits ``[B, C]``."""
        return self.fallbacks[0]

    @property
    def rungs(self) -> dict[str, nn.Module]:
        """The fallback rungs after the student, by name, in order."""
        return dict(zip(self.fallback_names[1:], list(self.fallbacks)[1:]))

    @property
    def codes(self) -> list[str]:
        """The ``served_by`` code table (:func:`served_by_codes`)."""
        return served_by_codes(self.path_names)

    def pieces(self) -> dict[str, nn.Module]:
        """The modules a stage-by-stage walk runs, by unit name: ``transform``, ``stage_<i>``,
        ``head_<i>`` (after stage ``i``) and the fallback rungs (``student``)."""
        primary = self.primary
        units: dict[str, nn.Module] = {TRANSFORM_UNIT: primary.input_transform}
        for i, stage in enumerate(primary.stages):
            units[self.stage_names[i]] = stage
        for s in primary.exit_stages:
            units[f"head_{s}"] = primary.head(s)
        for name, rung in zip(self.fallback_names, self.fallbacks):
            units[name] = rung
        return units

    def steps(self, units: Mapping[str, Callable[..., Any]] | None = None) -> "DecisionSteps":
        """The stage-by-stage view the runtime drives; ``units`` replace :meth:`pieces` (compiled ones)."""
        from fallbackformer.runtime.steps import DecisionSteps

        return DecisionSteps(self, dict(units) if units is not None else self.pieces())

    # ------------------------------------------------------------------ whole batch

    def forward(self, x: Tensor, alive: Tensor | None = None, default_prediction: int = -1) -> Answer:
        """Every sample's decision, no deadline: ``x`` raw ``[B, ...]`` -> :data:`Answer`.

        Exit ``k`` serves a sample that reached it when its gate accepts and its logits are finite;
        a non-finite row goes to the student, and so do the final gate's rejections; the student's
        rejections get the default (``default_prediction``, code ``len(path_names)``).

        Args:
            x: the raw batch.
            alive: BoolTensor ``[B]``, the samples to decide (the others get the default); all by default.
            default_prediction: the safe default's class, ``-1`` to abstain.
        """
        if alive is None:
            alive = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if self.router is not None:
            return self._forward_routed(x, alive, default_prediction)
        to_student = torch.zeros_like(alive)  # [B]
        h = self.primary.input_transform(x)
        answer = None
        last = len(self.primary.exit_stages) - 1
        k = 0
        for i, stage in enumerate(self.primary.stages):
            h = stage(h)
            if i not in self.exit_at:
                continue
            logits = self.primary.head(i)(h)  # [B, C]
            if answer is None:
                answer = initial_answer(x, logits, len(self.path_names), default_prediction)
            alive, to_student, answer = self.after_exit(k, k == last, logits, alive, to_student, answer)
            k += 1
        rung_logits = [rung(x) for rung in self.fallbacks]  # [B, C] each
        refuse = self.refusal(rung_logits)
        if refuse is not None:  # primary-path answers without a vetoing rung's agreement go down the ladder
            served = answer[1] < self.primary.num_exits
            vetoed = served & refuse(answer[0], answer[2])
            answer = untake(vetoed, len(self.path_names), default_prediction, answer)
            to_student = to_student | vetoed
        return self.down_the_ladder(to_student, rung_logits, answer, refuse, 0)

    def refusal(self, rung_logits: Sequence[Tensor]) -> Callable[[Tensor, Tensor], Tensor] | None:
        """``(prediction [B], confidence [B]) -> [B]``: whether the veto refuses the answer (its confidence
        is below :attr:`veto_below` and no vetoing rung predicts the same class); ``None`` without a veto."""
        if not self.veto:
            return None
        votes = [rung_logits[self.fallback_names.index(n)].argmax(dim=1) for n in self.veto]  # [B] each

        def refused(prediction: Tensor, confidence: Tensor) -> Tensor:
            ok = ~(confidence < self.veto_below)  # confident enough: not reviewed
            for vote in votes:
                ok = ok | (vote == prediction)
            return ~ok

        return refused

    def down_the_ladder(self, waiting: Tensor, rung_logits: Sequence[Tensor], answer: Answer,
                        refuse: Callable[[Tensor, Tensor], Tensor] | None, start: int) -> Answer:
        """Fallback rungs ``start ..`` in order serve what their gates accept among ``waiting`` [B]; the
        student's answers need the veto's agreement (when there is one)."""
        first = len(self.primary.exit_names)
        for j in range(start, len(self.fallbacks)):
            code = first + j
            accepted, conf, _ = self.gate_decision(code, rung_logits[j])
            took = waiting & accepted
            if j == 0 and refuse is not None:
                took = took & ~refuse(rung_logits[j].argmax(dim=1), conf)
            answer = take(took, code, rung_logits[j], conf, answer)
            waiting = waiting & ~took
        return answer

    def gate_decision(self, k: int, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gate of path ``k`` on ``logits`` [B, C]: (accepted [B], confidence [B], finite [B])."""
        finite = torch.isfinite(logits).all(dim=1)  # [B]
        accepted, confidence = self.gates[self.path_names[k]](logits)
        return accepted & finite, confidence.float(), finite

    def after_exit(
        self, k: int, is_last: bool, logits: Tensor, alive: Tensor, to_student: Tensor, answer: Answer
    ) -> tuple[Tensor, Tensor, Answer]:
        """Exit ``k``: serve what its gate accepts among the samples still waiting (``alive``);
        non-finite rows, and at the last exit every rejected row, go to the student."""
        accepted, conf, finite = self.gate_decision(k, logits)
        took = alive & accepted
        answer = take(took, k, logits, conf, answer)
        if is_last:
            return alive, to_student | (alive & ~took), answer
        return alive & ~accepted & finite, to_student | (alive & ~finite), answer

    def _forward_routed(self, x: Tensor, alive: Tensor, default_prediction: int) -> Answer:
        """The router's decisions: the student first, then the router at every exit from the evidence."""
        router = self.router
        valid = alive
        student_code = len(self.primary.exit_names)
        to_student = torch.zeros_like(alive)  # [B] samples the student alone judges
        student_logits = self.student(x).float()  # [B, C]
        evidence = Evidence(student_logits=student_logits)
        answer = initial_answer(x, student_logits, len(self.path_names), default_prediction)
        h = self.primary.input_transform(x)
        last = len(self.primary.exit_stages) - 1
        k = 0
        for i, stage in enumerate(self.primary.stages):
            h = stage(h)
            if i not in self.exit_at:
                continue
            logits = self.primary.head(i)(h).float()  # [B, C]
            evidence.exit_logits.append(logits)
            evidence.feature_scores.append(router.feature_scores[k](h))
            finite = torch.isfinite(logits).all(dim=1)  # [B]
            if k < last:
                accepted, conf, _ = router.decide_exit(evidence, k)
                took = alive & accepted & finite
                answer = take(took, k, logits, conf, answer)
                to_student = to_student | (alive & ~finite)
                alive = alive & ~took & finite
            else:
                accepted, use_student, conf, _ = router.decide_final(evidence)
                took = alive & accepted
                answer = take(took & ~use_student, k, logits, conf, answer)
                answer = take(took & use_student, student_code, student_logits, conf, answer)
                to_student = to_student | (alive & ~accepted & ~finite)
            k += 1
        return self._routed_ladder(x, valid, to_student, student_logits, answer, default_prediction)

    def _routed_ladder(self, x: Tensor, valid: Tensor, to_student: Tensor, student_logits: Tensor,
                       answer: Answer, default_prediction: int) -> Answer:
        """After the router's walk: the veto on the primary's path, the student alone (the router judges
        it), the veto on the student's answers, then the rungs after the student in order."""
        router, student_code, default_code = self.router, len(self.primary.exit_names), len(self.path_names)
        rung_logits = [student_logits] + [rung(x) for rung in list(self.fallbacks)[1:]]
        refuse = self.refusal(rung_logits)
        if refuse is not None:  # as without a router: the primary's path answers need a vetoing rung's agreement
            vetoed = (answer[1] < student_code) & refuse(answer[0], answer[2])
            answer = untake(vetoed, default_code, default_prediction, answer)
            to_student = to_student | vetoed
        accepted, conf, _ = router.decide_student_alone(student_logits)
        answer = take(to_student & accepted, student_code, student_logits, conf, answer)
        if refuse is not None:  # every student answer (the router's choice at the final head too)
            answer = untake((answer[1] == student_code) & refuse(answer[0], answer[2]), default_code, default_prediction,
                            answer)
        if len(self.fallbacks) == 1:
            return answer
        # the rungs after the student: what the router sent to the fallbacks and did not serve
        return self.down_the_ladder(valid & (answer[1] == default_code), rung_logits, answer, None, 1)


def initial_answer(x: Tensor, logits: Tensor, default_code: int, default_prediction: int) -> Answer:
    """Every sample served by the default: its class, its code, NaN confidence and NaN logits."""
    b = x.shape[0]
    pred = torch.full((b,), default_prediction, dtype=torch.long, device=x.device)
    served = torch.full((b,), default_code, dtype=torch.long, device=x.device)
    confidence = torch.full((b,), float("nan"), dtype=torch.float32, device=x.device)
    out_logits = torch.full_like(logits, float("nan"), dtype=torch.float32)  # [B, C]
    return pred, served, confidence, out_logits


def take(took: Tensor, code: int, logits: Tensor, conf: Tensor, answer: Answer) -> Answer:
    """The rows ``took`` [B] now served by path ``code`` with these logits and confidence."""
    pred, served, confidence, out_logits = answer
    served = torch.where(took, torch.full_like(served, code), served)
    pred = torch.where(took, logits.argmax(dim=1), pred)
    confidence = torch.where(took, conf, confidence)
    out_logits = torch.where(took[:, None], logits.float(), out_logits)
    return pred, served, confidence, out_logits


def untake(rows: Tensor, default_code: int, default_prediction: int, answer: Answer) -> Answer:
    """The rows ``rows`` [B] back to the default (an answer the veto refused)."""
    pred, served, confidence, out_logits = answer
    served = torch.where(rows, torch.full_like(served, default_code), served)
    pred = torch.where(rows, torch.full_like(pred, default_prediction), pred)
    confidence = torch.where(rows, torch.full_like(confidence, float("nan")), confidence)
    out_logits = torch.where(rows[:, None], torch.full_like(out_logits, float("nan")), out_logits)
    return pred, served, confidence, out_logits


def accepts_nothing(gate: nn.Module) -> bool:
    """Whether ``gate``'s exit is off: its threshold is infinite (its head need not even run)."""
    threshold = getattr(gate, "threshold", None)
    return isinstance(threshold, Tensor) and math.isinf(threshold.item())
