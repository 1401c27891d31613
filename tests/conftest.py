"""Shared fixtures: one tiny trained digits system per test session (seconds, fixed seed, CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fallbackformer as ff
from fallbackformer.data.digits import load_digits_splits
from fallbackformer.training.distill_module import hinton_loss
from fallbackformer.data.digits import INPUT_SPEC as DIGITS_INPUT
from fallbackformer.training.pipeline import path_logits

# One torch thread for the whole test session: on 2 shared cores, two intra-op threads fighting
# each other made small ops orders of magnitude slower, and timings noisy.
torch.set_num_threads(1)


@dataclass
class DigitsSystem:
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    primary: ff.MultiExitNet
    student: nn.Module
    gates: list[ff.ConfidenceGate]
    model: ff.FallbackModel

    def fresh_model(self, **kwargs) -> ff.FallbackModel:
        """A new FallbackModel around the same trained parts (own counters, policy, clock...)."""
        kwargs.setdefault("input_spec", DIGITS_INPUT)
        policy = kwargs.pop("policy", ff.Policy(budget_ms=1000.0))
        return ff.FallbackModel(self.primary, self.student, self.gates, policy, **kwargs).eval()


def _train(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(model, x[idx], y[idx]).backward()
            opt.step()
    model.eval()


@pytest.fixture(scope="session")
def digits_system() -> DigitsSystem:
    """A digits primary (3 exits + final) and student trained with plain torch for a few epochs."""
    torch.manual_seed(0)
    splits = load_digits_splits(seed=0)
    x, y = splits["train"]
    primary = ff.create_model("digits_cnn_exits", num_classes=10)
    _train(primary, lambda m, xb, yb: sum(F.cross_entropy(lg, yb) for lg in m(xb)), x, y, epochs=4, lr=3e-3)
    student = ff.create_model("digits_mlp_student", num_classes=10)

    def distill_loss(m, xb, yb):
        with torch.no_grad():
            teacher = primary(xb)[-1]  # the frozen primary's final exit
        return hinton_loss(m(xb), teacher, yb, temperature=4.0, alpha=0.7)

    _train(student, distill_loss, x, y, epochs=15, lr=5e-3)
    x_cal, y_cal = splits["calibration"]
    logits = path_logits(primary, student, x_cal)
    alphas = [0.02] * (primary.num_exits - 1) + [0.1, 0.1]
    gates = [ff.ConfidenceGate.calibrate(lg, y_cal, alpha=a, delta=0.1, method="ltt_hb") for lg, a in zip(logits, alphas)]
    model = ff.FallbackModel(primary, student, gates, ff.Policy(budget_ms=1000.0), input_spec=DIGITS_INPUT).eval()
    return DigitsSystem(splits, primary, student, gates, model)
