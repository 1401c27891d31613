"""Online risk control on simulated streams that switch from clean to shifted data."""

from __future__ import annotations

import torch

from fallbackformer.runtime.online_risk import FeedbackConfig, OnlineRiskController


def _stream(ctl: OnlineRiskController, buf: torch.Tensor, n: int, shifted: bool, gen: torch.Generator,
            label_every: int = 1, start: int = 0) -> tuple[int, int]:
    """Serve ``n`` one-sample requests; label every ``label_every``-th; return (answered, wrong) among labelled."""
    answered = wrong = 0
    for t in range(start, start + n):
        s = float(torch.rand((), generator=gen)) ** 0.1  # scores skewed towards 1
        p_right = s if not shifted else s ** 3  # shift: overconfident, wrong far more often at a given score
        right = float(torch.rand((), generator=gen)) < p_right
        accept = s >= float(buf)
        pred = 1 if right else 0
        rid = f"r-{t}"
        ctl.remember(rid, torch.tensor([pred]), ["primary" if accept else "default"], torch.tensor([s]))
        if t % label_every == 0:
            res = ctl.feedback(rid, 1)
            answered += res.answered
            wrong += res.errors
    return answered, wrong


def test_controller_keeps_error_among_answered_at_alpha_after_a_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    buf = torch.tensor(0.9)  # the calibrated threshold: fine on clean data, far too loose after the shift
    # a step suited to scores spread over [0.9, 1) (the default 0.1 suits the gates' saturating softmax)
    ctl = OnlineRiskController({"primary": buf}, {"primary": 0.05}, FeedbackConfig(eta=0.02), routed=False)
    _stream(ctl, buf, 500, False, gen)
    answered, wrong = _stream(ctl, buf, 3000, True, gen, start=500)
    st = ctl.state()
    # after 1,000+ labelled requests the realized error among answered (whole stream) is within alpha + 2 pt
    assert st["n_labels"] >= 1000
    assert st["error_rate"] <= 0.05 + 0.02, st
    assert answered > 300 and wrong / answered <= 0.05 + 0.02  # it keeps answering, at alpha
    assert float(buf) > 0.9  # tightened in place: export snapshots the threshold in force
    assert st["targets"]["primary"]["lambda"] == float(buf) or abs(st["targets"]["primary"]["lambda"] - float(buf)) < 1e-6


def test_uncontrolled_baseline_breaks_alpha_on_the_same_stream() -> None:
    gen = torch.Generator().manual_seed(0)
    buf = torch.tensor(0.9)
    ctl = OnlineRiskController({"primary": buf}, {"primary": 0.05}, FeedbackConfig())
    ctl.targets.clear()  # no target: labels are counted, thresholds never move
    _stream(ctl, buf, 500, False, gen)
    _stream(ctl, buf, 3000, True, gen, start=500)
    assert ctl.state()["error_rate"] > 0.09  # about twice alpha


def test_tighten_only_never_goes_below_calibrated_and_loosen_allowed_by_config() -> None:
    gen = torch.Generator().manual_seed(1)
    buf = torch.tensor(0.9)
    ctl = OnlineRiskController({"primary": buf}, {"primary": 0.05}, FeedbackConfig())
    _stream(ctl, buf, 1000, False, gen)  # clean data: errors rare, lambda wants to fall
    assert float(buf) >= 0.9
    buf2 = torch.tensor(0.9)
    loose = OnlineRiskController({"primary": buf2}, {"primary": 0.2}, FeedbackConfig(tighten_only=False))
    _stream(loose, buf2, 1000, False, gen)
    assert float(buf2) < 0.9


def test_sampled_labels_and_unknown_expired_ids_never_raise() -> None:
    gen = torch.Generator().manual_seed(2)
    buf = torch.tensor(0.9)
    ctl = OnlineRiskController({"primary": buf}, {"primary": 0.05}, FeedbackConfig(capacity=100))
    _stream(ctl, buf, 2000, True, gen, label_every=10)  # a 10% label sample, delayed by nothing
    r = ctl.feedback("r-3", 1)  # expired (only the last 100 kept)
    assert not r.accepted and "unknown or expired" in r.message and "capacity" in r.message
    assert not ctl.feedback("nope", 1).accepted
    assert not ctl.feedback("r-1999", "cat").accepted  # a malformed label is refused, not raised
    assert ctl.feedback("r-1999", [1]).accepted
    assert ctl.feedback("r-1999", [1]).labelled == 0  # a duplicate is counted once
    c = ctl.state()["counts"]
    assert c["unknown"] == 2 and c["expired"] == 1900 and c["bad_label"] == 1 and c["duplicate"] == 1


def test_per_sample_label_forms() -> None:
    buf = torch.tensor(0.5)
    ctl = OnlineRiskController({"student": buf}, {"student": 0.1})
    ctl.remember("a", torch.tensor([3, 4, 5]), ["student", "default", "student"], torch.tensor([0.9, float("nan"), 0.8]))
    r = ctl.feedback("a", 9, sample=2)
    assert r.accepted and r.answered == 1 and r.errors == 1
    r = ctl.feedback("a", torch.tensor([3, 4, -1]))  # -1: not labelled; the default is not an answer
    assert r.labelled == 2 and r.answered == 1 and r.errors == 0
    assert abs(ctl.label_free_accuracy() - 0.85) < 1e-6
