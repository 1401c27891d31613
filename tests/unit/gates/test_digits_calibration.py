"""Gates on the real digits system (the session fixture): calibration quality after temperature
scaling, the drift monitor on real scores under a severe corruption, and the calibration report."""

import json
import math

import pytest
import torch

from fallbackformer.gates import ScoreDriftMonitor, fit_temperature
from fallbackformer.gates.drift import ks_from_counts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits_logits(digits_system):
    from fallbackformer.training.pipeline import path_logits

    out = {}
    with torch.no_grad():
        for split in ("calibration", "test", "val"):
            x, y = digits_system.splits[split]
            out[split] = (path_logits(digits_system.primary, digits_system.student, x), y)
    return out


def _ece_tm(logits, labels, t):
    from torchmetrics.functional.classification import multiclass_calibration_error

    p = torch.softmax(logits.double() / t, dim=1)
    return float(multiclass_calibration_error(p, labels, num_classes=p.shape[1], n_bins=15, norm="l1"))


def _ece_noise_floor(logits, t, runs=2000, q=0.95):
    """The q-quantile of the 15-bin ECE of a PERFECTLY calibrated model with these confidences:
    labels drawn as correct with probability = confidence. On a few hundred samples the ECE
    estimator is biased upward by this much even when nothing is miscalibrated."""
    conf = torch.softmax(logits.double() / t, dim=1).amax(1)  # [N]
    g = torch.Generator().manual_seed(0)
    correct = (torch.rand(runs, conf.numel(), generator=g, dtype=torch.float64) < conf).double()
    edges = torch.linspace(0, 1, 16, dtype=torch.float64)
    b = torch.bucketize(conf, edges[1:-1])  # [N]
    onehot = torch.nn.functional.one_hot(b, 15).double()  # [N, 15]
    gap = (correct @ onehot - (conf @ onehot)[None]).abs()  # [R, 15] |sum correct - sum conf|
    return float((gap.sum(1) / conf.numel()).quantile(q))


def test_ece_after_temperature_scaling(digits_logits):
    """ECE on the test split with the temperature fitted on the calibration split."""
    (cal, y_cal), (test, y_test) = digits_logits["calibration"], digits_logits["test"]
    results = {}
    for name, i in (("primary", -2), ("student", -1)):
        t = fit_temperature(cal[i], y_cal)
        before, after = _ece_tm(test[i], y_test, 1.0), _ece_tm(test[i], y_test, t)
        results[name] = (before, after, _ece_noise_floor(test[i], t))
        assert torch.equal((test[i] / t).argmax(1), test[i].argmax(1))
    before, after, floor = results["primary"]
    assert after <= 0.02, results
    # The student: on 359 test samples a perfectly calibrated model with its confidences has a
    # 15-bin ECE above 2% about half the time (the estimator's upward bias), so the 2% bar is
    # checked against that noise floor instead of as a hard line.
    before, after, floor = results["student"]
    assert after <= max(0.02, floor), results


def _scores(gate, logits):
    with torch.no_grad():
        return gate.confidence(logits).double()


def _first_alarms(monitor, streams):
    ref = monitor.reference.contiguous()
    right = torch.searchsorted(ref, streams.contiguous(), right=True)
    left = torch.searchsorted(ref, streams.contiguous(), right=False)
    first = torch.full((streams.shape[0],), -1)
    w, n_ref = monitor.window, ref.numel()
    for t in range(w, streams.shape[1] + 1, monitor.check_every):
        order = streams[:, t - w : t].argsort(dim=1)
        d = ks_from_counts(right[:, t - w : t].gather(1, order), left[:, t - w : t].gather(1, order), n_ref)
        first = torch.where((d >= monitor.critical_value) & (first < 0), torch.full_like(first, t), first)
    return first


def test_drift_monitor_on_real_digits_scores(digits_system, digits_logits):
    shift = pytest.importorskip("fallbackformer.data.shift", reason="the shift suite (data worker) provides the corruptions")
    gate = digits_system.gates[0]  # exit_1: the only gate that sees every request
    assert gate.reference_scores.numel() >= 100
    monitor = ScoreDriftMonitor(gate.reference_scores)  # defaults: window 100, every 25, level 1%/5000
    test, y_test = digits_logits["test"]
    clean = _scores(gate, test[0])
    x_test, _ = digits_system.splits["test"]
    x_bad = shift.corrupt(x_test, "motion_blur", 5, seed=0)  # a severe tuning corruption
    with torch.no_grad():
        bad = _scores(gate, digits_system.primary(x_bad)[0])
    g = torch.Generator().manual_seed(0)
    runs = 400
    # clean streams: 5000 requests resampled from the real test scores
    streams = clean[torch.randint(0, clean.numel(), (runs, 5000), generator=g)]
    false_alarm = (_first_alarms(monitor, streams) >= 0).double().mean().item()
    assert false_alarm <= 0.01, false_alarm
    # a switch to the corrupted inputs at a random phase after 400 clean requests
    pre, post = 400, 300
    switch = pre + torch.randint(0, monitor.check_every, (runs,), generator=g)
    mixed = torch.where(
        torch.arange(pre + post)[None] >= switch[:, None],
        bad[torch.randint(0, bad.numel(), (runs, pre + post), generator=g)],
        clean[torch.randint(0, clean.numel(), (runs, pre + post), generator=g)],
    )
    first = _first_alarms(monitor, mixed)
    delay = torch.where(first >= 0, first - switch, torch.full_like(first, 10**6))
    assert (delay < 0).double().mean() <= 0.01
    assert ((delay >= 0) & (delay <= 200)).double().mean() >= 0.95
    # the class itself, one stream
    monitor.reset()
    assert not monitor.update(streams[0, :1000].float())
    assert monitor.update(bad.float()[:200].repeat(2))


@pytest.mark.parametrize("mode", ["per_path", "system"])
def test_calibrate_gates_and_report(digits_logits, tmp_path, mode):
    pytest.importorskip("matplotlib")
    from fallbackformer.evaluation.metrics import ece_from_logits
    from fallbackformer.training.calibration import calibrate_gates, write_calibration_report

    cal, y = digits_logits["calibration"]
    cfg = {"mode": mode, "alpha": 0.05 if mode == "system" else {"exits": 0.02, "primary": 0.05, "student": 0.05},
           "delta": 0.1, "method": "ltt_hb", "score": "max_softmax"}
    gates, report = calibrate_gates(cal[:-1], cal[-1], y, cfg)
    assert len(gates) == len(cal)
    names = list(report["gates"])
    assert names == ["exit_1", "exit_2", "exit_3", "primary", "student"]
    for name, gate, z in zip(names, gates, cal):
        entry = report["gates"][name]
        assert entry["guarantee"]["method"] == "ltt_hb"
        # torchmetrics' ECE and the gates' own equal-width ECE agree
        assert entry["after"]["ece"] == pytest.approx(ece_from_logits(z, y, temperature=float(gate.temperature)), abs=1e-6)
        assert entry["after"]["nll"] <= entry["before"]["nll"] + 1e-9
    if mode == "system":
        assert len({float(g.threshold) for g in gates}) == 1
        assert report["system"]["selective_risk_cal"] <= 0.05
    paths = write_calibration_report(report, gates, cal, y, tmp_path)
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["mode"] == mode and set(data["gates"]) == set(names)
    for name in names:
        for kind in ("reliability", "risk_coverage"):
            p = paths[f"{kind}_{name}"]
            assert p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
    assert math.isfinite(data["gates"]["primary"]["after"]["ece"])


def test_input_range_check_on_digits(digits_system):
    shift = pytest.importorskip("fallbackformer.data.shift", reason="the shift suite provides the corruptions")
    from fallbackformer.gates import InputRangeCheck

    x_fit = torch.cat([digits_system.splits["train"][0], digits_system.splits["calibration"][0]])
    check = InputRangeCheck.fit(x_fit)
    x_test, _ = digits_system.splits["test"]
    assert check(x_test).double().mean() <= 0.02
    # rotation fools the score monitor (confidently wrong) but not the range check
    assert check(shift.corrupt(x_test, "rotate", 5, seed=0)).double().mean() >= 0.9
