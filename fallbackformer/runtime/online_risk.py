"""Label feedback and online risk control on the thresholds in force.

Labels arrive late and for a sample of the traffic. :class:`OnlineRiskController` remembers the
answers it was shown (a bounded map ``request_id -> predictions, served paths, confidences``), takes
labels for them with :meth:`~OnlineRiskController.feedback`, and moves each threshold in force by the
update of adaptive conformal inference (Gibbs and Candes, 2021) in its risk-control form (rolling risk
control, Feldman et al., 2022)::

    lambda_{t+1} = lambda_t + eta * (err_t - alpha)

where ``err_t`` is 1 when the ``t``-th labelled *answered* request (not the safe default) was wrong.
The threshold is ``lambda`` itself (score units): more errors raise it, so fewer answers are served.
Since no score exceeds ``s_max`` (1 for a probability), ``lambda`` never passes ``s_max + eta`` and,
for every sequence of inputs and labels, drift included,

    (1/T) sum_t err_t <= alpha + (s_max + eta - lambda_0) / (eta * T).

Liveness: the controller steps only on answered labels, so a threshold above every score (the
gates' calibrated max-softmax saturates at exactly 1 in float32, wrong answers included, under harsh
shift) would stop answering for good. After ``probe_after`` labelled requests in a row served by the
default... more precisely: after ``probe_after`` labelled requests while a threshold stays above
``probe_threshold`` (1, above which nothing answers), it is put just below it, at
``probe_threshold - probe_step`` (a probe). The wait doubles after each probe of that threshold (it goes
back to ``probe_after`` once the threshold has stayed at or below ``probe_threshold`` for
``probe_after`` labelled requests), so a shift that lasts costs only logarithmically many probes. A probe
lowers ``lambda`` by at most ``eta + probe_step``, so each adds at most ``1 + probe_step / eta``
errors to the bound's numerator; the
probes are counted in the state.
With ``tighten_only`` (the default) ``lambda`` is clamped at the calibrated threshold from below;
the clamp only removes errors, so the bound still holds (the controller never serves more than
calibration certified). Targets: the router's one ``threshold`` when a router decides, else each
gate's (an answer updates the gate of the path that served it). The buffers are updated in place,
so ``ff.save`` and ONNX export snapshot the thresholds in force.

Without labels, :meth:`label_free_accuracy` estimates the accuracy of the answered requests over the
last ``window`` answers as the **mean calibrated confidence of the answered requests** (the
"average confidence" estimator; Garg et al. 2022 compare it with ATC).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fallbackformer.runtime import reasons as R

__all__ = ["FeedbackConfig", "OnlineRiskController", "FeedbackResult"]


@dataclass
class FeedbackConfig:
    """Settings of the online risk controller.

    Attributes:
        alpha: the target error rate among answered requests; ``None`` takes each target's certified
            ``alpha`` (the router's, or each gate's guarantee).
        eta: step size (score units); larger adapts faster with a larger transient.
        probe_after: labelled requests after which a threshold that stayed above ``probe_threshold``
            all along is lowered to ``probe_threshold - probe_step`` (0: never probe).
        probe_threshold: the score above which nothing answers (1 for probabilities).
        probe_step: how far below ``probe_threshold`` a probe puts a threshold.
        tighten_only: never lower a threshold below its calibrated value (the policy must say
            otherwise explicitly: ``False`` lets the controller loosen it when answers are right).
        capacity: answered requests remembered for feedback (older ids expire).
        window: answers in the rolling window of the label-free estimate and the windowed error.
    """

    alpha: float | None = None
    eta: float = 0.1
    probe_after: int = 200
    probe_threshold: float = 1.0
    probe_step: float = 0.01
    tighten_only: bool = True
    capacity: int = 20000
    window: int = 500

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 < self.alpha < 1.0:
            raise ValueError(f"FeedbackConfig.alpha={self.alpha!r}; use a rate in (0, 1) or None for the certified alpha")
        if not self.eta > 0:
            raise ValueError(f"FeedbackConfig.eta={self.eta!r}; use a step > 0 (e.g. 0.1)")
        for name in ("capacity", "window", "probe_after"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "probe_after" else 1):
                raise ValueError(f"FeedbackConfig.{name}={v!r}; use an int >= 1 (probe_after: >= 0)")


@dataclass
class FeedbackResult:
    """What one :meth:`OnlineRiskController.feedback` call did."""

    accepted: bool
    labelled: int = 0
    answered: int = 0
    errors: int = 0
    message: str = ""


class _Target:
    """One threshold buffer and its ACI state."""

    def __init__(self, name: str, buffer: torch.Tensor, alpha: float) -> None:
        self.name, self.buffer, self.alpha = name, buffer, float(alpha)
        self.calibrated = float(buffer)
        self.lam = self.calibrated
        self.n = 0
        self.errors = 0
        self.above = 0  # labelled requests since the threshold rose above the probe threshold
        self.below = 0  # labelled requests since it last came back to or below it
        self.wait = 0  # labelled requests above it before the next probe (0: not yet set)

    def state(self) -> dict[str, Any]:
        return {"lambda": self.lam, "calibrated": self.calibrated, "alpha": self.alpha, "n_labels": self.n,
                "error_rate": self.errors / self.n if self.n else None}


class OnlineRiskController:
    """Takes delayed labels and adapts the thresholds in force (see the module docstring).

    Args:
        thresholds: ``{target name: threshold buffer}`` (the router's ``{"router": buf}``, or one per gate).
        alphas: ``{target name: certified alpha}`` (overridden by ``config.alpha``).
        config: the controller's settings.
        routed: ``True`` when one router threshold decides every answer (every answered label updates
            it); else an answer updates the gate of the path that served it.

    >>> ctl = OnlineRiskController.for_model(model)     # doctest: +SKIP
    >>> out = model(x); ctl.remember(out)                # doctest: +SKIP
    >>> ctl.feedback(out.request_id, y)                  # doctest: +SKIP
    """

    def __init__(self, thresholds: Mapping[str, torch.Tensor], alphas: Mapping[str, float | None],
                 config: FeedbackConfig | None = None, routed: bool = False) -> None:
        self.config = config or FeedbackConfig()
        self.routed = routed
        self.targets: dict[str, _Target] = {}
        for name, buf in thresholds.items():
            alpha = self.config.alpha if self.config.alpha is not None else alphas.get(name)
            if alpha is None or not 0.0 < float(alpha) < 1.0:
                raise ValueError(f"no alpha for threshold {name!r} (its guarantee has {alpha!r}); "
                                 "set FeedbackConfig(alpha=...) or calibrate it with an alpha")
            self.targets[name] = _Target(name, buf, float(alpha))
        self._records: OrderedDict[str, tuple[list[int], tuple[str, ...], list[float], list[bool]]] = OrderedDict()
        self._lock = threading.Lock()
        self._conf: deque[float] = deque(maxlen=self.config.window)  # answered confidences (label-free)
        self._recent_err: deque[int] = deque(maxlen=self.config.window)  # labelled answered: wrong?
        self.counts = {"remembered": 0, "expired": 0, "unknown": 0, "duplicate": 0, "bad_label": 0,
                       "labels": 0, "labelled_answered": 0, "labelled_errors": 0, "probes": 0}
        self.last_message = ""

    @classmethod
    def for_model(cls, model: Any, config: FeedbackConfig | None = None) -> "OnlineRiskController":
        """The controller on ``model``'s thresholds in force: its router's, else each live gate's."""
        router = getattr(model, "router", None)
        if router is not None:
            alpha = router.guarantee.alpha if router.guarantee is not None else None
            return cls({"router": router.threshold}, {"router": alpha}, config, True)
        thresholds, alphas = {}, {}
        for name in model.path_names:
            gate = model.gates[name]
            if math.isinf(float(gate.threshold)):
                continue  # a gate that accepts nothing never answers: nothing to control
            thresholds[name] = gate.threshold
            alphas[name] = gate.guarantee.alpha if gate.guarantee is not None else None
        return cls(thresholds, alphas, config, False)

    # ------------------------------------------------------------------ serving side

    def remember(self, request_id: str, prediction: torch.Tensor, served_by: Sequence[str],
                 confidence: torch.Tensor) -> None:
        """Keep an answer for later feedback and feed the label-free estimate (never raises on content)."""
        preds = [int(p) for p in prediction.tolist()]
        conf = [float(c) for c in confidence.tolist()]
        served = tuple(served_by)
        with self._lock:
            self._records[request_id] = (preds, served, conf, [False] * len(preds))
            self.counts["remembered"] += 1
            while len(self._records) > self.config.capacity:
                self._records.popitem(last=False)
                self.counts["expired"] += 1
            for who, c in zip(served, conf):
                if who != R.DEFAULT and c == c:
                    self._conf.append(c)

    def record(self, request_id: str) -> tuple[list[int], tuple[str, ...], list[float]] | None:
        """The remembered ``(predictions, served_by, confidences)`` of a request, or ``None``."""
        with self._lock:
            rec = self._records.get(request_id)
            return None if rec is None else (rec[0], rec[1], rec[2])

    # ------------------------------------------------------------------ feedback

    def feedback(self, request_id: str, label: Any, sample: int | None = None) -> FeedbackResult:
        """Take labels for a remembered answer; unknown/expired ids are counted and ignored.

        Args:
            request_id: ``out.request_id`` of the call.
            label: one class index (with ``sample``, or for a one-sample call), or one per sample
                (a sequence or tensor; ``None`` or a negative entry: not labelled).
            sample: the sample index within the call that ``label`` belongs to.

        Returns:
            A :class:`FeedbackResult`; ``accepted`` is False with a ``message`` saying why.
        """
        with self._lock:
            rec = self._records.get(request_id)
            if rec is None:
                self.counts["unknown"] += 1
                return self._refuse(f"feedback for unknown or expired request_id {request_id!r} ignored: "
                                    f"only the last {self.config.capacity} requests are remembered "
                                    "(raise FeedbackConfig.capacity to accept later labels)")
            preds, served, conf, done = rec
            labels = _per_sample(label, sample, len(preds))
            if labels is None:
                self.counts["bad_label"] += 1
                return self._refuse(f"label {label!r} for request {request_id!r} ({len(preds)} samples) ignored: "
                                    "pass one int per sample, or an int with sample=<index>")
            result = FeedbackResult(True)
            for i, y in labels:
                if done[i]:
                    self.counts["duplicate"] += 1
                    continue
                done[i] = True
                result.labelled += 1
                self.counts["labels"] += 1
                who = served[i]
                if self.config.probe_after:
                    self._probe()
                if who == R.DEFAULT:
                    continue  # not an answer: the risk among answered is unaffected
                err = int(preds[i] != y)
                result.answered += 1
                result.errors += err
                self.counts["labelled_answered"] += 1
                self.counts["labelled_errors"] += err
                self._recent_err.append(err)
                target = self.targets.get("router" if self.routed else who)
                if target is not None:
                    self._step(target, err)
            return result

    def _refuse(self, message: str) -> FeedbackResult:
        self.last_message = message
        return FeedbackResult(False, message=message)

    def _step(self, t: _Target, err: int) -> None:
        """One ACI step on target ``t``; the buffer is written in place."""
        t.n += 1
        t.errors += err
        lam = t.lam + self.config.eta * (err - t.alpha)
        if self.config.tighten_only:
            lam = max(lam, t.calibrated)
        t.lam = lam
        with torch.no_grad():
            t.buffer.fill_(lam)

    def _probe(self) -> None:
        """Count a labelled request for each threshold; probe those above the probe threshold long enough."""
        cfg = self.config
        for t in self.targets.values():
            if not t.wait:
                t.wait = cfg.probe_after
            if t.lam <= max(cfg.probe_threshold, t.calibrated):
                t.above = 0
                t.below += 1
                if t.below >= cfg.probe_after:
                    t.wait = cfg.probe_after  # recovered: probes are cheap again
                continue
            t.below = 0
            t.above += 1
            if t.above >= t.wait:
                floor = max(cfg.probe_threshold - cfg.probe_step, t.calibrated)
                t.lam, t.above, t.wait = floor, 0, 2 * t.wait
                self.counts["probes"] += 1
                with torch.no_grad():
                    t.buffer.fill_(floor)

    def reset(self) -> None:
        """Put every threshold back to its calibrated value and forget the controller's state."""
        with self._lock:
            for t in self.targets.values():
                t.lam, t.n, t.errors = t.calibrated, 0, 0
                with torch.no_grad():
                    t.buffer.fill_(t.calibrated)
            self._recent_err.clear()

    # ------------------------------------------------------------------ reading

    def label_free_accuracy(self) -> float | None:
        """Mean calibrated confidence of the answered requests in the window (``None`` before any)."""
        with self._lock:
            return sum(self._conf) / len(self._conf) if self._conf else None

    def state(self) -> dict[str, Any]:
        """The controller's state: per target lambda, error rate and labels, plus the counts."""
        with self._lock:
            n, e = self.counts["labelled_answered"], self.counts["labelled_errors"]
            recent = list(self._recent_err)
            conf = list(self._conf)
            return {
                "targets": {k: t.state() for k, t in self.targets.items()},
                "n_labels": self.counts["labels"],
                "error_rate": e / n if n else None,
                "window_error_rate": sum(recent) / len(recent) if recent else None,
                "label_free_accuracy": sum(conf) / len(conf) if conf else None,
                "label_free_method": "mean calibrated confidence of answered requests",
                "counts": dict(self.counts),
                "last_message": self.last_message,
                "config": asdict(self.config),
            }

    def event_state(self) -> dict[str, Any]:
        """A compact state for events: lambda per target, error rate, labels, label-free estimate."""
        with self._lock:
            n, e = self.counts["labelled_answered"], self.counts["labelled_errors"]
            conf = self._conf
            return {"lambda": {k: t.lam for k, t in self.targets.items()},
                    "error_rate": e / n if n else None, "n_labels": self.counts["labels"],
                    "label_free_accuracy": sum(conf) / len(conf) if conf else None}


def _per_sample(label: Any, sample: int | None, b: int) -> list[tuple[int, int]] | None:
    """``[(sample index, label)]`` from the forms :meth:`OnlineRiskController.feedback` takes, or None if malformed."""
    if isinstance(label, torch.Tensor):
        label = label.tolist()
    if sample is not None:
        if isinstance(label, (list, tuple)) or not isinstance(sample, int) or not 0 <= sample < b:
            return None
        label = {sample: label}
    elif not isinstance(label, (list, tuple, Mapping)):
        if b != 1:
            return None
        label = [label]
    items = label.items() if isinstance(label, Mapping) else enumerate(label)
    if not isinstance(label, Mapping) and len(label) != b:
        return None
    out = []
    for i, y in items:
        if y is None:
            continue
        if isinstance(y, bool) or not isinstance(y, int) or not isinstance(i, int) or not 0 <= i < b:
            return None
        if y >= 0:
            out.append((i, y))
    return out
