"""The combined model as one traceable ``nn.Module``: what ONNX and ``torch.export`` receive.

:class:`CombinedGraph` wraps the model's decision module
(:class:`~fallbackformer.runtime.decisions.Decisions`: the primary's input transform, every stage and
exit head, every gate or the router, the student) with the input check and the safe default, and
returns fixed tensors instead of a :class:`~fallbackformer.runtime.output.FallbackOutput`:

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
live in :class:`~fallbackformer.runtime.fallback_model.FallbackModel`. A ladder's model rungs (tree
and linear rungs, further students) and its agreement veto are in the graph, each rung with its own
``served_by`` code; the response cache and a callable default stay in the runtime (the export warns
and says which), and the graph's default is the typed default's single class or ``-1``.

Two variants:

- ``"where"``: the decision module's own whole-batch forward: every stage and the student run on
  the whole batch; ``torch.where`` selects per sample. One straight graph, the same work whatever
  the input. The only variant that carries a router.
- ``"cond"``: the same per-sample selection, but each segment of stages between two exits sits in
  a ``torch.cond`` (an ONNX ``If``) that runs it only while some sample of the batch is still
  pending, and the student runs only when some sample needs it. Once the whole batch has exited,
  the remaining segments are skipped (they return zeros that no pending sample can take).
"""

from __future__ import annotations

import warnings

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fallbackformer.common.paths import DEFAULT, served_by_codes  # the code table: codes[i] names code i
from fallbackformer.runtime.decisions import Answer, initial_answer, take

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.fallback_model import FallbackModel

__all__ = ["DEFAULT", "OUTPUT_NAMES", "VARIANTS", "CombinedGraph", "served_by_codes"]

VARIANTS = ("where", "cond")
OUTPUT_NAMES = ("prediction", "served_by", "confidence", "logits")


def default_class_of(model: "FallbackModel") -> int:
    """The safe default's class in a graph: the typed default's single class (``-1`` where it abstains or
    answers a set)."""
    from fallbackformer.rungs.defaults import ConstantClass, Prior

    default = model.runtime.default
    if isinstance(default, (ConstantClass, Prior)):
        return int(default.class_index)
    if default is not None:
        return -1
    return -1 if model.policy.default_class is None else int(model.policy.default_class)


def runtime_only_parts(model: "FallbackModel") -> list[str]:
    """What of the ladder a graph cannot carry: the response cache (state), a user's callable default
    (Python), a coarse default's sets and a prior's confidence (the graph answers -1 / the class, NaN)."""
    from fallbackformer.rungs.defaults import Coarse, Prior

    parts = []
    if model.cache is not None:
        parts.append("the response cache")
    default = model.runtime.default
    if isinstance(default, Coarse):
        parts.append("the coarse default's prediction sets")
    elif isinstance(default, Prior):
        parts.append("the prior default's confidence")
    elif default is not None and default.kind == "callable":
        parts.append(f"the callable default {default.name!r}")
    return parts


def _cond(pred: Tensor, true_fn, false_fn, operands: tuple):
    """``torch.cond`` while tracing (export: an ONNX ``If``); a plain Python branch in eager mode.

    Eager ``torch.cond`` compiles its branches with dynamo on every new shape, which is slow and
    buys nothing outside a trace.
    """
    if torch.compiler.is_compiling():
        return torch.cond(pred, true_fn, false_fn, operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


class CombinedGraph(nn.Module):
    """A :class:`FallbackModel`'s decisions as one traceable graph (see the module docstring).

    Shares (does not copy) the model's decision module.

    Args:
        model: the model to mirror.
        variant: ``"where"`` (per-sample selection, everything runs) or ``"cond"`` (per-sample
            selection, and ``torch.cond`` skips the later stages once nothing is pending).
        example_input: a raw batch, for the ``"cond"`` variant to learn the stages' output shapes
            (default: from the model's input spec).
    """

    def __init__(
        self, model: "FallbackModel", variant: str = "where", example_input: Tensor | None = None
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
        self.variant = variant
        self.decisions = model.decisions
        self.path_names: list[str] = list(model.path_names)
        self.exit_stages: list[int] = list(model.primary.exit_stages)
        if model.router is not None and variant != "where":
            raise ValueError(f"variant {variant!r} does not carry a router yet; export a routed model with "
                             "variant='where' (the student and every stage run, the router selects per sample)")
        if model.decisions.rungs and variant != "where":
            raise ValueError(f"variant {variant!r} does not carry the ladder's rungs {list(model.decisions.rungs)}; "
                             "export it with variant='where' (every rung runs, Where selects per sample)")
        runtime_only = runtime_only_parts(model)
        if runtime_only:
            warnings.warn(f"the exported graph leaves out {', '.join(runtime_only)}: they run in the runtime only "
                          "(a graph holds no state and no Python); the graph's default is the class "
                          f"{default_class_of(model)} (-1: abstain)", UserWarning, stacklevel=2)
        self.codes = served_by_codes(self.path_names)
        self.default_code = len(self.codes) - 1
        self.student_code = len(self.codes) - 2
        self.default_prediction = default_class_of(model)
        spec = model.input_spec
        if spec is not None and spec.value_range is not None:
            lo, hi = spec.value_range
            tol = 1e-3 * (hi - lo)
            self.value_range: tuple[float, float] | None = (float(lo - tol), float(hi + tol))
        else:
            self.value_range = None
        self.segment_shapes: list[tuple[tuple[int, ...], int]] | None = None
        if variant == "cond":
            if example_input is None and spec is not None:
                from fallbackformer.export.onnx_export import example_input as make_example

                example_input = make_example(model, batch=2)
            if example_input is not None:
                was_training = self.training
                self.eval()
                self.segment_shapes = self._probe_shapes(example_input)
                self.train(was_training)

    def _bad(self, x: Tensor) -> Tensor:
        """Per-sample invalid input, as ``runtime.validation.bad_samples``. BoolTensor [B]."""
        flat = x.reshape(x.shape[0], -1)  # [B, D]
        bad = ~torch.isfinite(flat).all(dim=1)  # [B]
        if self.value_range is not None:
            lo, hi = self.value_range
            bad = bad | (flat < lo).any(dim=1) | (flat > hi).any(dim=1)
        return bad

    def forward(self, x: Tensor) -> Answer:
        """``x`` [B, ...] raw input -> (prediction [B], served_by [B], confidence [B], logits [B, C])."""
        alive = ~self._bad(x)  # [B] samples still walking the stages; invalid ones get the default
        if self.variant == "cond":
            return self._forward_cond(x, alive)
        return self.decisions(x, alive, self.default_prediction)

    def _forward_cond(self, x: Tensor, alive: Tensor) -> Answer:
        # A flat sequence of conds (one per segment of stages between exits, one for the student),
        # not a nested tree: each branch is traced once. A skipped segment returns zeros of the
        # segment's output shapes; nothing is pending then, so no later exit can take those zeros.
        if self.segment_shapes is None:
            raise RuntimeError(
                "the 'cond' variant needs the stage output shapes; build CombinedGraph(model, "
                "'cond', example_input=x) or give the model an input_spec"
            )
        decisions = self.decisions
        to_student = torch.zeros_like(alive)  # [B]
        h = decisions.primary.input_transform(x)
        answer = None
        last = len(self.exit_stages) - 1
        for k in range(len(self.exit_stages)):
            if k == 0:
                h, logits = self._segment(0, h)
            else:
                h, logits = _cond(
                    alive.any(), self._segment_fn(k, run=True), self._segment_fn(k, run=False), (h,)
                )
            if answer is None:
                answer = initial_answer(x, logits, self.default_code, self.default_prediction)
            alive, to_student, answer = decisions.after_exit(k, k == last, logits, alive, to_student, answer)
        c_student = self.segment_shapes[-1][1]

        def run_student(x: Tensor) -> Tensor:
            return decisions.student(x).float()

        def skip_student(x: Tensor) -> Tensor:
            return torch.zeros((x.shape[0], c_student), dtype=torch.float32, device=x.device)

        logits = _cond(to_student.any(), run_student, skip_student, (x,))  # [B, C]
        accepted, conf, _ = decisions.gate_decision(self.student_code, logits)
        return take(to_student & accepted, self.student_code, logits, conf, answer)

    def _segment(self, k: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """Stages after exit ``k-1`` up to exit ``k``, and exit ``k``'s head: (features, logits [B, C])."""
        primary = self.decisions.primary
        start = 0 if k == 0 else self.exit_stages[k - 1] + 1
        stop = self.exit_stages[k]
        for i in range(start, stop + 1):
            h = primary.stages[i](h)
        return h, primary.head(stop)(h).float()

    def _segment_fn(self, k: int, run: bool):
        feat_shape, c = self.segment_shapes[k]

        def run_segment(h: Tensor) -> tuple[Tensor, Tensor]:
            return self._segment(k, h)

        def skip_segment(h: Tensor) -> tuple[Tensor, Tensor]:
            b = h.shape[0]
            return (
                torch.zeros((b, *feat_shape), dtype=h.dtype, device=h.device),
                torch.zeros((b, c), dtype=torch.float32, device=h.device),
            )

        return run_segment if run else skip_segment

    @torch.no_grad()
    def _probe_shapes(self, x: Tensor) -> list[tuple[tuple[int, ...], int]]:
        """Per exit: (feature shape without batch, number of classes); last entry: the student's."""
        shapes = []
        h = self.decisions.primary.input_transform(x)
        for k in range(len(self.exit_stages)):
            h, logits = self._segment(k, h)
            shapes.append((tuple(h.shape[1:]), int(logits.shape[1])))
        shapes.append(((), int(self.decisions.student(x).shape[1])))
        return shapes
