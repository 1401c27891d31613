"""MAPIE as an outside oracle for Learn-then-Test (mapie 1.6.0, ``mapie.risk_control``).

What is compared, on the same synthetic calibration sets, the same fixed grid, alpha and delta:

* p-values, exactly: ``mapie.risk_control.methods.compute_hoeffding_bentkus_p_value`` with
  ``binary=False`` is the Hoeffding-Bentkus p-value of LTT (our ``ltt_hb``); with ``binary=True``
  MAPIE uses the Bentkus term without the factor ``e`` (valid for a 0-1 loss, section 3.2 of LTT),
  and as the Hoeffding term is never below the exact tail, that is ``P(Binomial(n, alpha) <= k)``,
  our ``ltt_binom``. MAPIE takes the empirical risk ``k / n`` and the per-threshold count ``n``
  (its "conditional loss" form, the selective risk here).
* certified thresholds, under the same multiple-testing rule:
  ``mapie.risk_control.control_fwer(p, delta, "fixed_sequence")``.

What differs, and how the test handles it:

* Where the sequence starts. MAPIE's fixed sequence starts at index 0 of the array it is given;
  ours starts at the first grid threshold accepting ``min_accepted(alpha, delta)`` samples (a rule
  on the scores only, see :mod:`fallbackformer.gates.risk_control`). MAPIE is therefore given the
  p-values from our start onward; that start is checked separately (no threshold before it can
  have a p-value <= delta).
* MAPIE's ``ltt_procedure`` also checks that the empirical risk is monotone along the grid and
  warns, or reverses the order, otherwise; the selective risk on a finite sample is not monotone,
  so the test calls the two building blocks (p-values, ``control_fwer``) directly, with our order
  (most conservative threshold first), which is what fixed-sequence testing needs.
* MAPIE's default multiple-testing rule is Bonferroni-Holm, not fixed sequence, and its
  high-level ``BinaryClassificationController`` thresholds a positive-class probability; neither is
  our procedure, so neither is compared.
"""

import math

import numpy as np
import pytest
import torch

from fallbackformer.gates import risk_control as rc
from fallbackformer.gates.scores import max_softmax

mapie_rc = pytest.importorskip("mapie.risk_control", reason="mapie is the outside LTT oracle (test extra)")
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value  # noqa: E402

BINARY = {"ltt_hb": False, "ltt_binom": True}


def _calibration_set(seed: int, n: int = 3000):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    difficulty = torch.rand(n, 1, generator=g) * 6
    z = difficulty * torch.nn.functional.one_hot(y, 10).float() + 1.5 * torch.randn(n, 10, generator=g)
    return max_softmax(z), z.argmax(1) != y


def _mapie_pvalues(n: torch.Tensor, k: torch.Tensor, alpha: float, method: str) -> np.ndarray:
    """MAPIE's p-values where ``n > 0`` (NaN elsewhere: MAPIE needs an empirical risk)."""
    out = np.full(n.shape, np.nan)
    live = (n > 0).numpy()
    n_l, k_l = n.numpy()[live].astype(float), k.numpy()[live].astype(float)
    r_hat = k_l / n_l
    # MAPIE recovers k as ceil(n * r_hat); in float64 n * (k / n) can land one ulp above k and
    # the ceiling then reads k + 1 (a larger, conservative p-value). One ulp down restores k and
    # moves the Hoeffding term by ~1e-16 relative.
    up = np.ceil(n_l * r_hat) > k_l
    r_hat[up] = np.nextafter(r_hat[up], 0.0)
    assert np.array_equal(np.ceil(n_l * r_hat), k_l)
    out[live] = compute_hoeffding_bentkus_p_value(r_hat, n_l, alpha, binary=BINARY[method])[:, 0]
    return out


@pytest.mark.parametrize("method", ["ltt_hb", "ltt_binom"])
@pytest.mark.parametrize("alpha", [0.02, 0.05, 0.1])
def test_pvalues_and_thresholds_agree_with_mapie(method, alpha):
    delta = 0.1
    grid = rc.threshold_grid("max_softmax", 10)
    compared = 0
    for seed in range(5):
        s, err = _calibration_set(seed)
        thr, info = rc.ltt_threshold(s, err, alpha, delta, grid, method, return_info=True)
        n, k, ours = info["n"], info["k"], info["pvalues"].numpy()
        theirs = _mapie_pvalues(n, k, alpha, method)
        live = n.numpy() > 0
        big = live & (theirs > 1e-250)  # scipy's tail loses digits near underflow
        np.testing.assert_allclose(ours[big], theirs[big], rtol=1e-7, atol=0.0)
        assert np.all(ours[live & ~big] < 1e-240)
        assert np.all(ours[~live] == 1.0)
        compared += int(big.sum())

        start, last = int(info["start"]), int(info["last"])
        n_min = info["n_min"]
        # the start: the first threshold with n >= n_min; nothing before it could be rejected
        assert start == int(torch.nonzero(n >= n_min)[0])
        assert np.all(np.nan_to_num(theirs[:start], nan=1.0) > delta)
        rejected = mapie_rc.control_fwer(theirs[start:], delta, fwer_method="fixed_sequence")
        mapie_last = start + int(rejected.max()) if rejected.size else -1
        assert np.array_equal(rejected, np.arange(rejected.size))  # a fixed sequence: a prefix
        assert mapie_last == last, (seed, mapie_last, last)
        mapie_thr = float(grid[mapie_last]) if mapie_last >= 0 else math.inf
        assert float(thr) == mapie_thr and math.isfinite(mapie_thr)  # measured: 30/30 finite, equal
    assert compared > 1000  # measured: 12261 p-values per method, max relative difference 1.1e-12


def test_mapie_binary_pvalue_is_never_above_hb():
    """The ordering our power test relies on, seen through MAPIE alone."""
    s, err = _calibration_set(9)
    grid = rc.threshold_grid("max_softmax", 10)
    n, k = rc.acceptance_counts(s, err, grid)
    hb = _mapie_pvalues(n, k, 0.05, "ltt_hb")
    bi = _mapie_pvalues(n, k, 0.05, "ltt_binom")
    live = n.numpy() > 0
    assert np.all(bi[live] <= hb[live] * (1 + 1e-12))
