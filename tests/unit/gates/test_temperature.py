"""Temperature scaling: argmax invariance, NLL decrease, agreement with netcal."""

import pytest
import torch

from fallbackformer.gates.temperature import brier, ece, fit_temperature, nll


def _overconfident(n=3000, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = 3 * torch.nn.functional.one_hot(y, c).float() + torch.randn(n, c, generator=g)
    return 4 * z, y  # logits scaled up: over-confident


def test_fit_reduces_nll_and_keeps_argmax():
    z, y = _overconfident()
    t = fit_temperature(z, y)
    assert t > 1.1
    assert nll(z / t, y) < nll(z, y)
    assert torch.equal((z / t).argmax(1), z.argmax(1))
    # the fitted T is a minimum of the NLL
    assert nll(z / t, y) <= min(nll(z / (t * 1.05), y), nll(z / (t / 1.05), y)) + 1e-9


def test_nonfinite_rows_ignored():
    z, y = _overconfident(500)
    t = fit_temperature(z, y)
    z2 = torch.cat([z, torch.full((3, 10), float("nan"))])
    y2 = torch.cat([y, torch.zeros(3, dtype=torch.long)])
    assert fit_temperature(z2, y2) == pytest.approx(t, rel=1e-6)


def test_metrics_simple_values():
    z = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    y = torch.tensor([0, 0])
    assert brier(z, y) == pytest.approx(1.0, abs=1e-6)  # one exact hit, one exact miss (2.0)
    assert ece(z, y) == pytest.approx(0.5, abs=1e-6)
