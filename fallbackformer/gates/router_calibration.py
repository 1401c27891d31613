"""Certify the router's threshold with Learn-then-Test, and collect evidence offline.

The contract: among all answers the system gives (every answer not served by the safe default),
the error rate (the system selective risk) is at most ``alpha``, with probability at least
``1 - delta`` over the calibration draw, **for inputs drawn from the calibration distribution**.
That distribution is stated in the guarantee (``covers``): for the main job, each calibration image
is clean with probability ``clean_weight``, else one tunable corruption drawn uniformly at a severity
drawn uniformly. The guarantee says nothing about other shifts (the held-out corruptions, other data).

How. For each threshold ``lambda`` of a fixed grid (dense near 1, most conservative first) the
cascade is simulated exactly as the runtime runs it (:class:`~fallbackformer.gates.router.Router`),
and so is every cascade a deadline cuts short: exits ``0..j-1`` then the student alone, for every
``j``. The null "some of these cascades has selective risk > alpha" is tested with the largest of
their p-values (an intersection-union test: valid without splitting ``delta``); exact binomial
p-values by default (:mod:`fallbackformer.gates.pvalues`). Fixed-sequence testing walks the grid down
from the first ``lambda`` that answers at least ``min_accepted(alpha, delta)`` calibration samples
(in every cascade: a count that reads no label) and keeps the last ``lambda`` it rejects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fallbackformer.gates.evidence import Evidence
from fallbackformer.gates.guarantee import certified
from fallbackformer.gates.pvalues import ltt_pvalues, min_accepted
from fallbackformer.gates.risk_control import fixed_sequence
from fallbackformer.gates.router import Router

__all__ = ["RouterProbabilities", "cascade_counts", "certified_index", "certify", "collect_evidence",
           "mixture_covers", "router_grid", "router_probabilities"]


def router_grid(size: int = 800) -> Tensor:
    """The fixed threshold grid, highest first: ``1 - exp(-u)``, ``u`` in ``[0, 14]``, float32, distinct."""
    u = torch.linspace(14.0, 0.0, size, dtype=torch.float64)
    return torch.unique((1.0 - torch.exp(-u)).float()).flip(0)


@torch.no_grad()
def collect_evidence(primary: nn.Module, student: nn.Module, router: Router | None, x: Tensor,
                     batch_size: int = 512) -> tuple[Evidence, list[Tensor]]:
    """Full evidence on ``x`` (every exit, the student, each head's feature score) and the stage outputs.

    Args:
        primary: a :class:`~fallbackformer.models.multi_exit.MultiExitNet`.
        student: raw input to logits.
        router: its feature scores are applied (``None``: the scores are zeros; use it to fit them).
        x: raw inputs ``[N, ...]``.

    Returns:
        ``(evidence, pooled stage outputs per head [N, D_k])``.
    """
    from fallbackformer.gates.evidence import pool_features

    exits: list[list[Tensor]] = []
    scores: list[list[Tensor]] = []
    pooled: list[list[Tensor]] = []
    studs: list[Tensor] = []
    for xb in x.split(batch_size):
        feats = primary.forward_features(xb)
        exits.append(primary.forward_head(feats))
        pooled.append([pool_features(h) for h in feats])
        scores.append([router.feature_scores[i](h) if router is not None else torch.zeros(xb.shape[0])
                       for i, h in enumerate(feats)])
        studs.append(student(xb))
    ev = Evidence([torch.cat(p) for p in zip(*exits)], [torch.cat(p) for p in zip(*scores)], torch.cat(studs))
    return ev, [torch.cat(p) for p in zip(*pooled)]


@dataclass
class RouterProbabilities:
    """What the cascade needs per calibration sample (``N`` samples; ``E`` heads).

    Attributes:
        exits: ``[E-1, N]`` probability that each early exit is right.
        exit_wrong: ``[E-1, N]`` whether it is wrong.
        final: ``[N]`` the final decision's probability (the better of primary and student).
        final_wrong: ``[N]`` whether the answer it picks is wrong.
        alone: ``[N]`` the student-alone probability.
        alone_wrong: ``[N]`` whether the student is wrong.
    """

    exits: Tensor
    exit_wrong: Tensor
    final: Tensor
    final_wrong: Tensor
    alone: Tensor
    alone_wrong: Tensor


@torch.no_grad()
def router_probabilities(router: Router, evidence: Evidence, labels: Tensor) -> RouterProbabilities:
    """The router's probabilities and the correctness of each candidate on labelled evidence."""
    e = router.num_exits
    nan = lambda t: torch.nan_to_num(t.float(), nan=-1.0)  # noqa: E731  (NaN is never accepted)
    # an exit below the floor can never answer: as if its probability were -1 (never >= a threshold)
    exits = [torch.where(p >= router.exit_floor, p, torch.full_like(p, -1.0))
             for p in (nan(router.exit_probability(evidence, k)) for k in range(e - 1))]
    exit_wrong = [evidence.exit_logits[k].argmax(-1) != labels for k in range(e - 1)]
    _, _, final, pred = router.decide_final(evidence)
    _, alone, s_pred = router.decide_student_alone(evidence.student_logits)
    n = labels.shape[0]
    return RouterProbabilities(
        exits=torch.stack(exits) if exits else torch.zeros(0, n),
        exit_wrong=torch.stack(exit_wrong) if exit_wrong else torch.zeros(0, n, dtype=torch.bool),
        final=nan(final), final_wrong=pred != labels, alone=nan(alone), alone_wrong=s_pred != labels)


def cascade_counts(probs: RouterProbabilities, grid: Tensor) -> tuple[Tensor, Tensor]:
    """Answered and wrong counts of every cascade at every threshold.

    Cascade ``0`` is the full one (exits, then the better of primary and student); cascade ``1 + j``
    is cut short after ``j`` early exits (``j = 0 .. E-1``) and ends with the student alone. Works on
    a leading batch of splits: every tensor of ``probs`` may carry a leading ``[S]`` dimension
    (``exits`` then ``[S, E-1, N]``).

    Returns:
        ``(n, k)``, long ``[S, J, G]`` (``[J, G]`` without the split dimension).
    """
    squeeze = probs.final.dim() == 1
    p = probs if not squeeze else RouterProbabilities(*(t.unsqueeze(0) for t in (
        probs.exits, probs.exit_wrong, probs.final, probs.final_wrong, probs.alone, probs.alone_wrong)))
    e1 = p.exits.shape[1]
    ns, ks = [], []
    for lam in grid.tolist():
        acc = p.exits >= lam  # [S, E-1, N]
        # the first accepting exit of each sample: taken[:, k] is True only there
        before = torch.cumsum(acc.long(), dim=1) - acc.long()  # accepting exits before k
        taken = acc & (before == 0)
        served_exit_wrong = taken & p.exit_wrong
        n_j, k_j = [], []
        any_before = torch.zeros_like(p.final, dtype=torch.bool)  # [S, N]
        wrong_before = torch.zeros_like(any_before)
        cum_any, cum_wrong = [any_before], [wrong_before]
        for k in range(e1):
            any_before = any_before | taken[:, k]
            wrong_before = wrong_before | served_exit_wrong[:, k]
            cum_any.append(any_before)
            cum_wrong.append(wrong_before)
        final_ok = ~cum_any[-1] & (p.final >= lam)
        n_j.append((cum_any[-1] | final_ok).sum(-1))
        k_j.append((cum_wrong[-1] | (final_ok & p.final_wrong)).sum(-1))
        alone_ok = p.alone >= lam
        for j in range(e1 + 1):
            rest = ~cum_any[j] & alone_ok
            n_j.append((cum_any[j] | rest).sum(-1))
            k_j.append((cum_wrong[j] | (rest & p.alone_wrong)).sum(-1))
        ns.append(torch.stack(n_j, -1))
        ks.append(torch.stack(k_j, -1))
    n, k = torch.stack(ns, -1), torch.stack(ks, -1)  # [S, J, G]
    return (n[0], k[0]) if squeeze else (n, k)


def certify(router: Router, evidence: Evidence, labels: Tensor, alpha: float, delta: float,
            covers: dict[str, Any], method: str = "ltt_binom", deadline_robust: bool = True,
            grid: Tensor | None = None) -> Router:
    """Set ``router.threshold`` and ``router.guarantee`` from the calibration evidence and labels."""
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"alpha={alpha} and delta={delta} must lie in (0, 1); e.g. alpha=0.05, delta=0.1")
    grid = router_grid() if grid is None else grid
    probs = router_probabilities(router, evidence, labels)
    n, k = cascade_counts(probs, grid)  # [J, G]
    if not deadline_robust:
        n, k = n[:1], k[:1]
    thr, info = _fixed_sequence(n, k, grid, alpha, delta, method)
    router.threshold.fill_(thr)
    full_n, full_k = (int(n[0, info["index"]]), int(k[0, info["index"]])) if info["index"] is not None else (0, 0)
    m = int(labels.shape[0])
    router.guarantee = certified(
        alpha=alpha, delta=delta, method=method, n=m, threshold=thr, satisfied=info["index"] is not None,
        reason=info["reason"], risk="system selective risk: errors among the answers not served by the safe default",
        kind="high_probability", covers=covers, coverage=full_n / m if m else 0.0,
        selective_risk=full_k / full_n if full_n else None, deadline_robust=bool(deadline_robust),
        n_answered_cal=full_n, n_min=info["n_min"],
    )
    return router


def certified_index(n: Tensor, k: Tensor, alpha: float, delta: float, method: str) -> tuple[Tensor, int, Tensor]:
    """Fixed-sequence Learn-then-Test over the grid, vectorised over splits.

    Args:
        n, k: ``[..., J, G]`` answered and wrong counts of every cascade at every threshold.

    Returns:
        ``(last, n_min, start)``: per split the index of the last certified threshold (``-1``: none),
        the fewest answers that can certify, and where each sequence started (``G``: nowhere).
    """
    n_min = min_accepted(alpha, delta, method)
    g = n.shape[-1]
    testable = (n >= n_min).all(dim=-2)  # [..., G]: every cascade testable (a count that reads no label)
    idx = torch.arange(g)
    start = torch.where(testable, idx, torch.full_like(idx, g)).min(dim=-1).values
    p = ltt_pvalues(k, n, alpha, method).amax(dim=-2)  # [..., G]: the worst cascade (intersection-union)
    last = fixed_sequence(p, delta, start.clamp(max=g - 1))
    last = torch.where(start < g, last, torch.full_like(last, -1))
    return last, n_min, start


def _fixed_sequence(n: Tensor, k: Tensor, grid: Tensor, alpha: float, delta: float,
                    method: str) -> tuple[float, dict[str, Any]]:
    last, n_min, start = certified_index(n, k, alpha, delta, method)
    if int(start) >= grid.shape[0]:
        return math.inf, {"index": None, "n_min": n_min, "reason": (
            f"no threshold answers {n_min} calibration samples in every cascade (the fewest that can certify "
            f"alpha={alpha} at delta={delta}); the router answers nothing. Calibrate on more data or raise alpha")}
    if int(last) < 0:
        return math.inf, {"index": None, "n_min": n_min, "reason": (
            f"the most conservative testable threshold is not certified at delta={delta}: selective risk <= "
            f"{alpha} cannot be certified; the router answers nothing")}
    return float(grid[int(last)]), {"index": int(last), "n_min": n_min, "reason": "certified"}


def mixture_covers(clean_weight: float, corruptions: Sequence[str], severities: Sequence[int], seed: int) -> dict[str, Any]:
    """The ``covers`` block of a guarantee certified on a clean-plus-corruptions mixture."""
    return {"clean_weight": float(clean_weight), "corruptions": list(corruptions),
            "severities": [int(s) for s in severities], "seed": int(seed),
            "draw": "each calibration sample independently: clean with probability clean_weight, else one "
                    "corruption drawn uniformly from the list at a severity drawn uniformly"}
