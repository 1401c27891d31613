"""The learned score: trained on a split disjoint from calibration, JSON round trip, usefulness."""

import json

import pytest
import torch

from fallbackformer.gates import ConfidenceGate, LearnedScore
from fallbackformer.gates.scores import max_softmax


def _split(n: int, seed: int):
    """A 5-class synthetic model with a per-sample difficulty."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    ease = torch.rand(n, 1, generator=g) * 6
    z = ease * torch.nn.functional.one_hot(y, 5).float() + 1.5 * torch.randn(n, 5, generator=g)
    return z, y


def test_fit_is_deterministic_and_round_trips():
    z, y = _split(2000, 0)
    a = LearnedScore.fit(z, y, seed=0)
    b = LearnedScore.fit(z, y, seed=0)
    assert torch.equal(a(z), b(z))
    c = LearnedScore.from_config(json.loads(json.dumps(a.to_config())))
    assert torch.allclose(c(z), a(z))
    p = a(z)
    assert ((p >= 0) & (p <= 1)).all()
    zz = z[:3].clone()
    zz[1, 2] = float("nan")
    assert torch.isnan(a(zz)[1]) and torch.isfinite(a(zz)[[0, 2]]).all()


def test_learned_score_predicts_correctness():
    z_tr, y_tr = _split(3000, 1)
    z_te, y_te = _split(3000, 2)
    score = LearnedScore.fit(z_tr, y_tr, hidden=0)  # logistic
    p = score(z_te)
    correct = (z_te.argmax(1) == y_te).float()
    # calibrated on average, and ranks correct answers above wrong ones
    assert abs(p.mean().item() - correct.mean().item()) < 0.03
    assert p[correct.bool()].mean() > p[~correct.bool()].mean() + 0.2


def test_gate_with_learned_score():
    z_tr, y_tr = _split(2000, 3)
    z_cal, y_cal = _split(2000, 4)
    gate = ConfidenceGate.calibrate(z_cal, y_cal, alpha=0.05, delta=0.1, score="learned", score_train=(z_tr, y_tr))
    assert gate.score == "learned" and gate.guarantee.satisfied
    again = ConfidenceGate.from_config(json.loads(json.dumps(gate.to_config(), allow_nan=False)))
    assert torch.equal(again.accept(z_cal), gate.accept(z_cal))
    # a state_dict written by the gate loads into a gate rebuilt from its config
    again.load_state_dict(gate.state_dict())
    with pytest.raises(ValueError, match="learned"):
        ConfidenceGate(score="learned")
    assert max_softmax(z_cal).shape == gate.confidence(z_cal).shape
