"""``ConfidenceGate``: temperature + score + threshold, calibrated with a stated guarantee.

A gate answers one question per sample: is this answer confident enough to serve? It divides the
logits by its temperature, computes a score (higher = more confident) and accepts where
``score >= threshold``. A row with a non-finite logit has confidence NaN and is never accepted; a
gate whose threshold is +inf accepts nothing.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> y = torch.randint(0, 10, (2000,), generator=g)
>>> z = 6 * torch.nn.functional.one_hot(y, 10).float() + 2 * torch.randn(2000, 10, generator=g)
>>> gate = ConfidenceGate.calibrate(z, y, alpha=0.05, delta=0.1)
>>> accepted, confidence = gate(z)
>>> accepted.dtype, confidence.shape
(torch.bool, torch.Size([2000]))
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from fallbackformer.common.jsonsafe import json_float, json_safe, parse_json_float
from fallbackformer.gates import risk_control
from fallbackformer.gates.guarantee import Guarantee, certified
from fallbackformer.gates.scores import SCORES, compute_score, is_tracing, max_softmax_fused
from fallbackformer.gates.temperature import fit_temperature

__all__ = ["ConfidenceGate", "METHODS", "reference_sample"]

METHODS = ("ltt_binom", "ltt_hb", "crc", "empirical")
_SCORE_NAMES = tuple(SCORES) + ("learned",)
REFERENCE_SIZE = 512
CONFIG_VERSION = 1


def reference_sample(scores: Tensor, size: int = REFERENCE_SIZE) -> Tensor:
    """A compact sorted sample of finite scores: all of them if few, else ``size`` quantiles.

    The quantiles are taken at the mid-points ``(i + 0.5) / size`` so the sample is an unbiased
    stand-in for the empirical distribution (for KS-type drift tests).
    """
    s = scores.detach().float().flatten()
    s = s[torch.isfinite(s)].sort().values
    if s.numel() <= size:
        return s
    q = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    return torch.quantile(s.double(), q, interpolation="nearest").float()


class ConfidenceGate(nn.Module):
    """Accept/reject decision on logits ``[B, C]`` from a calibrated confidence score.

    Args:
        temperature: ``T > 0``; the score is computed on ``logits / T``.
        threshold: accept where ``score >= threshold`` (score units); ``inf`` accepts nothing.
        score: one of ``max_softmax``, ``margin``, ``neg_entropy``, ``learned``.
        guarantee: what the calibration established (a :class:`Guarantee`, or its JSON form), or None.
        reference_scores: a compact sorted sample of calibration-time scores for drift checks.
        learned: parameters of the learned score (required when ``score == "learned"``).
    """

    temperature: Tensor
    threshold: Tensor
    reference_scores: Tensor

    def __init__(
        self,
        temperature: float = 1.0,
        threshold: float = math.inf,
        score: str = "max_softmax",
        guarantee: Guarantee | Mapping[str, Any] | None = None,
        reference_scores: Tensor | Sequence[float] | None = None,
        learned: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if score not in _SCORE_NAMES:
            raise ValueError(f"unknown score {score!r}; choose one of {list(_SCORE_NAMES)}.")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and > 0, got {temperature!r}.")
        if math.isnan(threshold):
            raise ValueError("threshold is NaN; use +inf for a gate that accepts nothing.")
        self.score = score
        self.guarantee: Guarantee | None = (
            Guarantee.from_dict(guarantee) if isinstance(guarantee, Mapping) else guarantee
        )
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        ref = torch.as_tensor(
            [] if reference_scores is None else reference_scores, dtype=torch.float32
        ).flatten()
        self.register_buffer("reference_scores", ref, persistent=False)
        self.learned_score: nn.Module | None = None
        if score == "learned":
            if learned is None:
                raise ValueError(
                    "score='learned' needs the learned score's parameters (learned=...); "
                    "build the gate with ConfidenceGate.calibrate(..., score='learned', "
                    "score_train=(logits, labels))."
                )
            from fallbackformer.gates.learned import LearnedScore

            self.learned_score = LearnedScore.from_config(learned)

    # ------------------------------------------------------------------ inference
    def confidence(self, logits: Tensor) -> Tensor:
        """The score on temperature-scaled logits: ``[B, C] -> [B]`` float; NaN for non-finite rows."""
        if logits.dim() != 2:
            raise ValueError(f"a gate expects logits [B, C], got shape {tuple(logits.shape)}.")
        temperature = self._buffers["temperature"]  # (the hot path: no nn.Module attribute lookup)
        if temperature.device != logits.device:
            temperature = temperature.to(logits.device)
        z = (logits if logits.dtype == torch.float32 else logits.float()) / temperature  # [B, C]
        if self.learned_score is not None:
            return self.learned_score(z)
        return compute_score(self.score, z)

    def accept(self, logits: Tensor) -> Tensor:
        """BoolTensor ``[B]``: finite confidence ``>= threshold``."""
        return self.forward(logits)[0]

    def forward(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(accepted [B] bool, confidence [B] float)``."""
        buffers = self._buffers  # (the serving hot path: no nn.Module attribute lookups)
        temperature, thr = buffers["temperature"], buffers["threshold"]
        if self._inline_max_softmax(logits, temperature, thr):
            # confidence() inlined: the same division and max softmax, in four kernels with the test
            conf = max_softmax_fused(logits / temperature)  # [B]
            return conf >= thr, conf  # NaN (a non-finite logit) is never >= thr
        return self._accept_and_confidence(logits, thr)

    def decide(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(accepted [B] bool, confidence [B] float, prediction [B] long)``: the runtime's call.

        The prediction is the class of the highest calibrated probability (the logits' argmax, as
        ``logits / T`` keeps the order for ``T > 0``). For the max-softmax score the confidence and the
        prediction come out of one reduction, which saves the runtime a kernel on every answer.
        """
        buffers = self._buffers
        temperature, thr = buffers["temperature"], buffers["threshold"]
        if (
            type(self).forward is ConfidenceGate.forward
            and not (self._forward_hooks or self._forward_pre_hooks)
            and self._inline_max_softmax(logits, temperature, thr)
        ):
            z = logits / temperature  # [B, C]
            conf, prediction = torch.softmax(z, dim=1).max(dim=1)  # [B], [B]
            conf = conf.add(z.amin(dim=1), alpha=0)  # NaN also on rows whose only non-finite logit is -inf
            return conf >= thr, conf, prediction
        accept, conf = self(logits)  # a subclass's forward, or the module's hooks, are honoured
        return accept, conf, logits.argmax(dim=1)

    def _inline_max_softmax(self, logits: Tensor, temperature: Tensor, thr: Tensor) -> bool:
        """Whether the max-softmax score can run inlined (eager float32 logits, buffers on their device)."""
        device = logits.device
        return (
            self.score == "max_softmax"
            and logits.dtype == torch.float32
            and logits.dim() == 2
            and logits.shape[1] >= 2
            and temperature.device == device
            and thr.device == device
            and type(self).confidence is ConfidenceGate.confidence
            and not is_tracing()
        )

    def _accept_and_confidence(self, logits: Tensor, thr: Tensor) -> tuple[Tensor, Tensor]:
        conf = self.confidence(logits)  # [B]
        if thr.device != conf.device:
            thr = thr.to(conf.device)
        if type(self).confidence is ConfidenceGate.confidence:
            # Every score here is bounded (never +-inf) and NaN exactly where a logit is not
            # finite; NaN >= threshold is False, so one comparison is "finite and >= threshold".
            return conf >= thr, conf
        return torch.isfinite(conf) & (conf >= thr), conf  # a subclass's score: no such promise

    def extra_repr(self) -> str:
        method = self.guarantee.method if self.guarantee is not None else None
        return (
            f"score={self.score!r}, temperature={float(self.temperature):.4g}, "
            f"threshold={float(self.threshold):.6g}, method={method!r}"
        )

    # ------------------------------------------------------------------ config
    def to_config(self) -> dict:
        """A JSON-able description (no tensors; inf/nan written as strings)."""
        cfg: dict[str, Any] = {
            "config_version": CONFIG_VERSION,
            "score": self.score,
            "temperature": float(self.temperature),
            "threshold": json_float(float(self.threshold)),
            "guarantee": json_safe(self.guarantee.to_dict()) if self.guarantee is not None else None,
            "reference_scores": [float(f"{v:.7g}") for v in self.reference_scores.tolist()],
        }
        if self.learned_score is not None:
            cfg["learned"] = self.learned_score.to_config()
        return cfg

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ConfidenceGate":
        """Rebuild a gate written by :meth:`to_config`."""
        version = config.get("config_version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(
                f"gate config_version {version} is not supported (expected {CONFIG_VERSION}); "
                "recalibrate the gate with this fallbackformer version."
            )
        guarantee = config.get("guarantee")
        return cls(
            temperature=float(config.get("temperature", 1.0)),
            threshold=parse_json_float(config.get("threshold", "inf")),
            score=config.get("score", "max_softmax"),
            guarantee=Guarantee.from_dict(guarantee) if guarantee is not None else None,
            reference_scores=config.get("reference_scores"),
            learned=config.get("learned"),
        )

    # ------------------------------------------------------------------ calibration
    @classmethod
    def calibrate(
        cls,
        logits: Tensor,
        labels: Tensor,
        alpha: float = 0.05,
        delta: float = 0.1,
        method: str = "ltt_binom",
        score: str = "max_softmax",
        *,
        temperature: float | None = None,
        score_train: tuple[Tensor, Tensor] | None = None,
        grid_size: int = 2000,
    ) -> "ConfidenceGate":
        """Fit the temperature and choose the threshold on a calibration split.

        Args:
            logits: ``[N, C]`` calibration logits (uncalibrated).
            labels: ``[N]`` labels.
            alpha: target selective risk (error rate among accepted answers).
            delta: allowed probability that the guarantee fails (``ltt_binom``, ``ltt_hb``).
            method: ``ltt_binom`` (default: Learn-then-Test with the exact binomial p-value,
                fixed-sequence testing: ``P(selective risk <= alpha) >= 1 - delta``), ``ltt_hb``
                (the same with the more conservative Hoeffding-Bentkus p-value), ``crc`` (conformal
                risk control: ``E[P(accepted and wrong)] <= alpha``) or ``empirical`` (no guarantee).
            score: ``max_softmax``, ``margin``, ``neg_entropy`` or ``learned``.
            temperature: use this temperature instead of fitting one on the calibration split.
            score_train: ``(logits, labels)`` of a split disjoint from calibration, used to train
                the learned score (required for ``score="learned"``).
            grid_size: size of the fixed threshold grid.

        Returns:
            A gate whose :class:`Guarantee` records alpha, delta, method, the calibration size,
            coverage, threshold and whether the bound was ``satisfied`` (with a ``reason``), and in
            ``details`` the temperature, score and test figures. When no threshold meets the bound
            the threshold is +inf (accept nothing).
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}.")
        if score not in _SCORE_NAMES:
            raise ValueError(f"unknown score {score!r}; choose one of {list(_SCORE_NAMES)}.")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}.")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {delta!r}.")
        if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"need logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}."
            )
        logits = logits.detach().cpu()  # calibration runs on the CPU; move the gate with .to() after
        labels = labels.detach().long().cpu()
        t_source = "given"
        if temperature is None:
            temperature = fit_temperature(logits, labels)
            t_source = "fitted on the calibration split"
        learned_cfg = None
        if score == "learned":
            if score_train is None:
                raise ValueError(
                    "score='learned' needs score_train=(logits, labels) from a split disjoint from "
                    "the calibration split (e.g. the validation split)."
                )
            from fallbackformer.gates.learned import LearnedScore

            tr_logits, tr_labels = score_train[0].detach().cpu(), score_train[1].detach().cpu()
            learned_cfg = LearnedScore.fit(tr_logits / temperature, tr_labels).to_config()
        gate = cls(temperature=temperature, score=score, learned=learned_cfg)
        with torch.no_grad():
            conf = gate.confidence(logits)  # [N]
            errors = logits.argmax(dim=1) != labels  # [N]
        grid = risk_control.threshold_grid(score, logits.shape[1], grid_size)
        result = risk_control.select_threshold(conf, errors, alpha=alpha, delta=delta, method=method, grid=grid)
        thr = float(result["threshold"])
        gate.threshold.fill_(thr)
        accepted = torch.isfinite(conf) & (conf >= gate.threshold)
        n_acc = int(accepted.sum())
        n_err = int((accepted & errors).sum())
        tests = {k: v for k, v in result.items() if k not in ("threshold", "satisfied", "reason", "risk", "kind")}
        gate.guarantee = certified(
            alpha=alpha, delta=delta, method=method, n=int(labels.shape[0]), threshold=thr,
            satisfied=result["satisfied"], reason=result["reason"], risk=result["risk"], kind=result["kind"],
            coverage=n_acc / max(int(labels.shape[0]), 1), selective_risk=(n_err / n_acc) if n_acc else None,
            score=score, temperature=float(gate.temperature), temperature_source=t_source, n_accepted_cal=n_acc,
            **tests,
        )
        gate.reference_scores = reference_sample(conf)
        return gate
