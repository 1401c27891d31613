"""The router: a post-hoc deferral rule over the evidence, with one certified threshold.

Confidence deferral (each path's own softmax against a threshold) fails under distribution shift
and when the fallback is the specialist (Jitkrittum et al., NeurIPS 2023). The router instead reads
the :class:`~fallbackformer.gates.evidence.Evidence` (every exit reached, the student, their
agreement, a feature-space score) and estimates, per sample, the probability that each candidate
answer is right. It decides, in the order the runtime meets them:

1. after each early exit ``k``: answer with exit ``k`` when ``p_k >= max(threshold, exit_floor)``
   (``exit_floor``, fixed before calibration: an early answer must be very likely right, so that
   under shift the samples an exit is unsure of reach the primary and the student);
2. after the primary's final head: answer with whichever of the primary and the student is more
   likely right, when that probability is ``>= threshold`` (the student answers with reason
   ``router_preferred``); otherwise the safe default (``low_confidence``);
3. when the primary could not finish (deadline, error, breaker): the student when
   ``p_student_alone >= threshold``, else the default.

Each ``p`` comes from a small scorer (one hidden layer) trained on a split disjoint from calibration
(validation images, clean and under the tunable corruptions). One ``threshold`` is shared by every
decision, and Learn-then-Test certifies it (:func:`fallbackformer.gates.router_calibration.certify`)
on a calibration split drawn i.i.d. from a stated mixture (clean, or one tunable corruption at a
random severity). The guarantee names that mixture; it says nothing about other shifts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fallbackformer.common.jsonsafe import json_float, json_safe, parse_json_float
from fallbackformer.gates.evidence import Evidence, MahalanobisScore, feature_width, path_features, pool_features
from fallbackformer.gates.guarantee import Guarantee

__all__ = ["Router", "Scorer", "ROUTER_CONFIG_VERSION"]

ROUTER_CONFIG_VERSION = 1


class Scorer(nn.Module):
    """``P(this answer is right | features)``: standardisation, one hidden layer, a sigmoid.

    Args:
        width: number of input features.
        hidden: hidden units (0: logistic regression).
    """

    def __init__(self, width: int, hidden: int = 16) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.net = (nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if hidden
                    else nn.Sequential(nn.Linear(width, 1)))

    def forward(self, features: Tensor) -> Tensor:  # [B, F] -> [B] probability
        z = (features - self.mean) / self.std
        return torch.sigmoid(self.net(z).squeeze(1))

    def fit(self, features: Tensor, correct: Tensor, weight_decay: float = 1e-4, max_iter: int = 300,
            seed: int = 0) -> "Scorer":
        """Fit by L-BFGS on the binary cross-entropy of ``correct`` (bool ``[N]``). Non-finite rows are skipped."""
        keep = torch.isfinite(features).all(1)
        x, y = features[keep].float(), correct[keep].float()
        if x.shape[0] < 2 or bool((y == y[0]).all()):
            raise ValueError(f"a scorer needs both right and wrong examples; got {int(y.sum())} right of "
                             f"{x.shape[0]}. Fit the router on more (or harder) data")
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))
        gen = torch.Generator().manual_seed(seed)
        for p in self.net.parameters():  # a seeded initialisation, independent of the global RNG
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(p.shape[-1])) if p.dim() > 1
                        else torch.zeros_like(p))
        z = (x - self.mean) / self.std
        opt = torch.optim.LBFGS(self.net.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(self.net(z).squeeze(1), y)
            loss = loss + weight_decay * sum((p ** 2).sum() for p in self.net.parameters() if p.dim() > 1)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return self


class Router(nn.Module):
    """Per-sample routing among the exits, the primary, the student and the default.

    Args:
        num_exits: heads of the primary, the final one included (``E``).
        num_classes: C.
        feature_dims: per head, the pooled width of the stage output it reads (for the feature scores).
        hidden: hidden units of each scorer.
        exit_floor: an early exit answers only when ``p_k`` also reaches this (0: the threshold alone).

    The scorers are keyed ``"0" .. "E-1"`` (exit ``k``; ``E-1`` is the primary), ``"student"`` and
    ``"student_alone"``. ``threshold`` (a buffer, +inf until certified) is shared by every decision.
    """

    def __init__(self, num_exits: int, num_classes: int, feature_dims: Sequence[int], hidden: int = 16,
                 exit_floor: float = 0.0) -> None:
        super().__init__()
        if len(feature_dims) != num_exits:
            raise ValueError(f"feature_dims has {len(feature_dims)} entries; expected one per head ({num_exits})")
        self.num_exits = int(num_exits)
        self.num_classes = int(num_classes)
        self.feature_dims = [int(d) for d in feature_dims]
        self.hidden = int(hidden)
        if not 0.0 <= exit_floor <= 1.0:
            raise ValueError(f"exit_floor={exit_floor} must lie in [0, 1] (a probability that an early answer is right)")
        self.exit_floor = float(exit_floor)
        self.feature_scores = nn.ModuleList(MahalanobisScore.empty(num_classes, d) for d in self.feature_dims)
        positions: list[int | str] = [*range(num_exits), "student", "student_alone"]
        self.scorers = nn.ModuleDict({str(p): Scorer(feature_width(p, num_exits), hidden) for p in positions})
        self.register_buffer("threshold", torch.tensor(math.inf))
        self.guarantee: Guarantee | None = None  # set by router_calibration.certify

    # ------------------------------------------------------------------ decisions

    def exit_probability(self, evidence: Evidence, k: int) -> Tensor:
        """``P(exit k is right)`` ``[B]`` from the evidence up to exit ``k`` (NaN where not finite)."""
        return self.scorers[str(k)](path_features(evidence, k))

    def decide_exit(self, evidence: Evidence, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """At early exit ``k``: ``(accept [B] bool, confidence [B], prediction [B])``."""
        p = self.exit_probability(evidence, k)
        return (p >= self.threshold) & (p >= self.exit_floor), p, evidence.exit_logits[k].argmax(-1)

    def decide_final(self, evidence: Evidence) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """After the final head: ``(accept, use_student, confidence, prediction)``, each ``[B]``.

        ``use_student`` marks the rows where the student is judged more likely right than the primary
        (ties go to the primary). NaN probabilities are never accepted.
        """
        last = self.num_exits - 1
        p_primary = torch.nan_to_num(self.exit_probability(evidence, last), nan=-1.0)
        p_student = torch.nan_to_num(self.scorers["student"](path_features(evidence, "student")), nan=-1.0)
        use_student = p_student > p_primary
        conf = torch.where(use_student, p_student, p_primary)
        pred = torch.where(use_student, evidence.student_logits.argmax(-1), evidence.exit_logits[last].argmax(-1))
        return conf >= self.threshold, use_student, conf, pred

    def decide_student_alone(self, student_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The primary could not finish: ``(accept, confidence, prediction)`` from the student alone."""
        p = self.scorers["student_alone"](path_features(Evidence(student_logits=student_logits), "student_alone"))
        return p >= self.threshold, p, student_logits.argmax(-1)

    # ------------------------------------------------------------------ fitting

    @torch.no_grad()
    def fit(self, evidence: Evidence, labels: Tensor, seed: int = 0) -> "Router":
        """Train every scorer on full evidence (every exit and the student) with labels ``[N]``.

        Use data disjoint from calibration (the validation split, clean and shifted). The feature
        scores must be fitted first (:meth:`fit_feature_scores`).
        """
        for k in range(self.num_exits):
            self.scorers[str(k)].fit(path_features(evidence, k), evidence.exit_logits[k].argmax(-1) == labels, seed=seed)
        s_right = evidence.student_logits.argmax(-1) == labels
        self.scorers["student"].fit(path_features(evidence, "student"), s_right, seed=seed)
        self.scorers["student_alone"].fit(path_features(evidence, "student_alone"), s_right, seed=seed)
        return self

    @torch.no_grad()
    def fit_feature_scores(self, stage_features: Sequence[Tensor], labels: Tensor) -> "Router":
        """Fit each head's :class:`MahalanobisScore` on its stage outputs over the training split."""
        fitted = [MahalanobisScore.fit(pool_features(h), labels, self.num_classes) for h in stage_features]
        for mine, new in zip(self.feature_scores, fitted):
            mine.means.copy_(new.means)
            mine.precision.copy_(new.precision)
        return self

    # ------------------------------------------------------------------ config

    def to_config(self) -> dict[str, Any]:
        """The construction arguments, threshold and guarantee (the tensors go in a weights file)."""
        return {
            "config_version": ROUTER_CONFIG_VERSION,
            "num_exits": self.num_exits,
            "num_classes": self.num_classes,
            "feature_dims": list(self.feature_dims),
            "hidden": self.hidden,
            "exit_floor": self.exit_floor,
            "threshold": json_float(float(self.threshold)),
            "guarantee": (json_safe(self.guarantee.to_dict()) if self.guarantee is not None
                          else {"satisfied": False, "reason": "not calibrated"}),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], state: Mapping[str, Tensor] | None = None) -> "Router":
        """Rebuild from :meth:`to_config` (and the weights file's tensors)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"router config must be a JSON object; got {type(config).__name__}")
        version = config.get("config_version")
        if version != ROUTER_CONFIG_VERSION:
            raise ValueError(f"router config_version {version!r} is not {ROUTER_CONFIG_VERSION}; re-save the bundle")
        try:
            router = cls(int(config["num_exits"]), int(config["num_classes"]),
                         [int(d) for d in config["feature_dims"]], int(config["hidden"]),
                         float(config.get("exit_floor", 0.0)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"router config lacks or mistypes {exc}; expected num_exits, num_classes, "
                             "feature_dims and hidden") from exc
        if state is not None:
            router.load_state_dict(dict(state))
        router.threshold.fill_(parse_json_float(config.get("threshold"), missing=math.inf))  # none stored: accepts nothing
        stored = config.get("guarantee") or {}
        router.guarantee = Guarantee.from_dict(stored) if stored.get("alpha") is not None else None  # uncalibrated
        return router

    def extra_repr(self) -> str:
        return f"num_exits={self.num_exits}, threshold={float(self.threshold):.4f}"
