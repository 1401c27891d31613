"""Metrics against brute-force references (AURC to 1e-9, ECE against a loop and against netcal)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fallbackformer.evaluation import metrics as M


def _aurc_loop(conf: list[float], correct: list[bool]) -> float:
    """Textbook AURC of one fixed order (highest confidence first; stable for ties)."""
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    errors, total = 0, 0.0
    for k, i in enumerate(order, start=1):
        errors += not correct[i]
        total += errors / k
    return total / len(conf)


def _aurc_all_tie_orders(conf: list[float], correct: list[bool]) -> float:
    """Average of the textbook AURC over every ordering inside each tied group (brute force)."""
    groups: dict[float, list[int]] = {}
    for i, c in enumerate(conf):
        groups.setdefault(c, []).append(i)
    keys = sorted(groups, reverse=True)
    vals = []
    for perms in itertools.product(*(itertools.permutations(groups[k]) for k in keys)):
        order = [i for p in perms for i in p]
        errors, total = 0, 0.0
        for k, i in enumerate(order, start=1):
            errors += not correct[i]
            total += errors / k
        vals.append(total / len(order))
    return sum(vals) / len(vals)


def test_aurc_no_ties_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 17, 500):
        conf = torch.rand(n, generator=g, dtype=torch.float64)
        ok = torch.rand(n, generator=g) < 0.7
        assert M.aurc(conf, ok) == pytest.approx(_aurc_loop(conf.tolist(), ok.tolist()), abs=1e-9)


def test_aurc_with_ties_matches_enumeration() -> None:
    rng = np.random.default_rng(1)
    for _ in range(25):
        n = int(rng.integers(2, 9))
        conf = rng.choice([0.2, 0.5, 0.9], size=n).tolist()  # many ties
        ok = (rng.random(n) < 0.6).tolist()
        got = M.aurc(torch.tensor(conf), torch.tensor(ok))
        assert got == pytest.approx(_aurc_all_tie_orders(conf, ok), abs=1e-9)


def test_aurc_edge_cases() -> None:
    assert M.aurc(torch.tensor([0.3, 0.3]), torch.tensor([True, False])) == pytest.approx((0.5 + 0.5) / 2)
    assert math.isnan(M.aurc(torch.tensor([]), torch.tensor([], dtype=torch.bool)))
    ok = torch.tensor([True, False, True, True, False])
    assert M.aurc(ok.double(), ok) == pytest.approx(M.aurc_optimal(ok), abs=1e-12)
    assert M.e_aurc(ok.double(), ok) == pytest.approx(0.0, abs=1e-12)
    assert M.aurc(torch.tensor([1.0, -math.inf]), torch.tensor([True, False])) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="NaN"):
        M.aurc(torch.tensor([math.nan]), torch.tensor([True]))
    with pytest.raises(ValueError, match="same length"):
        M.aurc(torch.rand(3), torch.ones(2, dtype=torch.bool))


def test_risk_coverage_curve_matches_loop() -> None:
    conf = torch.tensor([0.9, 0.5, 0.9, 0.1, 0.5, 0.7])
    ok = torch.tensor([True, False, False, True, True, True])
    cov, risk, thr = M.risk_coverage_curve(conf, ok)
    for c, r, t in zip(cov.tolist(), risk.tolist(), thr.tolist()):
        acc = conf >= t
        assert c == pytest.approx(M.coverage(acc))
        assert r == pytest.approx(M.selective_risk(ok, acc))
    assert thr.tolist() == pytest.approx([0.9, 0.7, 0.5, 0.1])


def _ece_loop(conf: list[float], correct: list[bool], n_bins: int = 15) -> float:
    """Bins [b/n, (b+1)/n) plus a separate bin for exactly 1.0 (torchmetrics' convention)."""
    bins: dict[int, list[int]] = {}
    for i, c in enumerate(conf):
        b = n_bins if c >= 1.0 else int(math.floor(c * n_bins))
        # guard float edges exactly like bucketize on linspace boundaries
        edges = np.linspace(0, 1, n_bins + 1)
        b = n_bins if c >= 1.0 else int(np.searchsorted(edges, c, side="right") - 1)
        bins.setdefault(b, []).append(i)
    total = 0.0
    for idx in bins.values():
        acc = sum(correct[i] for i in idx) / len(idx)
        cf = sum(conf[i] for i in idx) / len(idx)
        total += abs(acc - cf) * len(idx) / len(conf)
    return total


def test_ece_matches_loop_and_netcal() -> None:
    from netcal.metrics import ECE

    g = torch.Generator().manual_seed(2)
    conf = torch.rand(2000, generator=g, dtype=torch.float64) * 0.6 + 0.4
    conf[:50] = 1.0
    ok = torch.rand(2000, generator=g, dtype=torch.float64) < conf * 0.9
    assert M.ece(conf, ok) == pytest.approx(_ece_loop(conf.tolist(), ok.tolist()), abs=1e-9)
    inner = conf < 1.0  # netcal closes the last bin: compare away from 1.0
    ref = ECE(bins=15).measure(conf[inner].numpy(), ok[inner].numpy().astype(int))
    assert M.ece(conf[inner], ok[inner]) == pytest.approx(float(ref), abs=1e-6)


def test_ece_from_logits_agrees_with_top_label() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (300,), generator=g)
    p = torch.softmax(logits / 1.7, dim=1)
    conf, pred = p.max(dim=1)
    assert M.ece_from_logits(logits, y, temperature=1.7) == pytest.approx(M.ece(conf, pred == y), abs=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.ece(torch.tensor([1.5]), torch.tensor([True]))


def _brute_ece(conf, correct, n_bins: int, binning: str) -> float:
    """Loop reference ECE (numpy, no shared code); width bins ``(b/n, (b+1)/n]``, the first holding 0."""
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    n = len(conf)
    if binning == "width":
        groups = [[i for i in range(n) if (conf[i] > b / n_bins or (b == 0 and conf[i] >= 0)) and conf[i] <= (b + 1) / n_bins]
                  for b in range(n_bins)]
    else:
        order = np.argsort(conf, kind="stable")
        groups = [[int(order[j]) for j in range(n) if j * n_bins // n == b] for b in range(n_bins)]
    return sum(len(sel) / n * abs(correct[sel].mean() - conf[sel].mean()) for sel in groups if sel)


def test_ece_is_torchmetrics_calibration_error() -> None:
    """The one ECE against torchmetrics' stateful metric, fed in uneven batches (another code path)."""
    from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1000, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (1000,), generator=g)
    conf, pred = torch.softmax(logits, dim=1).max(dim=1)
    binary, multi = BinaryCalibrationError(n_bins=15, norm="l1"), MulticlassCalibrationError(10, n_bins=15, norm="l1")
    for a, b in ((0, 17), (17, 400), (400, 1000)):
        binary.update(conf[a:b], (pred[a:b] == y[a:b]).long())
        multi.update(torch.softmax(logits[a:b], dim=1), y[a:b])
    assert M.ece(conf, pred == y) == pytest.approx(float(binary.compute()), abs=1e-12)
    assert M.ece_from_logits(logits, y) == pytest.approx(float(multi.compute()), abs=1e-12)
    edges = torch.tensor([0.0, 1 / 15, 2 / 15, 0.5, 14 / 15, 1.0], dtype=torch.float64)  # on the bin edges
    ok = torch.tensor([True, False, True, True, False, True])
    binary.reset()
    binary.update(edges, ok.long())
    assert M.ece(edges, ok) == pytest.approx(float(binary.compute()), abs=1e-12)


def test_equal_mass_ece_against_brute_force() -> None:
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(400, 5, generator=g, dtype=torch.float64) * 2, dim=1)
    y = torch.randint(0, 5, (400,), generator=g)
    conf, pred = p.max(dim=1)
    ref = _brute_ece(conf.numpy(), (pred == y).numpy(), 10, "mass")
    assert M.ece(conf, pred == y, n_bins=10, binning="mass") == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="binning"):
        M.ece(conf, pred == y, binning="quantile")


def test_classwise_ece_against_brute_force() -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.randn(300, 4, generator=g) * 2
    y = torch.randint(0, 4, (300,), generator=g)
    p = torch.softmax(z.double(), 1).numpy()
    ref = np.mean([_brute_ece(p[:, c], (y.numpy() == c), 15, "width") for c in range(4)])
    assert M.classwise_ece(z, y) == pytest.approx(ref, abs=1e-12)
    z[0, 0] = float("nan")  # a non-finite row is left out
    p = torch.softmax(z[1:].double(), 1).numpy()
    ref = np.mean([_brute_ece(p[:, c], (y[1:].numpy() == c), 15, "width") for c in range(4)])
    assert M.classwise_ece(z, y) == pytest.approx(ref, abs=1e-12)


def test_calibration_bins() -> None:
    conf = torch.tensor([0.0, 0.05, 0.5, 1.0, 0.999])
    ok = torch.tensor([False, True, True, True, False])
    b = M.calibration_bins(conf, ok, n_bins=10)
    assert b["count"].sum() == 5 and b["count"][0] == 2 and b["count"][9] == 2
    assert b["accuracy"][9] == 0.5 and math.isnan(b["accuracy"][3])


def test_selective_and_basic() -> None:
    ok = torch.tensor([True, False, True, False])
    acc = torch.tensor([True, True, False, False])
    assert M.selective_risk(ok, acc) == 0.5
    assert math.isnan(M.selective_risk(ok, torch.zeros(4, dtype=torch.bool)))
    assert M.coverage(acc) == 0.5
    assert M.accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 0])) == pytest.approx(2 / 3)
    assert M.accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == 0.5
    with pytest.raises(ValueError, match="boolean"):
        M.selective_risk(torch.tensor([0.5]), torch.tensor([True]))


def test_risk_bounds_against_scipy() -> None:
    from scipy.stats import binom

    u = M.risk_upper_bound(3, 100, delta=0.1)
    assert binom.cdf(3, 100, u) == pytest.approx(0.1, abs=1e-9)
    lo = M.risk_lower_bound(12, 100, delta=0.1)
    assert binom.sf(11, 100, lo) == pytest.approx(0.1, abs=1e-9)
    assert M.risk_lower_bound(0, 10) == 0.0 and M.risk_upper_bound(10, 10) == 1.0


def test_mce_and_relative_drop() -> None:
    errors = {"rotate/1": 0.1, "rotate/2": 0.3, "fog/1": 0.2, "fog/2": 0.2}
    base = {"rotate/1": 0.2, "rotate/2": 0.6, "fog/1": 0.4, "fog/2": 0.4}
    assert M.corruption_errors(errors) == pytest.approx({"rotate": 0.2, "fog": 0.2})
    assert M.mean_corruption_error(errors) == pytest.approx(0.2)
    assert M.mean_corruption_error(errors, base) == pytest.approx(0.5)
    rel = M.relative_corruption_errors(errors, 0.05, base, 0.1)
    assert rel["rotate"] == pytest.approx((0.05 + 0.25) / (0.1 + 0.5))
    assert M.relative_drop(0.9, [0.8, 0.7]) == pytest.approx(0.15 / 0.9)
    with pytest.raises(ValueError, match="severities"):
        M.mean_corruption_error(errors, {"rotate/1": 0.2})
    with pytest.raises(ValueError, match="corruption>/<severity"):
        M.mean_corruption_error({"clean": 0.1})
