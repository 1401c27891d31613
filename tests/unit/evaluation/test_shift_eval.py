"""evaluate(): every per-set number against a brute-force recomputation on a tiny synthetic system."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.evaluation import metrics as M
from fallbackformer.evaluation.shift_eval import budget_sweep, evaluate, path_flops

C = 10


def _system(seed: int = 0) -> ff.FallbackModel:
    torch.manual_seed(seed)
    primary = ff.MultiExitNet(
        [nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), nn.Linear(16, 16), nn.Linear(16, 16)],
        {0: nn.Linear(16, C), 1: nn.Linear(16, C), 2: nn.Linear(16, C)},
    )
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, C))
    g = {"alpha": 0.1, "delta": 0.1, "method": "ltt_hb"}
    gates = [ff.ConfidenceGate(1.0, t, guarantee=g) for t in (0.22, 0.2, 0.18, 0.15)]
    return ff.FallbackModel(primary.eval(), student.eval(), gates, ff.Policy(budget_ms=10_000.0)).eval()


def _data(model: ff.FallbackModel, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 16
    with torch.no_grad():
        y = model.primary(x)[-1].argmax(1)  # the primary is right on most samples...
    flip = torch.rand(n, generator=g) < 0.3
    y[flip] = torch.randint(0, C, (int(flip.sum()),), generator=g)  # ...but not all
    return x, y


@pytest.fixture(scope="module")
def setup():
    model = _system()
    sets = {"clean": _data(model, 120, 1), "rotate/1": _data(model, 90, 2), "rotate/2": _data(model, 90, 3), "fog/1": _data(model, 60, 4)}
    ev = evaluate(model, sets, held_out=["fog"], latency_samples=4, stage_reps=3, budgets_ms=[0.001, 1e4], progress=False, num_threads=1)
    return model, sets, ev


def test_per_set_against_brute_force(setup) -> None:
    model, sets, ev = setup
    assert list(ev) == list(sets) and set(ev.per_set) == set(sets)
    for key, (x, y) in sets.items():
        e = ev[key]
        with torch.no_grad():
            logits = model.primary(x) + [model.student(x)]
            out = model(x)
        names = model.path_names
        for name, lg in zip(names, logits):
            assert e["accuracy"][name] == pytest.approx(float((lg.argmax(1) == y).float().mean()))
        assert e["accuracy"]["system"] == pytest.approx(float((out.prediction == y).float().mean()))
        n = len(y)
        assert e["fallback_rate"] == pytest.approx(sum(s in ("student", "default") for s in out.served_by) / n)
        for who in [*names, "default"]:
            assert e["served_by"][who] == pytest.approx(out.served_by.count(who) / n)
        assert sum(e["served_by"].values()) == pytest.approx(1.0)
        # oracle exit / router by loops
        exits = logits[:-1]
        oracle = sum(any(int(lg[i].argmax()) == int(y[i]) for lg in exits) for i in range(n)) / n
        router = sum(int(logits[-2][i].argmax()) == int(y[i]) or int(logits[-1][i].argmax()) == int(y[i]) for i in range(n)) / n
        assert e["accuracy"]["oracle_exit"] == pytest.approx(oracle)
        assert e["accuracy"]["oracle_router"] == pytest.approx(router)
        # per path: gate alone
        for name, lg in zip(names, logits):
            acc, conf = model.gates[name](lg)
            ok = lg.argmax(1) == y
            r = e["selective_risk"][name]
            assert r["n_accepted"] == int(acc.sum())
            assert r["errors"] == int((acc & ~ok).sum())
            assert e["coverage"][name] == pytest.approx(float(acc.float().mean()))
            assert e["aurc"][name] == pytest.approx(M.aurc(conf, ok), abs=1e-12)
            prob = torch.softmax(lg.double(), 1).max(1).values
            assert e["ece"][name] == pytest.approx(M.ece(prob, ok), abs=1e-9)
            assert r["violated"] == (r["n_accepted"] > 0 and r["risk"] > 0.1)
        sr = e["selective_risk"]["system"]
        answered = torch.tensor([s != "default" for s in out.served_by])
        assert sr["n_accepted"] == int(answered.sum())
        assert sr["errors"] == int((answered & (out.prediction != y)).sum())
        # per-class slices
        for c, v in e["slices"]["per_class"].items():
            m = y == int(c)
            assert v["n"] == int(m.sum())
            assert v["accuracy"] == pytest.approx(float((out.prediction[m] == y[m]).float().mean()))
        gaps = [v["accuracy"] for v in e["slices"]["per_class"].values()]
        assert e["slices"]["max_disparity"]["accuracy"]["gap"] == pytest.approx(max(gaps) - min(gaps))
        assert e["latency_ms"]["n_calls"] == 4 and e["latency_ms"]["p99"] >= e["latency_ms"]["p50"] > 0


def test_flops_by_hand(setup) -> None:
    model, sets, ev = setup
    f = path_flops(model, sets["clean"][0][:1])
    lin = lambda i, o: 2 * i * o  # noqa: E731
    assert f["cascade"]["exit_1"] == lin(64, 16) + lin(16, C)
    assert f["cascade"]["exit_2"] == f["cascade"]["exit_1"] + lin(16, 16) + lin(16, C)
    assert f["cascade"]["primary"] == f["cascade"]["exit_2"] + lin(16, 16) + lin(16, C)
    assert f["alone"]["primary"] == lin(64, 16) + 2 * lin(16, 16) + lin(16, C)
    assert f["student"] == lin(64, C)
    e = ev["clean"]
    counts = e["served_by_counts"]
    expected = (
        sum(counts[p] * f["cascade"][p] for p in ("exit_1", "exit_2", "primary"))
        + (counts["student"] + counts["default"]) * f["fallback"]
    ) / e["n"]
    assert e["flops"]["mean"] == pytest.approx(expected)


def test_summary_mce_and_drop(setup) -> None:
    _, _, ev = setup
    s = ev.summary
    for p in ("primary", "system", "student", "exit_1"):
        err = {k: 1 - ev[k]["accuracy"][p] for k in ("rotate/1", "rotate/2", "fog/1")}
        assert s["mce"][p] == pytest.approx(((err["rotate/1"] + err["rotate/2"]) / 2 + err["fog/1"]) / 2)
        clean = ev["clean"]["accuracy"][p]
        mean = sum(ev[k]["accuracy"][p] for k in err) / 3
        assert s["relative_drop"][p] == pytest.approx((clean - mean) / clean)
        assert s["held_out"]["mce"][p] == pytest.approx(err["fog/1"])
    assert ev["fog/1"]["held_out"] and not ev["rotate/1"]["held_out"]
    assert s["accuracy_by_severity"]["system"][0] == ev["clean"]["accuracy"]["system"]


def test_budget_sweep_matches_manual_cascade(setup) -> None:
    model, sets, _ = setup
    x, y = sets["clean"]
    stage_ms = {"stage_0": 1.0, "stage_1": 1.0, "stage_2": 1.0, "student": 1.0, "total_primary": 3.0}
    # admission reserves the student's time and the margin: stage 0 (1 ms) is admitted when
    # 1 + 1 + margin <= budget; stage 1 then needs 1 + 1 + 1 + margin
    mid = 2.5 + model.policy.margin_ms
    res = budget_sweep(model, {"clean": (x, y)}, [0.1, mid, 1e4], stage_ms)
    with torch.no_grad():
        logits = model.primary(x) + [model.student(x)]
        out = model(x)
    a1 = model.gates["exit_1"].accept(logits[0])
    a_s = model.gates["student"].accept(logits[-1])
    student_or_default = torch.where(a_s, logits[-1].argmax(1), torch.tensor(-1))
    r = res["sets"]["clean"]
    # 0.1 ms: no stage fits; every sample goes to the student (or the default) for a deadline reason
    assert r["accuracy"][0] == pytest.approx(float((student_or_default == y).float().mean()))
    assert r["deadline_rate"][0] == 1.0
    # mid: exit_1 answers at 1.0 ms; stage 1 is not admitted: the rest fall back
    pred = torch.where(a1, logits[0].argmax(1), student_or_default)
    assert r["accuracy"][1] == pytest.approx(float((pred == y).float().mean()))
    assert r["deadline_rate"][1] == pytest.approx(float((~a1).float().mean()))
    # a generous budget: exactly the real system
    assert r["accuracy"][2] == pytest.approx(float((out.prediction == y).float().mean()))
    assert r["deadline_rate"][2] == 0.0
    assert model.policy.budget_ms == 10_000.0  # the model itself is untouched


def test_sinks_untouched_and_threads_restored(setup) -> None:
    model, sets, _ = setup

    class Sink:
        def __init__(self) -> None:
            self.n = 0

        def emit(self, event) -> None:
            self.n += 1

    sink = Sink()
    model.sinks = [sink]
    threads = torch.get_num_threads()
    try:
        evaluate(model, {"clean": sets["clean"]}, latency_samples=0, sweep=False, num_threads=1, progress=False)
        assert sink.n == 0 and model.sinks == [sink]
        assert torch.get_num_threads() == threads
    finally:
        model.sinks = []
    with pytest.raises(ValueError, match="pair"):
        evaluate(model, {"clean": (sets["clean"][0], sets["clean"][1][:3])}, progress=False)


def test_real_digits_system(digits_system) -> None:
    """The shared trained system: clean accuracies agree with direct computation; guarantees hold on clean."""
    from fallbackformer.data.shift import make_shift_sets

    from fallbackformer.runtime.clock import FakeClock

    # a fake clock that never moves: no deadline can depend on how loaded the test machine is
    model = digits_system.fresh_model(clock=FakeClock())
    x, y = digits_system.splits["test"]
    sets = {"clean": (x, y), **make_shift_sets(x, y, ["rotate"], [5], seed=0)}
    ev = evaluate(model, sets, latency_samples=2, stage_reps=2, budgets_ms=[1e4], progress=False, num_threads=1)
    with torch.no_grad():
        assert ev["clean"]["accuracy"]["primary"] == pytest.approx(float((model.primary(x)[-1].argmax(1) == y).float().mean()))
        pred = torch.cat([model(xb).prediction for xb in x.split(16)])
        assert ev["clean"]["accuracy"]["system"] == pytest.approx(float((pred == y).float().mean()))
    assert not ev["clean"]["reasons"].get("deadline_exceeded")
    assert ev["clean"]["accuracy"]["system"] > 0.8
    assert ev["rotate/5"]["accuracy"]["primary"] < ev["clean"]["accuracy"]["primary"]
    assert not math.isnan(ev.summary["mce"]["system"])
