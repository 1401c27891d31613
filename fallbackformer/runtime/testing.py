"""Test helpers: a FallbackModel whose stages and student take scripted time on a FakeClock.

Used by the runtime's own tests and handy for testing a policy: every stage is an identity block
wrapped in :class:`~fallbackformer.runtime.clock.ScriptedDelay`, the heads return fixed or
feature-dependent logits, so which path serves and when is known exactly.

>>> model, clock, stages, student = build([2.0, 2.0], budget_ms=10.0)
>>> out = model(torch.zeros(1, 4))
>>> out.served_by, out.latency_ms
(['primary'], 4.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime.clock import FakeClock, ScriptedDelay
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.latency import LatencyProfile
from fallbackformer.runtime.policy import Policy

__all__ = ["ConstHead", "FeatureHead", "build", "gate", "seed"]

NUM_CLASSES = 3


class ConstHead(nn.Module):
    """Logits putting ``sharp`` on class ``cls`` for every sample."""

    def __init__(self, cls: int, sharp: float = 10.0) -> None:
        super().__init__()
        self.cls, self.sharp = cls, sharp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(h.shape[0], NUM_CLASSES)
        out[:, self.cls] = self.sharp
        return out


class FeatureHead(nn.Module):
    """Confident on class ``cls`` where feature ``k`` of the sample is > 0, unsure elsewhere."""

    def __init__(self, k: int, cls: int) -> None:
        super().__init__()
        self.k, self.cls = k, cls

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(h.shape[0], NUM_CLASSES)
        out[:, self.cls] = torch.where(h[:, self.k] > 0, 20.0, 0.0)
        return out


def gate(threshold: float) -> ConfidenceGate:
    return ConfidenceGate(temperature=1.0, threshold=threshold)


def build(
    stage_scripts: Sequence[Any],
    student_script: Any = 0.0,
    heads: dict[int, nn.Module] | None = None,
    thresholds: Sequence[float] | None = None,
    clock: FakeClock | None = None,
    student_head: nn.Module | None = None,
    profile: LatencyProfile | None = None,
    **policy: Any,
) -> tuple[FallbackModel, FakeClock, list[ScriptedDelay], ScriptedDelay]:
    """A primary of ``len(stage_scripts)`` identity stages taking scripted time, exits per ``heads``.

    By default every stage has an exit; early exits reject everything (threshold 0.99 on an unsure
    head) and the final head and the student are confident.
    """
    clock = clock or FakeClock()
    n = len(stage_scripts)
    stages = [ScriptedDelay(nn.Identity(), clock, script) for script in stage_scripts]
    if heads is None:
        heads = {i: ConstHead(1, sharp=0.0) for i in range(n - 1)}
        heads[n - 1] = ConstHead(2)
    student = ScriptedDelay(student_head or ConstHead(0), clock, student_script)
    primary = MultiExitNet(stages, heads)
    k = len(heads)
    thresholds = list(thresholds) if thresholds is not None else [0.99] * (k - 1) + [0.5, 0.5]
    policy.setdefault("budget_ms", 10.0)
    policy.setdefault("margin_ms", 0.0)
    model = FallbackModel(primary, student, [gate(t) for t in thresholds], Policy(**policy), clock=clock, profile=profile)
    return model.eval(), clock, stages, student


def seed(model: FallbackModel, p99: dict[str, float], batch_size: int = 1, count: int = 16) -> None:
    """Seed the latency profile so that ``predict_p99(name, batch_size) == p99[name]``."""
    for name, ms in p99.items():
        for _ in range(count):
            model.profile.record(name, batch_size, ms)
