"""Drift monitor: KS statistic against scipy, and the sequential design measured on synthetic
streams: false alarms on clean 5000-request streams, detection delay after a severe shift."""


import pytest
import torch

from fallbackformer.gates.drift import (
    InputRangeCheck,
    ScoreDriftMonitor,
    ks_from_counts,
    ks_pvalue,
    ks_statistic,
)
from fallbackformer.gates.gate import reference_sample

RUNS = 1000




def test_ks_statistic_and_pvalue_match_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy provides the reference KS test")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ref = torch.randint(0, 30, (300,), generator=g).double()  # ties on purpose
        rows = torch.randint(0, 35, (4, 80), generator=g).double()
        ours = ks_statistic(ref, rows)
        for r, d in zip(rows, ours):
            assert float(d) == pytest.approx(stats.ks_2samp(ref.numpy(), r.numpy()).statistic, abs=1e-12)
    # continuous data: the asymptotic p-value tracks scipy's exact one
    ref = torch.rand(512, generator=g).double()
    for shift in (0.0, 0.05, 0.1, 0.2):
        row = torch.rand(100, generator=g).double() + shift
        d = float(ks_statistic(ref, row))
        exact = stats.ks_2samp(ref.numpy(), row.numpy(), method="exact").pvalue
        assert float(ks_pvalue(d, 512, 100)) == pytest.approx(exact, rel=0.25, abs=2e-3)


def _first_alarms(monitor: ScoreDriftMonitor, streams: torch.Tensor) -> torch.Tensor:
    """Vectorised replay of ``monitor`` over ``[R, L]`` streams fed one score at a time:
    the request count of the first alarm per run (-1: none)."""
    ref = monitor.reference.contiguous()
    right = torch.searchsorted(ref, streams.contiguous(), right=True)
    left = torch.searchsorted(ref, streams.contiguous(), right=False)
    first = torch.full((streams.shape[0],), -1)
    w = monitor.window
    n_ref = ref.numel()
    assert monitor.reference_size == n_ref
    for t in range(w, streams.shape[1] + 1, monitor.check_every):
        order = streams[:, t - w : t].argsort(dim=1)
        d = ks_from_counts(right[:, t - w : t].gather(1, order), left[:, t - w : t].gather(1, order), n_ref)
        first = torch.where((d >= monitor.critical_value) & (first < 0), torch.full_like(first, t), first)
    return first


def _scores(n: int, signal: float, g: torch.Generator) -> torch.Tensor:
    """Max-softmax scores of a synthetic 10-class model; a lower ``signal`` = a corrupted input."""
    y = torch.randint(0, 10, (n,), generator=g)
    z = signal * torch.rand(n, 1, generator=g) * torch.nn.functional.one_hot(y, 10).float()
    return torch.softmax(z + 1.5 * torch.randn(n, 10, generator=g), dim=1).amax(1).double()


def test_replay_matches_monitor_class():
    g = torch.Generator().manual_seed(1)
    monitor = ScoreDriftMonitor(reference_sample(_scores(2000, 8.0, g)))
    streams = torch.cat([_scores(4 * 600, 8.0, g).reshape(4, 600), _scores(4 * 400, 2.0, g).reshape(4, 400)], 1)
    first = _first_alarms(monitor, streams)
    for r in range(4):
        monitor.reset()
        alarm_at = -1
        for a in range(0, 1000, 7):  # uneven batches
            if monitor.update(streams[r, a : a + 7]) and alarm_at < 0:
                alarm_at = monitor.n_seen
        # a batch reports at its end; the replay looks at exact look points
        assert alarm_at >= first[r] and alarm_at - first[r] < 7 + monitor.check_every
        assert monitor.drifted and monitor.n_alarms >= 1 and monitor.n_checks >= 1
    assert first.min() > 600  # the clean prefix raised nothing


def test_false_alarm_rate_on_clean_5000_request_streams():
    """Under H0 the KS test is distribution-free for continuous scores: uniform streams suffice."""
    g = torch.Generator().manual_seed(2)
    monitor = ScoreDriftMonitor(reference_sample(torch.rand(2000, generator=g)))  # defaults
    assert monitor.horizon == 5000
    streams = torch.rand(RUNS, 5000, generator=g, dtype=torch.float64)
    rate = (_first_alarms(monitor, streams) >= 0).double().mean().item()
    assert rate <= 0.01, rate


def test_detects_severe_shift_within_200_requests():
    g = torch.Generator().manual_seed(3)
    monitor = ScoreDriftMonitor(reference_sample(_scores(2000, 8.0, g)))  # defaults
    pre, post = 400, 300
    switch = pre + torch.randint(0, monitor.check_every, (RUNS,), generator=g)  # random phase
    clean = _scores(RUNS * (pre + post), 8.0, g).reshape(RUNS, -1)
    shifted = _scores(RUNS * (pre + post), 2.5, g).reshape(RUNS, -1)  # severe corruption
    t = torch.arange(pre + post)
    streams = torch.where(t[None] >= switch[:, None], shifted, clean)
    first = _first_alarms(monitor, streams)
    delay = torch.where(first >= 0, first - switch, torch.full_like(first, 10**6))
    assert (delay < 0).double().mean() <= 0.01  # alarms before the switch are false alarms
    assert ((delay >= 0) & (delay <= 200)).double().mean() >= 0.95


def test_monitor_bookkeeping_and_errors():
    g = torch.Generator().manual_seed(4)
    m = ScoreDriftMonitor(torch.rand(512, generator=g), window=50, check_every=10, horizon=1000)
    assert m.looks_per_horizon == (1000 - 50) // 10 + 1
    assert not m.update(torch.tensor([float("nan")] * 5))
    assert m.n_nonfinite == 5 and m.n_seen == 0
    assert not m.update(torch.rand(49, generator=g))  # window not full: no look
    assert m.n_checks == 0
    m.update(torch.rand(1, generator=g))
    assert m.n_checks == 1
    state = m.state()
    assert state["n_seen"] == 50 and 0.0 <= state["last_pvalue"] <= 1.0
    m.reset()
    assert m.n_seen == 0 and m.n_checks == 0 and not m.drifted
    with pytest.raises(ValueError, match="at least 10"):
        ScoreDriftMonitor(torch.rand(3))
    with pytest.raises(ValueError, match="horizon"):
        ScoreDriftMonitor(torch.rand(100), window=200, horizon=100)


def test_input_range_check():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(200, 1, 8, 8, generator=g) * 16
    x[:, :, 0, 0] = 0.0  # a constant feature
    check = InputRangeCheck.fit(x)
    assert not check(x).any()
    bad = x[:3].clone()
    bad[0, 0, 0, 0] = 0.5  # outside the (degenerate) calibration range of that pixel
    bad[1, 0, 4, 4] = 17.0
    bad[2, 0, 2, 2] = float("nan")
    assert check(bad).tolist() == [True, True, True]
    loose = InputRangeCheck.fit(x, margin=0.1)
    assert loose(torch.full((1, 1, 8, 8), 0.0)).tolist() == [False]
    again = InputRangeCheck.from_config(check.to_config())
    assert torch.equal(again(bad), check(bad))
    with pytest.raises(ValueError, match="feature shape"):
        check(torch.zeros(2, 64))
