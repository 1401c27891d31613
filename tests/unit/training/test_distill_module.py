"""The Hinton distillation loss against a brute-force formula, and the multi-exit loss."""

from __future__ import annotations

import functools

import pytest
import torch

import fallbackformer as ff
from fallbackformer.training.distill_module import hinton_loss
from fallbackformer.training.multi_exit_module import MultiExitModule


def _brute_force(s, t, y, T, alpha):
    total = 0.0
    for i in range(len(y)):
        p = torch.softmax(t[i] / T, 0)
        q = torch.softmax(s[i] / T, 0)
        kl = sum(float(p[c] * (torch.log(p[c]) - torch.log(q[c]))) for c in range(len(p)))
        ce = -float(torch.log_softmax(s[i], 0)[y[i]])
        total += alpha * T * T * kl + (1 - alpha) * ce
    return total / len(y)


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (2.0, 0.0), (3.0, 1.0)])
def test_hinton_loss_matches_the_formula(T, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    assert float(hinton_loss(s, t, y, T, alpha)) == pytest.approx(_brute_force(s, t, y, T, alpha), rel=1e-5)


def test_hinton_loss_sends_no_gradient_to_the_teacher_and_checks_its_arguments():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    hinton_loss(s, t, torch.tensor([0, 1, 2, 0]), 2.0, 0.5).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="temperature"):
        hinton_loss(s, t, torch.tensor([0, 1, 2, 0]), 0.0, 0.5)


def test_multi_exit_loss_weights_every_exit():
    model = ff.create_model("digits_cnn_exits")
    module = MultiExitModule(model, functools.partial(torch.optim.SGD, lr=0.1), 10, exit_weights=[1, 0, 0, 1])
    x, y = torch.rand(4, 1, 8, 8) * 16, torch.tensor([0, 1, 2, 3])
    logits = model(x)
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits[0], y) + torch.nn.functional.cross_entropy(logits[3], y))
    torch.testing.assert_close(module.exit_loss(logits, y), expected)
    with pytest.raises(ValueError, match="exit_weights has 2 entries"):
        MultiExitModule(model, functools.partial(torch.optim.SGD, lr=0.1), 10, exit_weights=[1, 1])
