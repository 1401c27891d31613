"""The evaluation follows the ladder: each rung alone (accuracy, coverage, cost), the system against the
best single path, and coarse answers (prediction -1 with a set) counted as abstentions, reported on their own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.evaluation.report import render_markdown
from fallbackformer.evaluation.report_tables import coarse_line, ladder_rows
from fallbackformer.evaluation.shift_eval import evaluate
from fallbackformer.rungs import Coarse, Rung

GROUPS = {"low": [0, 1], "high": [2, 3]}


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    primary = ff.MultiExitNet([nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), nn.Linear(8, 8)],
                              {0: nn.Linear(8, 4), 1: nn.Linear(8, 4)}).eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    linear = ff.create_model("linear_rung", num_features=64, num_classes=4).eval()
    g = {"alpha": 0.05, "delta": 0.1, "method": "ltt_hb"}
    gates = [ff.ConfidenceGate(1.0, t, guarantee=g) for t in (0.9, 0.9, 0.95)]
    model = ff.FallbackModel(primary, student, gates, ff.Policy(budget_ms=1e4), fallbacks=[
        Rung("linear", linear, ff.ConfidenceGate(1.0, 0.95, guarantee=g))], default=Coarse(GROUPS)).eval()
    gen = torch.Generator().manual_seed(0)
    sets = {k: (torch.rand(60, 1, 8, 8, generator=gen) * 16, torch.randint(0, 4, (60,), generator=gen))
            for k in ("clean", "rotate/1", "fog/1")}
    ev = evaluate(model, sets, held_out=["fog"], latency_samples=1, stage_reps=2, sweep=False, progress=False)
    return model, sets, ev


def test_each_rung_is_evaluated_alone_with_its_cost(run):
    model, sets, ev = run
    x, y = sets["clean"]
    e = ev.per_set["clean"]
    with torch.no_grad():
        lin = model.decisions.rungs["linear"](x)
    assert e["accuracy"]["linear"] == pytest.approx(float((lin.argmax(1) == y).double().mean()))
    assert e["coverage"]["linear"] == pytest.approx(float(model.gates["linear"].accept(lin).double().mean()))
    assert ev.flops["alone"]["linear"] == 2 * 64 * 4 and ev.stage_latency_ms["linear"] > 0
    acc = {p: e["accuracy"][p] for p in ("primary", "student", "linear")}
    assert e["best_single_path"] == {"path": max(acc, key=acc.get), "accuracy": max(acc.values())}
    rows = ladder_rows(ev)
    assert [r[0] for r in rows[1:4]] == ["primary", "student", "linear"] and rows[4][0] == "ladder (system)"
    assert rows[-1][0].startswith("best single path")
    assert "The ladder, rung by rung" in render_markdown(ev, "t")


def test_coarse_answers_are_abstentions_reported_on_their_own(run):
    model, sets, ev = run
    x, y = sets["clean"]
    out = model(x)
    size = out.prediction_set.sum(1)
    coarse = (out.prediction == -1) & (size > 0) & (size < 4)
    assert coarse.any()
    c = ev.per_set["clean"]["coarse"]
    assert c["n"] == int(coarse.sum())
    holds = out.prediction_set[torch.arange(len(y)), y] & coarse
    assert c["contains_label"] == pytest.approx(int(holds.sum()) / int(coarse.sum()))
    answered = out.prediction >= 0
    assert ev.per_set["clean"]["coverage"]["system"] == pytest.approx(float(answered.double().mean()))
    assert "Coarse answers" in coarse_line(ev)
