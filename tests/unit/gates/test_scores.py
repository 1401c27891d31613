"""Scores: values against hand computations, ranges, NaN on non-finite rows."""

import math

import pytest
import torch

from fallbackformer.gates.scores import (
    SCORES,
    compute_score,
    margin,
    max_softmax,
    neg_entropy,
    score_range,
)


def test_values_against_numpy_reference():
    import numpy as np

    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 7, generator=g) * 3
    p = np.exp(z.double().numpy())
    p /= p.sum(1, keepdims=True)
    ps = np.sort(p, 1)
    np.testing.assert_allclose(max_softmax(z).numpy(), ps[:, -1], rtol=1e-5)
    np.testing.assert_allclose(margin(z).numpy(), ps[:, -1] - ps[:, -2], atol=1e-6)
    np.testing.assert_allclose(neg_entropy(z).numpy(), (p * np.log(p)).sum(1), atol=1e-5)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_range_and_nan(name):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(200, 5, generator=g) * 10
    z[0] = torch.tensor([1e4, 0, 0, 0, 0])  # saturated
    z[1] = 0.0  # uniform
    z[2, 1] = float("nan")
    z[3, 4] = float("inf")
    s = compute_score(name, z)
    lo, hi = score_range(name, 5)
    assert torch.isnan(s[2:4]).all()
    fin = torch.cat([s[:2], s[4:]])
    assert torch.isfinite(fin).all()
    assert (fin >= lo - 1e-6).all() and (fin <= hi + 1e-6).all()
    assert s[0] == pytest.approx(hi, abs=1e-6)
    assert s[1] == pytest.approx(lo, abs=1e-6)


def test_float64_kept_and_unknown_name():
    z = torch.randn(4, 3, dtype=torch.float64)
    assert max_softmax(z).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown score 'nope'"):
        compute_score("nope", z)
    assert math.isclose(score_range("neg_entropy", 10)[0], -math.log(10))


def _patience_reference(preds, finite, k):
    """Loop reference: exit i fires when exits i-k..i are finite and share the argmax."""
    out = []
    for i in range(len(preds)):
        row = []
        for b in range(len(preds[0])):
            ok = i >= k and all(finite[j][b] for j in range(i - k, i + 1)) and len(
                {preds[j][b] for j in range(i - k, i + 1)}) == 1
            row.append(ok)
        out.append(row)
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_patience_against_loop_reference(k):
    from fallbackformer.gates.scores import patience

    g = torch.Generator().manual_seed(k)
    logits = [torch.randn(50, 3, generator=g) for _ in range(5)]
    # make agreement common: bias every exit toward a per-sample class
    bias = torch.nn.functional.one_hot(torch.randint(0, 3, (50,), generator=g), 3) * 2.0
    logits = [z + bias for z in logits]
    logits[2][0, 1] = float("nan")
    fired = patience(logits, k)
    assert all(f.dtype == torch.bool and f.shape == (50,) for f in fired)
    preds = [z.argmax(1).tolist() for z in logits]
    finite = [torch.isfinite(z).all(1).tolist() for z in logits]
    assert [f.tolist() for f in fired] == _patience_reference(preds, finite, k)
    with pytest.raises(ValueError, match="k must be >= 1"):
        patience(logits, 0)
