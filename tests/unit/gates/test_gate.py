"""ConfidenceGate: contract behaviour, config round trip, non-finite handling."""

import json
import math

import pytest
import torch

from fallbackformer.gates import ConfidenceGate


def _synthetic(n: int = 2000, c: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = 6 * torch.nn.functional.one_hot(y, c).float() + 2 * torch.randn(n, c, generator=g)  # [N, C]
    return z, y


@pytest.mark.parametrize("method", ["empirical", "ltt_binom", "ltt_hb", "crc"])
@pytest.mark.parametrize("score", ["max_softmax", "margin", "neg_entropy"])
def test_calibrate_and_round_trip(method, score):
    z, y = _synthetic()
    gate = ConfidenceGate.calibrate(z, y, alpha=0.05, delta=0.1, method=method, score=score)
    acc, conf = gate(z)
    assert acc.dtype == torch.bool and acc.shape == (2000,)
    assert conf.dtype == torch.float32 and conf.shape == (2000,)
    assert torch.equal(acc, gate.accept(z))
    assert torch.equal(acc, torch.isfinite(conf) & (conf >= gate.threshold))
    g = gate.guarantee
    assert (g.alpha, g.delta, g.method, g.n) == (0.05, 0.1, method, 2000)
    assert g.details["score"] == score and g.details["temperature"] == float(gate.temperature)
    assert g.satisfied and g.threshold == float(gate.threshold) and math.isfinite(g.threshold)
    assert g.coverage == pytest.approx(acc.float().mean().item())
    assert g.covers == {"clean_weight": 1.0, "corruptions": [], "severities": []}  # the calibration split
    assert "calibration split" in g.statement and f"<= {0.05:g}" in g.statement
    cfg = gate.to_config()
    text = json.dumps(cfg, allow_nan=False)
    assert len(text) < 20_000
    gate2 = ConfidenceGate.from_config(json.loads(text))
    assert torch.equal(gate2.accept(z), acc)
    assert gate2.guarantee.threshold == pytest.approx(g.threshold)
    assert gate2.guarantee == g  # the typed guarantee survives its JSON form
    assert 0 < gate.reference_scores.numel() <= 512
    assert torch.all(gate.reference_scores[1:] >= gate.reference_scores[:-1])


def test_nonfinite_rows_are_nan_and_rejected():
    z, y = _synthetic(500)
    gate = ConfidenceGate.calibrate(z, y, method="empirical")
    z = z.clone()
    z[0, 3] = float("nan")
    z[1, 0] = float("inf")
    z[2, 5] = -float("inf")
    acc, conf = gate(z)
    assert torch.isnan(conf[:3]).all()
    assert not acc[:3].any()
    assert torch.isfinite(conf[3:]).all()


def test_infinite_threshold_accepts_nothing():
    z, _ = _synthetic(100)
    gate = ConfidenceGate()
    assert math.isinf(float(gate.threshold))
    assert not gate.accept(z).any()
    cfg = json.loads(json.dumps(gate.to_config(), allow_nan=False))
    assert not ConfidenceGate.from_config(cfg).accept(z).any()


def test_unreachable_alpha_gives_inf_threshold_with_reason():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (300,), generator=g)
    z = torch.randn(300, 10, generator=g)  # pure noise: 90% error at every threshold
    gate = ConfidenceGate.calibrate(z, y, alpha=0.01, delta=0.1, method="ltt_hb")
    assert math.isinf(float(gate.threshold))
    assert gate.guarantee.satisfied is False
    assert "accepts nothing" in gate.guarantee.reason
    assert not gate.accept(z).any()


def test_default_is_ltt_binom_and_a_stored_ltt_hb_gate_still_loads():
    z, y = _synthetic(2000)
    gate = ConfidenceGate.calibrate(z, y, alpha=0.05, delta=0.1)
    hb = ConfidenceGate.calibrate(z, y, alpha=0.05, delta=0.1, method="ltt_hb")
    assert gate.guarantee.method == "ltt_binom" and "exact binomial" in gate.guarantee.reason
    assert float(gate.threshold) <= float(hb.threshold)  # the exact tail is never more conservative
    back = ConfidenceGate.from_config(json.loads(json.dumps(hb.to_config(), allow_nan=False)))
    assert back.guarantee.method == "ltt_hb" and torch.equal(back.accept(z), hb.accept(z))


def test_state_dict_holds_temperature_and_threshold():
    z, y = _synthetic(500)
    gate = ConfidenceGate.calibrate(z, y, method="empirical")
    sd = gate.state_dict()
    assert set(sd) == {"temperature", "threshold"}
    fresh = ConfidenceGate()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.accept(z), gate.accept(z))


def test_bad_arguments_name_the_value():
    z, y = _synthetic(100)
    with pytest.raises(ValueError, match=r"unknown method 'foo'.*'ltt_binom', 'ltt_hb', 'crc', 'empirical'"):
        ConfidenceGate.calibrate(z, y, method="foo")
    with pytest.raises(ValueError, match="unknown score 'bar'"):
        ConfidenceGate.calibrate(z, y, score="bar")
    with pytest.raises(ValueError, match="alpha"):
        ConfidenceGate.calibrate(z, y, alpha=1.5)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        ConfidenceGate().confidence(torch.zeros(3))
    with pytest.raises(ValueError, match="score_train"):
        ConfidenceGate.calibrate(z, y, score="learned")


def test_gates_import_stays_light():
    """gates must import with torch, numpy and safetensors only (inference from a bundle)."""
    import subprocess
    import sys

    code = (
        "import sys, fallbackformer.gates, fallbackformer.gates.system, fallbackformer.gates.drift, "
        "fallbackformer.gates.learned\n"
        "heavy = [m for m in ('torchmetrics', 'scipy', 'matplotlib', 'sklearn', 'lightning', 'hydra', 'netcal') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"gates pulled in heavy modules: {out.stdout.strip()}"
