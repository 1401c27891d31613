"""The governor: label feedback, online risk control and the monitors, held by a FallbackModel.

>>> from fallbackformer.governance.governor import govern
>>> gov = govern(model)                       # doctest: +SKIP  (reads the bundle's signed-off references)
>>> out = model(x)                            # doctest: +SKIP  (out.signals: monitor signals)
>>> model.feedback(out.request_id, y)         # doctest: +SKIP  (delayed, sampled labels)
>>> model.observe_slices(out.request_id, ["site=a"] * len(out))   # doctest: +SKIP
>>> model.stats()["governance"]               # doctest: +SKIP

The model calls :meth:`Governor.after_answer` once per call (after the answer is formed) and
delegates ``feedback`` and ``observe_slices`` here; nothing here may raise into serving: failures
are counted (``errors``) and described (``last_error``).
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from fallbackformer.common.paths import is_fallback
from fallbackformer.monitoring.monitors import (
    ROUTING_INSTABILITY,
    MonitorConfig,
    MonitorSet,
    reference_p99_from_summary,
)
from fallbackformer.runtime.online_risk import FeedbackConfig, FeedbackResult, OnlineRiskController

__all__ = ["Governor", "govern", "signed_off_references"]


class Governor:
    """Feedback memory + online risk controller + monitors for one model.

    Args:
        model: the :class:`~fallbackformer.runtime.fallback_model.FallbackModel` governed.
        feedback: the controller's settings (``None``: defaults; ``False``: no controller).
        monitors: the monitors' settings (``None``: from the bundle's signed-off references).
    """

    def __init__(self, model: Any, feedback: FeedbackConfig | None | bool = None,
                 monitors: MonitorConfig | None = None) -> None:
        self._model = weakref.ref(model)
        cfg = feedback if isinstance(feedback, FeedbackConfig) else FeedbackConfig()
        self.controller = OnlineRiskController.for_model(model, cfg) if feedback is not False else None
        self.monitor_config = monitors or MonitorConfig(**signed_off_references(model))
        self.monitors = MonitorSet.from_config(self.monitor_config)
        self._lock = threading.Lock()
        self.errors = 0
        self.last_error = ""
        self.slice_calls = {"accepted": 0, "unknown": 0, "bad": 0}

    # ------------------------------------------------------------------ hooks the model calls

    def after_answer(self, out: Any, timings: Sequence[tuple[str, int, float]]) -> list[str]:
        """Remember the answer for feedback and feed the monitors; return the signals raised."""
        try:
            if self.controller is not None:
                self.controller.remember(out.request_id, out.prediction, out.served_by, out.confidence)
            preds = [int(p) for p in out.prediction.tolist()]
            with self._lock:
                fired = self.monitors.observe(out.served_by, preds, timings)
            if ROUTING_INSTABILITY in fired and self.monitor_config.on_instability == "rollback":
                model = self._model()
                if model is not None:
                    model.set_rollback(True)
            return fired
        except Exception as exc:  # a monitor must never break serving: count and describe
            self._error(exc)
            return []

    def feedback(self, request_id: str, label: Any, sample: int | None = None) -> FeedbackResult:
        """Delayed, sampled labels for an answer already given (see :meth:`OnlineRiskController.feedback`)."""
        if self.controller is None:
            return FeedbackResult(False, message="feedback is off for this model (govern(model, feedback=None) turns it on)")
        try:
            return self.controller.feedback(request_id, label, sample)
        except Exception as exc:
            self._error(exc)
            return FeedbackResult(False, message=self.last_error)

    def observe_slices(self, request_id: str, keys: Any) -> bool:
        """Slice keys for the samples of a remembered call; they join the slice-disparity monitor.

        Args:
            request_id: ``out.request_id``.
            keys: per sample a ``"family=value"`` string (or a list of them), or one such string
                for every sample of the call.

        Returns:
            Whether the keys were taken (False for an unknown or expired id, or malformed keys; counted).
        """
        rec = self.controller.record(request_id) if self.controller is not None else None
        if rec is None:
            self.slice_calls["unknown"] += 1
            return False
        _, served, _ = rec
        per = [keys] * len(served) if isinstance(keys, str) else list(keys)
        if len(per) != len(served):
            self.slice_calls["bad"] += 1
            return False
        pairs = []
        for who, k in zip(served, per):
            for key in [k] if isinstance(k, str) else list(k):
                if not isinstance(key, str) or "=" not in key:
                    self.slice_calls["bad"] += 1
                    return False
                pairs.append((key, is_fallback(who)))
        with self._lock:
            if self.monitors.slices is not None:
                self.monitors.slices.add(pairs)
        self.slice_calls["accepted"] += 1
        return True

    # ------------------------------------------------------------------ reading

    def stats(self) -> dict[str, Any]:
        """The controller's state, the label-free estimate and every monitor's state and alarms."""
        with self._lock:
            monitors = self.monitors.state()
        return {
            "feedback": self.controller.state() if self.controller is not None else None,
            "monitors": monitors,
            "slice_calls": dict(self.slice_calls),
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def event_state(self) -> dict[str, Any]:
        """What each event carries: the controller's lambda, error rate, labels and label-free estimate."""
        return self.controller.event_state() if self.controller is not None else {}

    def _error(self, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]


def signed_off_references(model: Any) -> dict[str, Any]:
    """MonitorConfig fields from a loaded bundle: the clean served_by mix, the profile, the max rate.

    The mix is the manifest's ``evaluation.served_by`` (measured on the clean test split, its size
    from ``evaluation.n_clean`` when present, else 360), the latency reference the model's profile as
    loaded (frozen here), the rate ``degradation.max_fallback_rate``. A model without a bundle gets
    only the latency reference (when its profile has measurements).
    """
    manifest: Mapping[str, Any] = getattr(model, "bundle_manifest", None) or {}
    ev = manifest.get("evaluation") or {}
    deg = manifest.get("degradation") or {}
    out: dict[str, Any] = {}
    mix = ev.get("served_by")
    if isinstance(mix, Mapping) and sum(mix.values()) > 0:
        out["reference_mix"] = {str(k): float(v) for k, v in mix.items()}
        out["reference_n"] = int(ev.get("n_clean", 360))
    summary = model.profile.summary()
    if summary:
        out["reference_p99_ms"] = reference_p99_from_summary(summary)
    if deg.get("max_fallback_rate") is not None:
        out["max_fallback_rate"] = float(deg["max_fallback_rate"])
    return out


def govern(model: Any, feedback: FeedbackConfig | None | bool = None, monitors: MonitorConfig | None = None,
           **monitor_overrides: Any) -> Governor:
    """Attach a :class:`Governor` to ``model`` (``model.governor``) and return it.

    Args:
        model: the model to govern.
        feedback: controller settings (``False``: none).
        monitors: monitor settings; default :func:`signed_off_references` of the model.
        monitor_overrides: fields replaced in the monitor settings (``window=500``, ``on_instability="rollback"``).
    """
    config = monitors or MonitorConfig(**signed_off_references(model))
    if monitor_overrides:
        config = dataclasses.replace(config, **monitor_overrides)
    gov = Governor(model, feedback, config)
    model.governor = gov
    return gov
