"""What an evaluation produces: the :class:`Evaluation` mapping, the per-sample :class:`PathArrays`, set
names (``"clean"`` and ``"<corruption>/<severity>"``). Reports write JSON with
:func:`fallbackformer.common.jsonsafe.json_safe`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["CLEAN", "Evaluation", "PathArrays", "split_set_key"]

CLEAN = "clean"


def split_set_key(key: str) -> tuple[str, int] | None:
    """``"fog/3" -> ("fog", 3)``; ``None`` for a key that names no corruption and severity (``"clean"``)."""
    name, sep, sev = key.rpartition("/")
    return (name, int(sev)) if sep and sev.isdigit() else None


@dataclass
class PathArrays:
    """Per-sample arrays of one path on one set (kept for figures).

    Attributes:
        confidence: the ranking ``[N]`` for AURC, AUROC and risk-coverage: a path's gate
            ``confidence(logits)``; the system's ``FallbackOutput.confidence``; ``-inf`` where non-finite
            (unanswered requests rank last).
        probability: calibrated max softmax ``[N]`` (reliability diagrams); ``nan`` where undefined.
        correct: ``[N]`` bool.
        accepted: ``[N]`` bool, what the gate accepts alone (``system``: answered, ``prediction >= 0``).
    """

    confidence: Tensor
    probability: Tensor
    correct: Tensor
    accepted: Tensor


@dataclass
class Evaluation(Mapping[str, dict[str, Any]]):
    """The result of :func:`fallbackformer.evaluation.shift_eval.evaluate`; a read-only mapping
    ``set name -> metrics``.

    Attributes:
        per_set: ``{"clean" | "<corruption>/<severity>": metrics}`` (JSON-able).
        summary: metrics across sets (:func:`~fallbackformer.evaluation.shift_summary.summarize`):
            ``silent_error``, ``useful``, ``guarantee_held_*``, ``mce``, ``relative_drop``, ...
        paths: the path names, ``["exit_1", ..., "primary", "student"]``.
        flops: :func:`~fallbackformer.evaluation.cost_eval.path_flops` of the model.
        stage_latency_ms: :func:`~fallbackformer.evaluation.cost_eval.measure_stage_latency` of the model.
        budget_sweep: :func:`~fallbackformer.evaluation.cost_eval.budget_sweep` result (``None`` if not run).
        arrays: ``{set: {path or "system": PathArrays}}``.
        gates: ``{path: {"alpha", "delta", "method", "threshold", "temperature", "score"}}``.
        held_out: corruption names that were never used for tuning.
        config: the evaluation settings.
        drift: the calibration-drift study (:func:`fallbackformer.evaluation.drift_eval.drift_study`),
            ``None`` when not run.
        certificate: what certifies the system's answers
            (:func:`~fallbackformer.evaluation.guarantee_eval.serving_certificate`).
    """

    per_set: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    paths: list[str]
    flops: dict[str, Any]
    stage_latency_ms: dict[str, float]
    budget_sweep: dict[str, Any] | None
    arrays: dict[str, dict[str, PathArrays]] = field(repr=False)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    held_out: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, Any] | None = None
    certificate: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.per_set[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.per_set)

    def __len__(self) -> int:
        return len(self.per_set)

    def to_json(self) -> dict[str, Any]:
        """The ``report.json`` content: one entry per set, plus ``summary`` and ``meta``."""
        out: dict[str, Any] = dict(self.per_set)
        out["summary"] = self.summary
        if self.drift is not None:
            out["drift"] = self.drift
        out["meta"] = {
            "paths": self.paths,
            "flops": self.flops,
            "stage_latency_ms": self.stage_latency_ms,
            "budget_sweep": self.budget_sweep,
            "gates": self.gates,
            "certificate": self.certificate,
            "held_out": self.held_out,
            "config": self.config,
        }
        return out
