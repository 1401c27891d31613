"""The combined model as one traceable ``nn.Module``: what ONNX and ``torch.export`` receive.

:class:`CombinedGraph` holds the primary's input transform, every stage and exit head, every gate
(temperature and threshold comparisons), the student and the safe default, and returns fixed
tensors instead of a :class:`~fallbackformer.runtime.output.FallbackOutput`:

- ``prediction`` int64 ``[B]``: the class, or the safe default's (``-1`` where it abstains);
- ``served_by`` int64 ``[B]``: a code, see :func:`served_by_codes`;
- ``confidence`` float32 ``[B]``: the calibrated score of the path that served (NaN for the default);
- ``logits`` float32 ``[B, C]``: the raw logits of the path that served (NaN rows for the default).

The decisions are the runtime's, per sample: exit ``k`` serves a sample that reached it when its
gate accepts and its logits are finite; a sample whose logits are not finite goes to the student
(as the runtime's ``nonfinite_output``); the primary's rejections go to the student; the student's
rejections get the default. Invalid input samples (non-finite, or outside the input spec's range)
get the default: a graph cannot raise, so ``Policy.on_invalid_input="raise"`` becomes ``"default"``.
What a graph cannot hold: the deadline, the circuit breaker, hedging and error recovery; those
live in :class:`~fallbackformer.runtime.fallback_model.FallbackModel`.

Two variants:

- ``"where"``: every stage and the student run on the whole batch; ``torch.where`` selects per
  sample. One straight graph, the same work whatever the input.
- ``"cond"``: the same per-sample selection, but after each exit a ``torch.cond`` (an ONNX ``If``)
  skips the remaining stages when no sample of the batch is still pending, and the student runs
  only when some sample needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.fallback_model import FallbackModel

VARIANTS = ("where", "cond")
OUTPUT_NAMES = ("prediction", "served_by", "confidence", "logits")
DEFAULT = "default"


def served_by_codes(path_names: Sequence[str]) -> list[str]:
    """The ``served_by`` code table: ``codes[i]`` is the name of code ``i``.

    For a primary with ``E`` exits (the final head included): codes ``0 .. E-2`` are the early
    exits ``exit_1 .. exit_{E-1}``, ``E-1`` is ``primary``, ``E`` is ``student``, ``E+1`` is
    ``default``.

    Args:
        path_names: the model's paths in order, ``FallbackModel.path_names``.
    """
    return list(path_names) + [DEFAULT]


class CombinedGraph(nn.Module):
    """A :class:`FallbackModel`'s decisions as one traceable graph (see the module docstring).

    Shares (does not copy) the model's modules.

    Args:
        model: the model to mirror.
        variant: ``"where"`` (per-sample selection, everything runs) or ``"cond"`` (per-sample
            selection, and ``torch.cond`` skips the later stages once nothing is pending).
    """

    def __init__(self, model: "FallbackModel", variant: str = "where") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
        self.variant = variant
        primary = model.primary
        self.input_transform = primary.input_transform
        self.stages = primary.stages
        self.heads = primary.heads
        self.exit_stages: list[int] = list(primary.exit_stages)
        self.student = model.student
        self.path_names: list[str] = list(model.path_names)
        self.gates = nn.ModuleList([model.gates[name] for name in self.path_names])
        self.codes = served_by_codes(self.path_names)
        self.default_code = len(self.codes) - 1
        self.student_code = len(self.codes) - 2
        default_class = model.policy.default_class
        self.default_prediction = -1 if default_class is None else int(default_class)
        spec = model.input_spec
        if spec is not None and spec.value_range is not None:
            lo, hi = spec.value_range
            tol = 1e-3 * (hi - lo)
            self.value_range: tuple[float, float] | None = (float(lo - tol), float(hi + tol))
        else:
            self.value_range = None

    # ------------------------------------------------------------------ pieces

    def _bad(self, x: Tensor) -> Tensor:
        """Per-sample invalid input, as ``runtime.validation.bad_samples``. BoolTensor [B]."""
        flat = x.reshape(x.shape[0], -1)  # [B, D]
        bad = ~torch.isfinite(flat).all(dim=1)  # [B]
        if self.value_range is not None:
            lo, hi = self.value_range
            bad = bad | (flat < lo).any(dim=1) | (flat > hi).any(dim=1)
        return bad

    def _decide(self, k: int, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gate ``k`` on ``logits`` [B, C]: (accepted [B], confidence [B], finite [B])."""
        finite = torch.isfinite(logits).all(dim=1)  # [B]
        accepted, confidence = self.gates[k](logits)
        return accepted & finite, confidence.float(), finite

    @staticmethod
    def _take(
        take: Tensor, code: int, logits: Tensor, conf: Tensor, state: tuple[Tensor, Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pred, served, confidence, out_logits = state
        served = torch.where(take, torch.full_like(served, code), served)
        pred = torch.where(take, logits.argmax(dim=1), pred)
        confidence = torch.where(take, conf, confidence)
        out_logits = torch.where(take[:, None], logits.float(), out_logits)
        return pred, served, confidence, out_logits

    def _initial_state(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b = x.shape[0]
        pred = torch.full((b,), self.default_prediction, dtype=torch.long, device=x.device)
        served = torch.full((b,), self.default_code, dtype=torch.long, device=x.device)
        confidence = torch.full((b,), float("nan"), dtype=torch.float32, device=x.device)
        out_logits = torch.full_like(logits, float("nan"), dtype=torch.float32)  # [B, C]
        return pred, served, confidence, out_logits

    def _run_student(self, x: Tensor, to_student: Tensor, state: tuple) -> tuple:
        logits = self.student(x)  # [B, C]
        accepted, conf, _ = self._decide(len(self.path_names) - 1, logits)
        return self._take(to_student & accepted, self.student_code, logits, conf, state)

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x`` [B, ...] raw input -> (prediction [B], served_by [B], confidence [B], logits [B, C])."""
        if self.variant == "cond":
            return self._forward_cond(x)
        return self._forward_where(x)

    def _forward_where(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        alive = ~self._bad(x)  # [B] samples still walking the stages
        to_student = torch.zeros_like(alive)  # [B]
        h = self.input_transform(x)
        state = None
        last = len(self.exit_stages) - 1
        k = 0
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i not in self.exit_stages:
                continue
            logits = self.heads[str(i)](h)  # [B, C]
            if state is None:
                state = self._initial_state(x, logits)
            accepted, conf, finite = self._decide(k, logits)
            take = alive & accepted
            state = self._take(take, k, logits, conf, state)
            if k == last:
                to_student = to_student | (alive & ~take)
            else:
                to_student = to_student | (alive & ~finite)
                alive = alive & ~accepted & finite
            k += 1
        return self._run_student(x, to_student, state)

    def _forward_cond(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        alive = ~self._bad(x)  # [B]
        to_student = torch.zeros_like(alive)  # [B]
        h = self.input_transform(x)
        return self._cond_from(0, 0, x, h, alive, to_student, None)

    def _cond_from(
        self,
        stage_start: int,
        k: int,
        x: Tensor,
        h: Tensor,
        alive: Tensor,
        to_student: Tensor,
        state: tuple | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Run stages from ``stage_start`` up to exit ``k``; then branch on what is pending."""
        stage_index = self.exit_stages[k]
        for i in range(stage_start, stage_index + 1):
            h = self.stages[i](h)
        logits = self.heads[str(stage_index)](h)  # [B, C]
        if state is None:
            state = self._initial_state(x, logits)
        accepted, conf, finite = self._decide(k, logits)
        take = alive & accepted
        state = self._take(take, k, logits, conf, state)
        if k == len(self.exit_stages) - 1:
            to_student = to_student | (alive & ~take)
            return self._cond_student(x, to_student, state)
        to_student = to_student | (alive & ~finite)
        alive = alive & ~accepted & finite

        def more(x, h, alive, to_student, pred, served, confidence, out_logits):
            return self._cond_from(
                stage_index + 1, k + 1, x, h, alive, to_student, (pred, served, confidence, out_logits)
            )

        def skip(x, h, alive, to_student, pred, served, confidence, out_logits):
            return self._cond_student(x, to_student, (pred, served, confidence, out_logits))

        operands = (x, h, alive, to_student, *state)
        return tuple(torch.cond(alive.any(), more, skip, operands))

    def _cond_student(self, x: Tensor, to_student: Tensor, state: tuple) -> tuple:
        def run(x, to_student, pred, served, confidence, out_logits):
            return self._run_student(x, to_student, (pred, served, confidence, out_logits))

        def done(x, to_student, pred, served, confidence, out_logits):
            return pred.clone(), served.clone(), confidence.clone(), out_logits.clone()

        return tuple(torch.cond(to_student.any(), run, done, (x, to_student, *state)))
