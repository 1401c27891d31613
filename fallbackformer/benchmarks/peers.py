"""Naive peers: the same decisions as :class:`~fallbackformer.FallbackModel`, in plain PyTorch, no deadline.

What a careful user would write by hand around the same models, gates or router: check the input's
range, walk the stages, at each exit that can answer ask its gate (or the router, reading the same
evidence), let the answered samples leave the batch, then the student for the rest, and argmax.
No clock, no admission, no hedging, no counters, no records. Both peers return the predictions
(``-1`` where the safe default would serve), so a benchmark can check they agree with the runtime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fallbackformer.gates.evidence import Evidence
from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.gates.router import Router
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime.validation import InputSpec

__all__ = ["GatedPeer", "RoutedPeer"]


class _Peer:
    def __init__(self, primary: MultiExitNet, student: nn.Module, spec: InputSpec) -> None:
        self.primary, self.student = primary, student
        lo, hi = spec.value_range if spec.value_range is not None else (-math.inf, math.inf)
        tol = 1e-3 * (hi - lo) if math.isfinite(hi - lo) else 0.0
        self.lo, self.hi = lo - tol, hi + tol

    def _check(self, x: Tensor) -> None:
        x_min, x_max = x.aminmax()
        if not (self.lo <= x_min.item() and x_max.item() <= self.hi):
            raise ValueError("input out of range")


class GatedPeer(_Peer):
    """The gated cascade by hand: ``peer(x) -> predictions [B]``.

    Args:
        primary: the multi-exit primary.
        student: the fallback student.
        gates: ``[exit_1.., primary, student]``, as :class:`~fallbackformer.FallbackModel` takes them.
        spec: the input spec (its value range is checked, as the runtime does).
    """

    def __init__(self, primary: MultiExitNet, student: nn.Module, gates: Sequence[ConfidenceGate],
                 spec: InputSpec) -> None:
        super().__init__(primary, student, spec)
        self.gates = list(gates)
        last = primary.exit_stages[-1]
        # an exit whose gate can never accept is skipped (its head not computed), as the runtime does
        self.exits = {s: g for s, g in zip(primary.exit_stages, self.gates)
                      if s == last or not math.isinf(float(g.threshold))}

    def __call__(self, x: Tensor) -> Tensor:
        self._check(x)
        p = self.primary
        last = p.exit_stages[-1]
        pred = torch.full((x.shape[0],), -1, dtype=torch.long)
        idx = None  # rows still in the batch (None: all)
        h = p.input_transform(x)
        for i, stage in enumerate(p.stages):
            h = stage(h)
            gate = self.exits.get(i)
            if gate is None:
                continue
            accept, _, answer = gate.decide(p.head(i)(h))
            n_accept = int(accept.sum())
            if n_accept == accept.shape[0]:
                return _fill(pred, idx, answer)
            if n_accept == 0 and i != last:  # nobody leaves: no compaction
                continue
            pred = _fill(pred, idx, torch.where(accept, answer, -1))
            idx = _keep(idx, ~accept, x.shape[0])
            h = h[~accept]
        rest = x[idx]
        accept, _, answer = self.gates[-1].decide(self.student(rest))
        return _fill(pred, idx, torch.where(accept, answer, -1))


class RoutedPeer(_Peer):
    """The routed cascade by hand: the student first, the router reading the evidence at each exit.

    Args:
        primary: the multi-exit primary.
        student: the fallback student.
        router: a fitted router (its threshold and exit floor decide, as in the runtime).
        spec: the input spec.
    """

    def __init__(self, primary: MultiExitNet, student: nn.Module, router: Router, spec: InputSpec) -> None:
        super().__init__(primary, student, spec)
        self.router = router

    def __call__(self, x: Tensor) -> Tensor:
        self._check(x)
        p, router = self.primary, self.router
        pred = torch.full((x.shape[0],), -1, dtype=torch.long)
        idx = None
        evidence = Evidence(student_logits=self.student(x))
        h = p.input_transform(x)
        last = p.exit_stages[-1]
        for i, stage in enumerate(p.stages):
            h = stage(h)
            if i not in p.exit_stages:
                continue
            evidence.exit_logits.append(p.head(i)(h))
            evidence.feature_scores.append(router.feature_scores[len(evidence.exit_logits) - 1](h))
            if i == last:
                accept, _, _, answer = router.decide_final(evidence)
                return _fill(pred, idx, torch.where(accept, answer, -1))
            accept, _, answer = router.decide_exit(evidence, len(evidence.exit_logits) - 1)
            n_accept = int(accept.sum())
            if n_accept == accept.shape[0]:
                return _fill(pred, idx, answer)
            if n_accept == 0:  # nobody leaves: no compaction
                continue
            pred = _fill(pred, idx, torch.where(accept, answer, -1))
            idx = _keep(idx, ~accept, x.shape[0])
            h, evidence = h[~accept], evidence.select(~accept)
        return pred


def _fill(pred: Tensor, idx: Tensor | None, values: Tensor) -> Tensor:
    """``pred`` with ``values`` written at the rows ``idx`` (all rows when ``None``); ``-1`` keeps the old value."""
    if idx is None:
        return torch.where(values >= 0, values, pred)
    pred[idx] = torch.where(values >= 0, values, pred[idx])
    return pred


def _keep(idx: Tensor | None, mask: Tensor, n: int) -> Tensor:
    base = torch.arange(n) if idx is None else idx
    return base[mask]
