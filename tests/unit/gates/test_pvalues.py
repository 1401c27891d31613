"""P-values for Learn-then-Test: the exact binomial tail against scipy, its edges, its order
relative to Hoeffding-Bentkus, and the smallest certifiable count for both methods."""

import math

import pytest
import torch

from fallbackformer.gates import pvalues as pv

binom = pytest.importorskip("scipy.stats", reason="scipy provides the independent binomial reference").binom


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.2, 0.5, 0.9])
def test_binom_pvalue_matches_scipy_on_a_grid(alpha):
    ns = [0, 1, 2, 7, 45, 100, 999, 10_000, 100_000]
    k_list, n_list = [], []
    for n in ns:
        mean, sd = n * alpha, math.sqrt(n * alpha * (1 - alpha))
        ks = {0, 1, n // 2, n - 1, n} | {round(mean + z * sd) for z in (-8, -3, -1, 0, 1, 3, 8)}
        ks |= {round(f * n) for f in (0.001, 0.01, 0.1, 0.3, 0.9)}
        for k in sorted(x for x in ks if 0 <= x <= n):
            k_list.append(k)
            n_list.append(n)
    k, n = torch.tensor(k_list), torch.tensor(n_list)
    ours = pv.binom_pvalue(k, n, alpha)
    ref = torch.tensor(binom.cdf(k.numpy(), n.numpy(), alpha), dtype=torch.float64)
    tiny = ref < 1e-250  # scipy's own tail loses digits near underflow (see the exact test below)
    assert torch.allclose(ours[~tiny], ref[~tiny], rtol=1e-8, atol=0.0)
    assert (ours[tiny] < 1e-240).all()
    assert (~tiny).sum() > 0.5 * len(k_list)


def test_binom_pvalue_random_pairs_match_scipy():
    g = torch.Generator().manual_seed(11)
    n = torch.randint(0, 3000, (2000,), generator=g)
    k = (torch.rand(2000, generator=g) * (n + 1).double()).long().clamp(max=n)
    for alpha in (0.02, 0.3):
        ours = pv.binom_pvalue(k, n, alpha)
        ref = torch.tensor(binom.cdf(k.numpy(), n.numpy(), alpha), dtype=torch.float64)
        keep = ref > 1e-250
        assert torch.allclose(ours[keep], ref[keep], rtol=1e-9, atol=0.0)


def test_binom_pvalue_exact_rational_reference():
    """Exact sums in rational arithmetic (alpha as the float it is), including tails near 1e-285
    where scipy 1.x is off by 1e-5 relative and ours is not."""
    from fractions import Fraction

    for k, n, alpha in [(14, 2029, 0.3), (36, 2424, 0.02), (0, 45, 0.05), (3, 10, 0.5), (900, 1000, 0.9)]:
        a = Fraction(alpha)  # a = num / den exactly; sum in integers, divide once
        num, den = a.numerator, a.denominator
        total = sum(math.comb(n, j) * num**j * (den - num) ** (n - j) for j in range(k + 1))
        exact = float(Fraction(total, den**n))
        assert float(pv.binom_pvalue(torch.tensor(k), torch.tensor(n), alpha)) == pytest.approx(exact, rel=1e-10)


def test_binom_pvalue_edges_and_shape():
    assert float(pv.binom_pvalue(torch.tensor(0), torch.tensor(0), 0.05)) == 1.0  # n = 0: no evidence
    assert float(pv.binom_pvalue(torch.tensor(7), torch.tensor(7), 0.05)) == 1.0
    assert float(pv.binom_pvalue(torch.tensor(0), torch.tensor(45), 0.05)) == pytest.approx(0.95**45, rel=1e-12)
    out = pv.binom_pvalue(torch.zeros(3, 4, dtype=torch.long), torch.full((3, 4), 10), 0.1)
    assert out.shape == (3, 4) and out.dtype == torch.float64
    with pytest.raises(ValueError, match="k=5, n=3"):
        pv.binom_pvalue(torch.tensor([0, 5]), torch.tensor([1, 3]), 0.1)
    with pytest.raises(ValueError, match="alpha"):
        pv.binom_pvalue(torch.tensor(0), torch.tensor(3), 1.0)


def test_binom_is_never_above_hb():
    g = torch.Generator().manual_seed(12)
    n = torch.randint(0, 5000, (5000,), generator=g)
    k = (torch.rand(5000, generator=g) * 0.2 * n.double()).long()
    for alpha in (0.01, 0.05, 0.1):
        b, h = pv.binom_pvalue(k, n, alpha), pv.hb_pvalue(k, n, alpha)
        assert (b <= h * (1 + 1e-9)).all()
        live = (n > 50) & (k >= 1) & (k < 0.5 * alpha * n)  # at k = 0 both are (1 - alpha)^n
        assert (b[live] < h[live]).all()  # strictly more powerful where it matters


def test_ltt_pvalues_dispatch_and_unknown_method():
    k, n = torch.tensor([0, 3, 10]), torch.tensor([100, 200, 100])
    assert torch.equal(pv.ltt_pvalues(k, n, 0.05, "ltt_binom"), pv.binom_pvalue(k, n, 0.05))
    assert torch.equal(pv.ltt_pvalues(k, n, 0.05, "ltt_hb"), pv.hb_pvalue(k, n, 0.05))
    with pytest.raises(ValueError, match=r"'crc'.*\['ltt_binom', 'ltt_hb'\]"):
        pv.ltt_pvalues(k, n, 0.05, "crc")
    with pytest.raises(ValueError, match="ltt_binom"):
        pv.min_accepted(0.05, 0.1, "bonferroni")


@pytest.mark.parametrize("method", ["ltt_binom", "ltt_hb"])
def test_min_accepted_is_tight(method):
    for alpha, delta in [(0.05, 0.1), (0.01, 0.05), (0.2, 0.01), (0.001, 0.2), (0.3, 0.5)]:
        m = pv.min_accepted(alpha, delta, method)
        assert m == max(1, math.ceil(math.log(delta) / math.log(1 - alpha) - 1e-12))
        assert float(pv.ltt_pvalues(torch.tensor(0), torch.tensor(m), alpha, method)) <= delta
        if m > 1:
            assert float(pv.ltt_pvalues(torch.tensor(0), torch.tensor(m - 1), alpha, method)) > delta
    assert pv.min_accepted(0.05, 0.1, "ltt_binom") == pv.hb_min_samples(0.05, 0.1) == 45
