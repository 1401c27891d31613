"""System calibration: the cascade simulation against a brute-force runtime rule, and the
statistical acceptance of the system guarantee over 1000 random calibration splits."""

import math

import pytest
import torch

from fallbackformer.gates import ConfidenceGate, calibrate_system
from fallbackformer.gates import risk_control as rc
from fallbackformer.gates.scores import max_softmax
from fallbackformer.gates.temperature import fit_temperature
from fallbackformer.gates.system import cascade_counts, cascade_served, system_thresholds

S = 1000




def _cascade_logits(m: int, seed: int, c: int = 10):
    """Exits of growing strength sharing a per-sample difficulty, plus a mid-strength student."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (m,), generator=g)
    onehot = torch.nn.functional.one_hot(y, c).float()
    ease = torch.rand(m, 1, generator=g)  # shared difficulty
    exits = [s * ease * onehot + 1.5 * torch.randn(m, c, generator=g) for s in (4.0, 6.0, 8.0, 10.0)]
    student = 7.0 * ease * onehot + 1.5 * torch.randn(m, c, generator=g)
    return exits, student, y


def test_cascade_counts_brute_force():
    g = torch.Generator().manual_seed(0)
    conf = (torch.rand(2, 4, 80, generator=g) * 10).round() / 10  # ties across gates on purpose
    conf[0, 1, :7] = float("nan")
    errors = torch.rand(2, 4, 80, generator=g) < 0.4
    grid = torch.linspace(1.05, -0.05, 23)
    n, k = cascade_counts(conf, errors, grid)
    _, k_env = cascade_counts(conf, errors, grid, envelope=True)
    for s in range(2):
        values = conf[s][torch.isfinite(conf[s])].unique()
        for j, lam in enumerate(grid):
            served = cascade_served(conf[s], lam)  # [N], 4 = default
            ok = served < 4
            wrong = errors[s].gather(0, served.clamp(max=3)[None])[0] & ok
            assert n[s, j] == ok.sum() and k[s, j] == wrong.sum()
            env = wrong.clone()
            for v in values[values >= lam]:
                sv = cascade_served(conf[s], v)
                env |= errors[s].gather(0, sv.clamp(max=3)[None])[0] & (sv < 4)
            assert k_env[s, j] == env.sum()


def test_calibrate_system_matches_runtime_rule():
    exits, student, y = _cascade_logits(3000, seed=1)
    gates = calibrate_system(exits, student, y, alpha=0.05, delta=0.1)
    assert [g.guarantee.details["name"] for g in gates] == ["exit_1", "exit_2", "exit_3", "primary", "student"]
    thr = {float(g.threshold) for g in gates}
    assert len(thr) == 1 and math.isfinite(thr.pop())
    # the runtime rule: first gate that accepts serves; else the default
    all_logits = exits + [student]
    acc = torch.stack([g.accept(z) for g, z in zip(gates, all_logits)])  # [M, N]
    first = torch.where(acc, torch.arange(5)[:, None], torch.full_like(acc, 5, dtype=torch.long)).min(0).values
    for i, g in enumerate(gates):
        assert g.guarantee.coverage == pytest.approx((first == i).double().mean().item())
        assert g.guarantee.details["scope"] == "system" and g.guarantee.satisfied
        assert g.guarantee.method == "ltt_binom" and "exact binomial" in g.guarantee.reason
        assert ConfidenceGate.from_config(g.to_config()).guarantee == g.guarantee
    served = first < 5
    preds = torch.stack([z.argmax(1) for z in all_logits]).gather(0, first.clamp(max=4)[None])[0]
    risk = (preds != y)[served].double().mean().item()
    assert gates[0].guarantee.details["system_selective_risk_cal"] == pytest.approx(risk)
    assert gates[0].guarantee.details["system_coverage_cal"] == pytest.approx(served.double().mean().item())
    # the deadline-robust path is more conservative than the full cascade alone
    plain = calibrate_system(exits, student, y, alpha=0.05, delta=0.1, deadline_robust=False)
    assert float(plain[0].threshold) <= float(gates[0].threshold)


def test_calibrate_system_unreachable_accepts_nothing():
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 10, (400,), generator=g)
    noise = [torch.randn(400, 10, generator=g) for _ in range(3)]
    gates = calibrate_system(noise[:2], noise[2], y, alpha=0.02, delta=0.1)
    for gate in gates:
        assert math.isinf(float(gate.threshold))
        assert gate.guarantee.satisfied is False
        assert "accept nothing" in gate.guarantee.reason


def test_calibrate_system_bad_input_names_value():
    exits, student, y = _cascade_logits(100, seed=3)
    with pytest.raises(ValueError, match="logits #1"):
        calibrate_system([exits[0], exits[1][:50]], student, y)
    with pytest.raises(ValueError, match="temperatures"):
        calibrate_system(exits, student, y, temperatures=[1.0])


@pytest.fixture(scope="module")
def cascade_pool():
    exits, student, y = _cascade_logits(100_000, seed=4)
    all_logits = exits + [student]
    # temperatures fitted once on a separate draw: a fixed score function for every split
    fit_exits, fit_student, fit_y = _cascade_logits(5000, seed=40)
    temps = [fit_temperature(z, fit_y) for z in fit_exits + [fit_student]]
    conf = torch.stack([max_softmax(z / t) for z, t in zip(all_logits, temps)])  # [M, N]
    errors = torch.stack([z.argmax(1) != y for z in all_logits])
    return conf, errors


@pytest.mark.parametrize("robust", [True, False])
def test_system_ltt_guarantee_over_random_splits(cascade_pool, robust):
    """Both p-values on the same 1000 splits: each valid; the exact binomial tail never certifies
    a higher lambda than Hoeffding-Bentkus and serves more of the population."""
    conf, errors = cascade_pool
    alpha, delta, n_cal = 0.05, 0.1, 1000
    grid = rc.threshold_grid("max_softmax", 10)
    m = conf.shape[0]
    cascades = [list(range(j)) + [m - 1] for j in range(m)] if robust else [list(range(m))]
    pop = [cascade_counts(conf[c], errors[c], grid) for c in cascades]  # exact population counts
    idx = torch.randint(0, conf.shape[1], (S, n_cal), generator=torch.Generator().manual_seed(5))
    served = {}
    lams = {}
    for method in ("ltt_binom", "ltt_hb"):
        lam = system_thresholds(conf[:, idx].transpose(0, 1), errors[:, idx].transpose(0, 1), alpha, delta,
                                method, grid, deadline_robust=robust)
        fin = torch.isfinite(lam)
        gi = torch.searchsorted(-grid.double(), -lam).clamp(max=grid.numel() - 1)
        worst = torch.zeros(S, dtype=torch.float64)
        for n_pop, k_pop in pop:
            worst = torch.maximum(worst, k_pop[gi].double() / n_pop[gi].clamp(min=1))
        worst = torch.where(fin, worst, torch.zeros_like(worst))
        violations = (worst > alpha).double().mean().item()
        assert violations <= delta + 3 * math.sqrt(delta * (1 - delta) / S), (method, violations)
        assert fin.double().mean() >= 0.9
        n_full, _ = pop[-1]
        served[method] = torch.where(fin, n_full[gi].double(), torch.zeros(S, dtype=torch.float64)) / conf.shape[1]
        assert served[method].mean() > 0.2
        lams[method] = lam
    assert (lams["ltt_binom"] <= lams["ltt_hb"]).all()
    assert (lams["ltt_binom"] < lams["ltt_hb"]).double().mean() >= 0.5
    gain = (served["ltt_binom"] - served["ltt_hb"]).mean().item()
    # measured (seed 5): robust coverage 0.653 vs 0.636, violations 0.059 vs 0.014;
    # full cascade only 0.673 vs 0.663, violations 0.083 vs 0.026
    assert gain >= 0.005, gain


def test_system_crc_mean_risk_over_random_splits(cascade_pool):
    conf, errors = cascade_pool
    alpha, n_cal = 0.05, 1000
    grid = rc.threshold_grid("max_softmax", 10)
    idx = torch.randint(0, conf.shape[1], (S, n_cal), generator=torch.Generator().manual_seed(6))
    lam = system_thresholds(conf[:, idx].transpose(0, 1), errors[:, idx].transpose(0, 1), alpha, 0.1,
                            "crc", grid, deadline_robust=False)
    _, k_pop = cascade_counts(conf, errors, grid)  # the actual loss, not its envelope
    gi = torch.searchsorted(-grid.double(), -lam).clamp(max=grid.numel() - 1)
    joint = torch.where(torch.isfinite(lam), k_pop[gi].double() / conf.shape[1], torch.zeros(S, dtype=torch.float64))
    assert joint.mean().item() <= alpha + 3 * joint.std().item() / math.sqrt(S)
