"""The reduced-input rung: the digits student on the 4x4 average image, distilled with ``ff.distill``
like any student, rebuilt by the registry from its name and arguments."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fallbackformer as ff
from fallbackformer.rungs import load_rung, save_rung


@pytest.mark.slow  # Lightning's import and Trainer set-up alone take several seconds on 2 shared cores
def test_pooled_student_distils_from_the_primary_with_ff_distill(digits_system, tmp_path):
    x, y = digits_system.splits["train"]
    x_test, y_test = digits_system.splits["test"]
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    student = ff.distill(digits_system.primary, ff.create_model("digits_pooled_student"), loader,
                         max_epochs=8, lr=1e-2, seed=0)
    with torch.no_grad():
        pred = student(x_test).argmax(1)
        primary = digits_system.primary(x_test)[-1].argmax(1)
    accuracy, agreement = (pred == y_test).float().mean().item(), (pred == primary).float().mean().item()
    assert accuracy > 0.8 and agreement > 0.8, (accuracy, agreement)  # 16 features of 64: weaker, far above 0.1
    with torch.no_grad():
        assert torch.equal(load_rung(save_rung(student, tmp_path / "pooled"))(x_test), student(x_test))
