"""Fault tests (issue 12): each reproduces one way a bundle, the audit log or a message went wrong."""

from __future__ import annotations

import pytest
import torch

import fallbackformer as ff

SPEC = ff.InputSpec(shape=(1, 8, 8), dtype="float32", value_range=(0.0, 16.0), description="raw digits")


def tiny_model(seed: int = 0) -> ff.FallbackModel:
    """Registry-built narrow digits models with fixed gates: a different seed, different weights."""
    torch.manual_seed(seed)
    primary = ff.create_model("digits_cnn_exits", width=4).eval()
    student = ff.create_model("digits_mlp_student", hidden=16).eval()
    gates = [ff.ConfidenceGate(temperature=1.0, threshold=0.5) for _ in range(5)]
    return ff.FallbackModel(
        primary, student, gates, ff.Policy(budget_ms=1e6), input_spec=SPEC, class_names=[str(i) for i in range(10)]
    ).eval()


@pytest.fixture(scope="session")
def model_a() -> ff.FallbackModel:
    """Read-only."""
    return tiny_model(0)


@pytest.fixture(scope="session")
def model_b() -> ff.FallbackModel:
    """Read-only; other weights than ``model_a``."""
    return tiny_model(1)


@pytest.fixture
def make_model():
    """The factory ``make_model(seed=0)``: a private model a test may change."""
    return tiny_model
