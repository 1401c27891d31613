"""Evidence: what a router may read beyond one path's softmax.

A confidence gate reads its own path's logits. Under distribution shift that is not enough: one
model's softmax stays confident and wrong (Jaeger et al. 2023; Jitkrittum et al. 2023). The evidence
adds more information, cheaply:

* the logits of every exit reached so far (``exit_logits``, each ``[B, C]``);
* the student's logits (``student_logits``, ``[B, C]``; the student costs about 1.5% of the
  primary's FLOPs on digits, so the policy may compute it first, for every sample);
* the agreement between exits, and between each exit and the student;
* a feature-space score per exit reached (``feature_scores``, each ``[B]``): the class-conditional
  Mahalanobis distance of that stage's pooled features (:class:`MahalanobisScore`, fitted on the
  training split), which grows when an input leaves the training distribution (SIRC, Xia and
  Bouganis 2022, combine such a score with the softmax).

:func:`path_features` turns the evidence into the fixed feature vector of one routing decision. It is
the ONE definition used by training, calibration, the runtime and the exported graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Evidence", "MahalanobisScore", "logit_stats", "path_features", "feature_width", "pool_features"]

#: per path: max softmax, top-1 minus top-2 probability, entropy / log(C)
NUM_LOGIT_STATS = 3


@dataclass
class Evidence:
    """The evidence available at one point of a request (all tensors share the batch dimension).

    Attributes:
        exit_logits: logits of the exits reached, in order (the primary's final head last when reached).
        feature_scores: the feature-space score of each exit reached (same order), ``[B]`` each.
        student_logits: the student's logits ``[B, C]``, or ``None`` when the student has not run.
    """

    exit_logits: list[Tensor] = field(default_factory=list)
    feature_scores: list[Tensor] = field(default_factory=list)
    student_logits: Tensor | None = None
    # per path, its statistics [B, 3] and class [B], computed once (a request's decisions reuse them;
    # treat the tensors above as read-only once a decision has read them)
    _cache: dict[Any, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def stats(self, j: int | str) -> Tensor:
        """:func:`logit_stats` of exit ``j`` (or ``"student"``) as ``[B, 3]``, computed once."""
        key = ("stats", j)
        if key not in self._cache:
            self._cache[key] = torch.stack(logit_stats(self._logits(j)), 1)
        return self._cache[key]

    def pred(self, j: int | str) -> Tensor:
        """The class of exit ``j`` (or ``"student"``), ``[B]``, computed once."""
        key = ("pred", j)
        if key not in self._cache:
            self._cache[key] = self._logits(j).argmax(-1)
        return self._cache[key]

    def _logits(self, j: int | str) -> Tensor:
        if j == "student":
            if self.student_logits is None:
                raise ValueError("this evidence has no student logits (Evidence.student_logits is None)")
            return self.student_logits
        return self.exit_logits[int(j)]

    def select(self, rows: Tensor) -> "Evidence":
        """The evidence of the rows ``rows`` (a bool mask or indices), its computed statistics included."""
        return Evidence(
            [t[rows] for t in self.exit_logits],
            [t[rows] for t in self.feature_scores],
            None if self.student_logits is None else self.student_logits[rows],
            {k: v[rows] for k, v in self._cache.items()},
        )


def logit_stats(logits: Tensor) -> list[Tensor]:
    """``[max softmax, top-1 minus top-2 probability, normalised entropy]``, each ``[B]``.

    Non-finite logits give NaN statistics (a router never accepts them).
    """
    logits = logits.float()
    c = logits.shape[-1]
    p = logits.softmax(-1)  # [B, C]
    top = p.topk(min(2, c), dim=-1).values  # [B, 2]
    second = top[:, 1] if c > 1 else torch.zeros_like(top[:, 0])
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1) / math.log(max(c, 2))
    return [top[:, 0], top[:, 0] - second, ent]


def feature_width(position: int | str, num_exits: int) -> int:
    """Width of :func:`path_features` for ``position`` (an exit index, or ``"student"`` / ``"student_alone"``)."""
    if position == "student_alone":
        return NUM_LOGIT_STATS
    if position == "student":
        return (NUM_LOGIT_STATS + 2) * num_exits + NUM_LOGIT_STATS
    return (NUM_LOGIT_STATS + 2) * (position + 1) + NUM_LOGIT_STATS + 1


def path_features(evidence: Evidence, position: int | str) -> Tensor:
    """The feature vector ``[B, F]`` of one routing decision.

    Args:
        evidence: the evidence at that point.
        position: an exit index ``k`` (0-based; the final head is ``len(exit_logits) - 1`` when all
            exits were reached): "may exit ``k`` answer?", reading exits ``0..k`` and the student;
            ``"student"``: "may the student answer?", reading every exit and the student;
            ``"student_alone"``: the student's own logits only (the primary could not finish).

    Per exit ``j`` read: its 3 statistics, its feature score and whether its class agrees with the
    answer judged; then the student's 3 statistics (and, for an exit, whether the student agrees).
    """
    if evidence.student_logits is None:
        raise ValueError("path_features needs the student's logits (Evidence.student_logits is None)")
    s_stats = evidence.stats("student")  # [B, 3]
    if position == "student_alone":
        return s_stats
    if position == "student":
        judged, reach = evidence.pred("student"), len(evidence.exit_logits)
    else:
        k = int(position)
        if k >= len(evidence.exit_logits):
            raise ValueError(f"position {k} needs exits 0..{k}; the evidence holds {len(evidence.exit_logits)}")
        judged, reach = evidence.pred(k), k + 1
    cols: list[Tensor] = []
    for j in range(reach):
        cols += [evidence.stats(j), evidence.feature_scores[j].float()[:, None],
                 (evidence.pred(j) == judged).float()[:, None]]
    cols.append(s_stats)
    if position != "student":
        cols.append((evidence.pred("student") == judged).float()[:, None])
    return torch.cat(cols, 1)


def pool_features(h: Tensor) -> Tensor:
    """A stage's output as one vector per sample: spatial mean for ``[B, C, ...]``, else flattened."""
    return h.float().mean(dim=tuple(range(2, h.dim()))) if h.dim() > 2 else h.float().reshape(h.shape[0], -1)


class MahalanobisScore(nn.Module):
    """``log(1 + min_c (f - mu_c)^T P (f - mu_c))`` of a stage's pooled features ``f``.

    Class means ``mu_c`` and one shared precision ``P`` (Lee et al. 2018), fitted on the training
    split with :meth:`fit`. Large values: the input lies far from every class seen in training.

    Args:
        means: ``[C, D]`` class means.
        precision: ``[D, D]`` inverse of the shared covariance.
    """

    def __init__(self, means: Tensor, precision: Tensor) -> None:
        super().__init__()
        self.register_buffer("means", means.float())  # [C, D]
        self.register_buffer("precision", precision.float())  # [D, D]

    @classmethod
    def empty(cls, num_classes: int, dim: int) -> "MahalanobisScore":
        """An unfitted score of the right shapes (to load a state into)."""
        return cls(torch.zeros(num_classes, dim), torch.eye(dim))

    @classmethod
    def fit(cls, features: Tensor, labels: Tensor, num_classes: int, shrinkage: float = 1e-3) -> "MahalanobisScore":
        """Fit on pooled training features ``[N, D]`` and labels ``[N]``.

        A class absent from ``labels`` gets the overall mean. ``shrinkage`` (times the mean variance)
        is added to the covariance's diagonal so it is always invertible.
        """
        f = features.double()
        overall = f.mean(0)
        means = torch.stack([f[labels == c].mean(0) if bool((labels == c).any()) else overall
                             for c in range(num_classes)])  # [C, D]
        centred = f - means[labels]
        cov = centred.T @ centred / max(1, f.shape[0] - 1)
        cov = cov + shrinkage * float(cov.diagonal().mean().clamp_min(1e-12)) * torch.eye(f.shape[1], dtype=f.dtype)
        return cls(means.float(), torch.linalg.inv(cov).float())

    def forward(self, h: Tensor) -> Tensor:  # stage output [B, ...] -> [B]
        f = pool_features(h)  # [B, D]
        fp = f @ self.precision  # [B, D]
        d2 = (fp * f).sum(1, keepdim=True) - 2.0 * fp @ self.means.T + ((self.means @ self.precision) * self.means).sum(1)
        return torch.log1p(d2.min(dim=1).values.clamp_min(0.0))  # [B]
