"""The calibration-drift check of ``Policy.drift_check``: a monitor on the first live gate's scores.

The first gate that can serve sees every sample the primary walks; its scores are tested against
the calibration-time sample the gate keeps (:class:`~fallbackformer.gates.drift.ScoreDriftMonitor`,
a sequential two-sample KS test). A rejection raises the signal ``calibration_drift``; the policy's
``on_drift`` says whether answers are then routed away (``"default"`` rewrites the answer here,
``"student"`` makes the runtime skip the primary from the next call) until :meth:`DriftGuard.reset`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch

from fallbackformer.gates.drift import ScoreDriftMonitor
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.output import FallbackOutput

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.policy import Policy

__all__ = ["DriftGuard"]


class DriftGuard:
    """One model's drift monitor, made on first use and remade when the policy's drift settings change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drift: tuple[tuple[Any, ...], ScoreDriftMonitor] | None = None

    def monitor(self, policy: "Policy") -> ScoreDriftMonitor | None:
        """The monitor (``None`` before the first check, or when the policy's check is off)."""
        drift = self._drift
        return drift[1] if drift is not None and policy.drift_check else None

    def routes(self, policy: "Policy") -> bool:
        """Whether a detected drift holds (``on_drift`` routes away from the primary)."""
        drift = self._drift
        return policy.drift_check and drift is not None and drift[1].drifted

    def reset(self) -> None:
        """Forget the drift state (after recalibrating the gates)."""
        with self._lock:
            self._drift = None

    def check(self, out: FallbackOutput, scores: torch.Tensor, policy: "Policy", gate: str,
              reference: torch.Tensor, default_prediction: int) -> bool:
        """Feed ``scores`` (of the gate named ``gate``, calibrated on ``reference``) to the monitor.

        Appends the signal to ``out`` when the test rejects; with ``on_drift="default"`` and a drift
        detected, every answer of ``out`` becomes the safe default (reason ``calibration_drift``).

        Returns:
            Whether the test rejected on these scores.
        """
        key = (gate, policy.drift_window, policy.drift_level, policy.drift_check_every, policy.drift_horizon)
        with self._lock:
            if self._drift is None or self._drift[0] != key:
                self._drift = (key, ScoreDriftMonitor(
                    reference, window=policy.drift_window, level=policy.drift_level,
                    check_every=policy.drift_check_every, horizon=policy.drift_horizon))
            monitor = self._drift[1]
            fired = monitor.update(scores)
            drifted = monitor.drifted
        if fired:
            out.signals.append(R.CALIBRATION_DRIFT)
        if drifted and policy.on_drift == "default":
            _to_default(out, default_prediction)
        return bool(fired)


def _to_default(out: FallbackOutput, default_prediction: int) -> None:
    """Every answer not already the default's becomes the default's, with reason ``calibration_drift``."""
    for i, who in enumerate(out.served_by):
        if who != R.DEFAULT:
            out.served_by[i] = R.DEFAULT
            out.reason[i] = R.CALIBRATION_DRIFT
    routed = torch.tensor([r == R.CALIBRATION_DRIFT for r in out.reason], device=out.prediction.device)
    with torch.inference_mode():  # (the answer's tensors are inference tensors)
        out.prediction[routed] = default_prediction
        out.confidence[routed] = float("nan")
        out.logits[routed] = float("nan")
