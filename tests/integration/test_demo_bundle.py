"""The shipped demo bundle (checkpoints/digits) meets the product's figures on the clean test split.

The bundle is made by the main job (``python scripts/run.py bundle_dir=checkpoints/digits``); these
checks read it the way inference code does, with ``ff.load``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

import fallbackformer as ff
from fallbackformer.data.digits import load_digits_splits

DEMO = Path(__file__).resolve().parents[2] / "checkpoints" / "digits"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (DEMO / "manifest.json").exists(), reason="no demo bundle in checkpoints/digits"),
]


@pytest.fixture(scope="module")
def demo():
    model = ff.load(DEMO)
    x, y = load_digits_splits(seed=0)["test"]
    with torch.no_grad():
        logits = model.primary(x)
        student = model.student(x)
    return model, x, y, logits, student


def test_demo_bundle_accuracy(demo):
    model, x, y, logits, student = demo
    acc_primary = (logits[-1].argmax(1) == y).float().mean().item()
    acc_student = (student.argmax(1) == y).float().mean().item()
    model.policy = dataclasses.replace(model.policy, budget_ms=1e9)  # decisions, not this machine's load
    preds = torch.cat([model(xb).prediction for xb in x.split(16)])
    answered = preds >= 0
    acc_system = (preds == y).float().mean().item()
    assert acc_primary >= 0.975
    assert acc_student >= 0.95
    assert acc_system >= acc_primary - 0.01  # the bundle's signed-off bound (abstentions count wrong)
    assert (preds[answered] == y[answered]).float().mean().item() >= acc_primary - 0.005
    # issue 10 on clean: coverage >= 97% and accuracy among the answers >= 99%
    assert answered.float().mean().item() >= 0.97
    assert (preds[answered] == y[answered]).float().mean().item() >= 0.99


def test_demo_bundle_router_states_what_its_guarantee_covers(demo):
    model = demo[0]
    assert model.router is not None
    g = model.router.guarantee
    assert g.satisfied and g.method == "ltt_binom"
    assert set(g.covers["corruptions"]).isdisjoint({"speckle_noise", "glass_blur", "fog", "zigzag"})
    assert "says nothing about other shifts" in g.statement


def test_demo_bundle_is_calibrated(demo):
    model, x, y, logits, student = demo
    ece = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    for name, lg in (("primary", logits[-1]), ("student", student)):
        t = model.gates[name].temperature
        assert float(ece((lg / t).softmax(1), y)) <= 0.02, name
