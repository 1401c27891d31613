"""The shipped demo bundle (checkpoints/digits) meets the product's figures on the clean test split.

The bundle is made by the main job (``python scripts/run.py bundle_dir=checkpoints/digits``); these
checks read it the way inference code does, with ``ff.load``.
"""

from __future__ import annotations

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
    preds = torch.cat([model(xb).prediction for xb in x.split(16)])
    acc_system = (preds == y).float().mean().item()
    assert acc_primary >= 0.975
    assert acc_student >= 0.95
    assert acc_system >= acc_primary - 0.005


def test_demo_bundle_is_calibrated(demo):
    model, x, y, logits, student = demo
    ece = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    for name, lg in (("primary", logits[-1]), ("student", student)):
        t = model.gates[name].temperature
        assert float(ece((lg / t).softmax(1), y)) <= 0.02, name
