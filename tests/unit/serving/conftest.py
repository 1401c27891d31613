"""Serving fixtures: the demo bundle with its deadline lifted, and a tiny hand-built model."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import fallbackformer as ff

BUNDLE = Path(__file__).resolve().parents[3] / "checkpoints" / "digits"
LIFTED_MS = 1e6  # a budget no call reaches: answers are deterministic


def load_digits(budget_ms: float = LIFTED_MS) -> ff.FallbackModel:
    model = ff.load(BUNDLE)
    model.policy = dataclasses.replace(model.policy, budget_ms=budget_ms, hedge="off")
    return model


class Sink:
    """Keeps events; records close()."""

    def __init__(self) -> None:
        self.events: list[ff.FallbackEvent] = []
        self.closed = False

    def emit(self, event: ff.FallbackEvent) -> None:
        self.events.append(event)

    def close(self) -> None:
        self.closed = True


def tiny_model(sinks=(), budget_ms: float = LIFTED_MS, exit_threshold: float = math.inf) -> ff.FallbackModel:
    """Input [B, 4] in [-10, 10]; one early exit (rejects everything by default), a final head, a student."""
    torch.manual_seed(0)
    primary = ff.MultiExitNet([nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 8))],
                              {0: nn.Linear(8, 3), 1: nn.Linear(8, 3)})
    student = nn.Linear(4, 3)
    gates = [ff.ConfidenceGate(threshold=exit_threshold), ff.ConfidenceGate(threshold=0.0),
             ff.ConfidenceGate(threshold=0.0)]
    policy = ff.Policy(budget_ms=budget_ms, hedge="off")
    spec = ff.InputSpec(shape=(4,), value_range=(-10.0, 10.0), description="four features")
    return ff.FallbackModel(primary, student, gates, policy, input_spec=spec, sinks=list(sinks)).eval()


@pytest.fixture(scope="session")
def digits_test_images() -> tuple[torch.Tensor, torch.Tensor]:
    from fallbackformer.data.digits import load_digits_splits

    return load_digits_splits(seed=0)["test"]
