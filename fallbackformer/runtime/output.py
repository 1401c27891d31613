"""FallbackOutput: what every call returns, per sample: the answer, who served it and why."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FallbackOutput:
    """The answer of one :class:`FallbackModel` call.

    Attributes:
        prediction: LongTensor [B]; the safe default's class, or -1 where the default abstains.
        served_by: per sample, ``"exit_<i>"``, ``"primary"``, ``"student"`` or ``"default"``.
        reason: per sample, ``""`` when served by the primary or an exit, else a reason of
            :mod:`fallbackformer.runtime.reasons`.
        confidence: FloatTensor [B], the calibrated score of the path that served (NaN for the default).
        latency_ms: wall time of the call.
        logits: FloatTensor [B, C], raw logits of the path that served (NaN rows for the default).
        request_id: the id shared by this call's events.
        signals: named runtime signals raised by this call (for example ``"calibration_drift"``).
        prediction_set: BoolTensor [B, C], the classes each answer leaves possible: the predicted
            class, every class for an abstention, a group of classes for a coarse default (whose
            ``prediction`` is -1). Derived from ``prediction`` unless a typed default set it.
    """

    prediction: torch.Tensor
    served_by: list[str]
    reason: list[str]
    confidence: torch.Tensor
    latency_ms: float
    logits: torch.Tensor
    request_id: str = ""
    signals: list[str] = field(default_factory=list)
    _prediction_set: torch.Tensor | None = field(default=None, repr=False)

    @property
    def prediction_set(self) -> torch.Tensor:
        if self._prediction_set is not None:
            return self._prediction_set
        return sets_of(self.prediction, self.logits.shape[1])

    @prediction_set.setter
    def prediction_set(self, sets: torch.Tensor) -> None:
        if sets.dtype != torch.bool or tuple(sets.shape) != (len(self), self.logits.shape[1]):
            raise ValueError(f"prediction_set must be a bool tensor [{len(self)}, {self.logits.shape[1]}]; "
                             f"got {sets.dtype} {tuple(sets.shape)}")
        self._prediction_set = sets

    def __len__(self) -> int:
        return len(self.served_by)


def sets_of(prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
    """BoolTensor [B, C]: the predicted class of each row, every class where it is -1."""
    answered = prediction >= 0
    sets = torch.zeros(prediction.shape[0], num_classes, dtype=torch.bool, device=prediction.device)
    sets[answered, prediction[answered]] = True
    sets[~answered] = True
    return sets
