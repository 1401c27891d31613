"""The router: evidence features, the Mahalanobis score, fitting, config round trip, and its guarantee
tested statistically over many random calibration/test splits."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from fallbackformer.gates.evidence import Evidence, MahalanobisScore, feature_width, logit_stats, path_features
from fallbackformer.gates.router import Router
from fallbackformer.gates.router_calibration import (
    RouterProbabilities,
    cascade_counts,
    certified_index,
    certify,
    router_grid,
)


def _evidence(n: int = 64, c: int = 5, e: int = 3, seed: int = 0) -> Evidence:
    g = torch.Generator().manual_seed(seed)
    return Evidence(
        [torch.randn(n, c, generator=g) * 3 for _ in range(e)],
        [torch.rand(n, generator=g) for _ in range(e)],
        torch.randn(n, c, generator=g) * 3,
    )


def test_feature_widths_match_the_features():
    ev = _evidence()
    for pos in [0, 1, 2, "student", "student_alone"]:
        assert path_features(ev, pos).shape == (64, feature_width(pos, 3))


def test_logit_stats_against_a_loop():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    top, margin, ent = logit_stats(logits)
    p = torch.softmax(logits, -1)
    assert top[0] == pytest.approx(float(p[0].max()))
    assert margin[0] == pytest.approx(float(p[0, 0] - p[0, 1]))
    assert ent[1] == pytest.approx(1.0, abs=1e-6)  # uniform: normalised entropy 1
    assert ent[0] == pytest.approx(float(-(p[0] * p[0].log()).sum() / math.log(3)), abs=1e-6)


def test_mahalanobis_against_brute_force():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(200, 2, 3, 3, generator=g)  # [N, C, H, W] stage outputs
    labels = torch.randint(0, 4, (200,), generator=g)
    score = MahalanobisScore.fit(feats.mean(dim=(2, 3)), labels, 4)
    f = feats.mean(dim=(2, 3))
    brute = torch.tensor([
        min(float((f[i] - score.means[c]) @ score.precision @ (f[i] - score.means[c])) for c in range(4))
        for i in range(200)])
    assert torch.allclose(score(feats), torch.log1p(brute), atol=1e-4)
    far = feats + 25.0
    assert bool((score(far) > score(feats).max()).all())  # far from every class: a large score


def _fitted_router(seed: int = 0) -> tuple[Router, Evidence, torch.Tensor]:
    """A fresh copy of one fitted router (fitted once per seed: each test may certify its own copy)."""
    router, ev, labels = _fit_router_once(seed)
    return copy.deepcopy(router), ev, labels


@functools.lru_cache(maxsize=None)
def _fit_router_once(seed: int) -> tuple[Router, Evidence, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, c, e = 600, 4, 3
    labels = torch.randint(0, c, (n,), generator=g)
    hard = torch.rand(n, generator=g)  # per-sample difficulty: easy samples are right and confident

    def logits_for(noise: float) -> torch.Tensor:
        z = torch.randn(n, c, generator=g) * (0.5 + 3 * hard[:, None]) * noise
        z[torch.arange(n), labels] += 3.0
        return z

    ev = Evidence([logits_for(1.2 - 0.2 * k) for k in range(e)], [hard + 0.1 * torch.rand(n, generator=g) for _ in range(e)],
                  logits_for(1.1))
    router = Router(e, c, [2, 2, 2], hidden=8)
    router.fit(ev, labels)
    return router, ev, labels


def test_router_fits_and_round_trips_through_its_config():
    router, ev, labels = _fitted_router()
    certify(router, ev, labels, alpha=0.1, delta=0.1, covers={"clean_weight": 1.0, "corruptions": [], "severities": []})
    assert router.guarantee.satisfied
    again = Router.from_config(router.to_config(), router.state_dict())
    for k in range(2):
        a1, c1, p1 = router.decide_exit(ev, k)
        a2, c2, p2 = again.decide_exit(ev, k)
        assert torch.equal(a1, a2) and torch.equal(p1, p2) and torch.allclose(c1, c2)
    assert all(torch.equal(u, v) for u, v in zip(router.decide_final(ev), again.decide_final(ev)))
    # the scorers learned something: wrong answers get lower probabilities than right ones
    p = router.exit_probability(ev, 2)
    right = ev.exit_logits[2].argmax(-1) == labels
    assert float(p[right].mean().detach()) > float(p[~right].mean().detach()) + 0.1


def test_router_never_accepts_non_finite_evidence():
    router, ev, labels = _fitted_router()
    certify(router, ev, labels, alpha=0.2, delta=0.1, covers={})
    logits = [t.clone() for t in ev.exit_logits]
    logits[0][:5] = float("nan")
    accept, conf, _ = router.decide_exit(Evidence(logits, ev.feature_scores, ev.student_logits), 0)
    assert not bool(accept[:5].any()) and bool(torch.isnan(conf[:5]).all())


def test_unfitted_or_uncertifiable_router_answers_nothing():
    router, ev, labels = _fitted_router()
    assert math.isinf(float(router.threshold))
    certify(router, ev.select(torch.arange(10)), labels[:10], alpha=0.01, delta=0.1, covers={})
    assert not router.guarantee.satisfied and math.isinf(float(router.threshold))
    assert "answers nothing" in router.guarantee.reason


def _synthetic_probs(s: int, n: int, e1: int, gen: torch.Generator) -> RouterProbabilities:
    """Scores with a monotone link to correctness: P(right | p) = p ** 0.7 (the scorer is overconfident)."""
    def draw(shape):
        p = torch.rand(shape, generator=gen) ** 0.3
        wrong = torch.rand(shape, generator=gen) > p ** 0.7
        return p, wrong
    ex, exw = draw((s, e1, n))
    fi, fiw = draw((s, n))
    al, alw = draw((s, n))
    return RouterProbabilities(ex, exw, fi, fiw, al, alw)


@pytest.mark.parametrize("method", ["ltt_binom", "ltt_hb"])
def test_router_guarantee_holds_over_many_splits(method):
    """Certify on 300 calibration draws of 400 samples; measure the selective risk of every cascade on a
    fresh draw of 10,000 samples. The share of splits where some cascade's risk exceeds alpha
    stays within delta plus its binomial slack (3 standard errors)."""
    gen = torch.Generator().manual_seed(0)
    s, alpha, delta = 300, 0.1, 0.1
    grid = router_grid(100)
    cal = _synthetic_probs(s, 400, 2, gen)
    n, k = cascade_counts(cal, grid)  # [S, J, G]
    last, _, _ = certified_index(n, k, alpha, delta, method)
    assert float((last >= 0).float().mean()) > 0.7  # it has power: most splits certify something
    test = _synthetic_probs(1, 10000, 2, gen)
    n_t, k_t = cascade_counts(test, grid)  # [1, J, G]
    risk = (k_t[0] / n_t[0].clamp_min(1)).amax(dim=0)  # [G]: the worst cascade's true selective risk
    chosen = risk[last.clamp_min(0)]
    violated = (last >= 0) & (chosen > alpha)
    slack = 3 * math.sqrt(delta * (1 - delta) / s)
    assert float(violated.float().mean()) <= delta + slack
    # and the empirical rule (no test) would violate far more often: the test has teeth
    emp_ok = (k <= alpha * n) & (n > 0)
    emp_last = torch.where(emp_ok.all(dim=1), torch.arange(grid.numel()), torch.full_like(emp_ok[:, 0], -1, dtype=torch.long)).max(-1).values
    assert float(((emp_last >= 0) & (risk[emp_last.clamp_min(0)] > alpha)).float().mean()) > 2 * delta


def test_cascade_counts_against_a_loop():
    gen = torch.Generator().manual_seed(3)
    probs = _synthetic_probs(1, 50, 2, gen)
    probs = RouterProbabilities(*(t[0] for t in (probs.exits, probs.exit_wrong, probs.final, probs.final_wrong,
                                                 probs.alone, probs.alone_wrong)))
    grid = torch.tensor([0.99, 0.8, 0.5, 0.1])
    n, k = cascade_counts(probs, grid)
    for g, lam in enumerate(grid.tolist()):
        for j in range(4):  # 0: full; 1 + cut after j early exits
            served = wrong = 0
            for i in range(50):
                who = next((e for e in range(2) if (j == 0 or e < j - 1) and probs.exits[e, i] >= lam), None)
                if who is not None:
                    served += 1
                    wrong += int(probs.exit_wrong[who, i])
                elif j == 0 and probs.final[i] >= lam:
                    served += 1
                    wrong += int(probs.final_wrong[i])
                elif j > 0 and probs.alone[i] >= lam:
                    served += 1
                    wrong += int(probs.alone_wrong[i])
            assert (int(n[j, g]), int(k[j, g])) == (served, wrong), (j, lam)
