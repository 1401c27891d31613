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
    """

    prediction: torch.Tensor
    served_by: list[str]
    reason: list[str]
    confidence: torch.Tensor
    latency_ms: float
    logits: torch.Tensor
    request_id: str = ""
    signals: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.served_by)
