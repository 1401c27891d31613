"""Silent errors, the guarantee check (gates or a router) and failure detection, against brute force.

A tiny synthetic system whose safe default answers class 0 (so "answered" must include the default),
evaluated on a clean set, two tunable and two held-out shift sets; then the same system behind a fake
router (duck-typed: an object with ``router.guarantee``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from scipy.stats import beta
from sklearn.metrics import roc_auc_score
from torch import nn

import fallbackformer as ff
from fallbackformer.evaluation import metrics as M
from fallbackformer.evaluation.guarantee_eval import INSIDE, OUTSIDE, certified_scope
from fallbackformer.evaluation.shift_eval import evaluate
from fallbackformer.evaluation.shift_summary import verdict
from fallbackformer.gates.guarantee import Guarantee, certified

C = 10
ALPHA = 0.1
DELTA = 0.1
TUNABLE = ["rotate/1", "rotate/2"]
HELD = ["fog/1", "fog/2"]
COVERS = {"clean_weight": 0.25, "corruptions": ["rotate"], "severities": [1, 2, 3, 4, 5], "draw": "uniform"}


def _system(default_class: int | None = 0) -> ff.FallbackModel:
    torch.manual_seed(0)
    primary = ff.MultiExitNet(
        [nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), nn.Linear(16, 16)],
        {0: nn.Linear(16, C), 1: nn.Linear(16, C)},
    )
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, C))
    g = {"alpha": ALPHA, "delta": DELTA, "method": "ltt_hb"}
    gates = [ff.ConfidenceGate(1.0, t, guarantee=g) for t in (0.6, 0.3, 0.55)]  # the student rejects some: the default answers
    policy = ff.Policy(budget_ms=10_000.0, default_class=default_class)
    return ff.FallbackModel(primary.eval(), student.eval(), gates, policy).eval()


def _data(model: ff.FallbackModel, n: int, seed: int, flip: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 16
    with torch.no_grad():
        y = model.primary(x)[-1].argmax(1)
    f = torch.rand(n, generator=g) < flip
    y[f] = torch.randint(0, C, (int(f.sum()),), generator=g)
    return x, y


class Routed:
    """The same system behind a fake router: only ``router.guarantee`` is new (duck typing)."""

    def __init__(self, model: ff.FallbackModel, guarantee: Guarantee) -> None:
        self.__dict__["_model"] = model
        self.__dict__["router"] = SimpleNamespace(guarantee=guarantee)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)

    def __call__(self, x: torch.Tensor) -> Any:
        return self._model(x)


def _sets(model: ff.FallbackModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    flips = {"clean": 0.1, "rotate/1": 0.2, "rotate/2": 0.5, "fog/1": 0.3, "fog/2": 0.7}
    return {k: _data(model, 80, i + 1, f) for i, (k, f) in enumerate(flips.items())}


KW = dict(held_out=["fog"], latency_samples=0, sweep=False, stage_reps=2, progress=False, num_threads=1)


@pytest.fixture(scope="module")
def gated():
    model = _system()
    sets = _sets(model)
    return model, sets, evaluate(model, sets, **KW)


def _brute(model: ff.FallbackModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        outs = [model(xb) for xb in x.split(16)]
        logits = model.primary(x) + [model.student(x)]
    pred = torch.cat([o.prediction for o in outs])
    served = [s for o in outs for s in o.served_by]
    conf = torch.cat([o.confidence for o in outs])
    n = len(y)
    answered = [int(pred[i]) >= 0 for i in range(n)]
    wrong = sum(answered[i] and int(pred[i]) != int(y[i]) for i in range(n))
    right = sum(answered[i] and int(pred[i]) == int(y[i]) for i in range(n))
    acc = {p: float((lg.argmax(1) == y).float().mean()) for p, lg in zip(model.path_names, logits)}
    return {"pred": pred, "served": served, "conf": conf, "logits": dict(zip(model.path_names, logits)),
            "answered": answered, "silent": wrong / n, "useful": right / n, "n_answered": sum(answered),
            "n_wrong": wrong, "acc": acc}


def _breach(errors: int, n: int, alpha: float) -> bool:
    """One-sided Clopper-Pearson lower bound at level DELTA above alpha, from scipy's beta quantile."""
    return n > 0 and errors > 0 and float(beta.ppf(DELTA, errors, n - errors + 1)) > alpha


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def test_per_set_silent_error_and_useful(gated) -> None:
    model, sets, ev = gated
    defaults = 0
    for key, (x, y) in sets.items():
        b = _brute(model, x, y)
        e = ev[key]
        defaults += b["served"].count("default")
        assert e["silent_error"] == pytest.approx(b["silent"])
        assert e["useful"] == pytest.approx(b["useful"])
        assert e["coverage"]["system"] == pytest.approx(b["n_answered"] / len(y))
        assert e["accuracy_answered"] == pytest.approx(b["useful"] / (b["n_answered"] / len(y)))
        assert e["best_single"] == pytest.approx(max(b["acc"]["primary"], b["acc"]["student"]))
        sr = e["selective_risk"]["system"]
        assert (sr["errors"], sr["n_accepted"]) == (b["n_wrong"], b["n_answered"])
    assert defaults > 0  # the default answered class 0 on some requests, and those counted as answered


def test_summary_against_brute_force(gated) -> None:
    model, sets, ev = gated
    brute = {k: _brute(model, *sets[k]) for k in sets}
    s = ev.summary
    shift = TUNABLE + HELD
    assert s["silent_error"] == pytest.approx(_mean([brute[k]["silent"] for k in shift]))
    assert s["silent_error_tunable"] == pytest.approx(_mean([brute[k]["silent"] for k in TUNABLE]))
    assert s["silent_error_held_out"] == pytest.approx(_mean([brute[k]["silent"] for k in HELD]))
    assert s["useful"] == pytest.approx(_mean([brute[k]["useful"] for k in shift]))
    assert s["best_single"] == pytest.approx(_mean([max(brute[k]["acc"]["primary"], brute[k]["acc"]["student"]) for k in shift]))
    router = []
    for k in shift:
        x, y = sets[k]
        lg = brute[k]["logits"]
        router.append(sum(int(lg["primary"][i].argmax()) == int(y[i]) or int(lg["student"][i].argmax()) == int(y[i])
                          for i in range(len(y))) / len(y))
    assert s["oracle_router"] == pytest.approx(_mean(router))
    # without a router, each gate's own check on its path alone counts
    holds = {}
    for k in sets:
        y = sets[k][1]
        breached = []
        for p, lg in brute[k]["logits"].items():
            acc = model.gates[p].accept(lg)
            ok = lg.argmax(1) == y
            if _breach(int((acc & ~ok).sum()), int(acc.sum()), ALPHA):
                breached.append(p)
        holds[k] = not breached
        assert ev[k]["guarantee"]["breached"] == breached and ev[k]["guarantee"]["by"] == "gates"
    assert s["guarantee_held_tunable"] == pytest.approx(_mean([float(holds[k]) for k in TUNABLE]))
    assert s["guarantee_held_held_out"] == pytest.approx(_mean([float(holds[k]) for k in HELD]))
    assert not all(holds.values())  # the fixture is built to breach somewhere
    assert ev["clean"]["guarantee"]["in_certified_distribution"]
    assert not any(ev[k]["guarantee"]["in_certified_distribution"] for k in shift)  # gates: clean data only


def test_failure_detection_auroc_matches_sklearn(gated) -> None:
    model, sets, ev = gated
    x, y = sets["rotate/2"]
    b = _brute(model, x, y)
    correct = (b["pred"] == y).numpy()
    conf = torch.where(torch.tensor(b["answered"]) & torch.isfinite(b["conf"]), b["conf"], torch.tensor(-1.0))
    fd = ev["rotate/2"]["failure_detection"]
    assert fd["system"]["auroc"] == pytest.approx(roc_auc_score(correct, conf.numpy()), abs=1e-12)
    for p, lg in b["logits"].items():
        c = model.gates[p].confidence(lg)
        ok = (lg.argmax(1) == y).numpy()
        assert fd[p]["auroc"] == pytest.approx(roc_auc_score(ok, c.numpy()), abs=1e-12)
        assert fd[p]["aurc"] == pytest.approx(M.aurc(c, torch.from_numpy(ok)), abs=1e-12)
    # averaged under shift: the plain mean over the group's sets
    fs = ev.summary["failure_detection"]
    assert fs["held_out"]["primary"]["auroc"] == pytest.approx(
        _mean([ev[k]["failure_detection"]["primary"]["auroc"] for k in HELD]))
    assert fs["clean"]["system"] == ev["clean"]["failure_detection"]["system"]


def test_failure_auroc_ties_and_degenerate() -> None:
    g = torch.Generator().manual_seed(3)
    conf = torch.randint(0, 4, (300,), generator=g).double()  # many ties
    ok = torch.rand(300, generator=g) < 0.7
    assert M.failure_auroc(conf, ok) == pytest.approx(roc_auc_score(ok.numpy(), conf.numpy()), abs=1e-12)
    assert math.isnan(M.failure_auroc(conf, torch.ones(300, dtype=torch.bool)))


@pytest.mark.parametrize("router_alpha", [0.99, 1e-4])
def test_router_check_replaces_the_gates(gated, router_alpha: float) -> None:
    model, sets, gated_ev = gated
    g = certified(alpha=router_alpha, delta=DELTA, method="ltt_binom", n=500, threshold=0.5, satisfied=True,
                  reason="certified", covers=COVERS)
    ev = evaluate(Routed(model, g), sets, **KW)
    assert ev.certificate["by"] == "router" and ev.to_json()["meta"]["certificate"]["covers"] == COVERS
    for k, (x, y) in sets.items():
        b = _brute(model, x, y)
        gk = ev[k]["guarantee"]
        assert gk["counted"] == ["system"]
        assert gk["holds"] == (not _breach(b["n_wrong"], b["n_answered"], router_alpha))
        assert ev[k]["selective_risk"]["system"]["alpha"] == router_alpha
        # the per-path gates are still reported, but they do not count
        assert ev[k]["selective_risk"]["primary"] == gated_ev[k]["selective_risk"]["primary"]
    inside = {k: ev[k]["guarantee"]["in_certified_distribution"] for k in sets}
    assert inside == {"clean": True, "rotate/1": True, "rotate/2": True, "fog/1": False, "fog/2": False}
    assert ev["fog/1"]["guarantee"]["scope"] == OUTSIDE and ev["rotate/1"]["guarantee"]["scope"] == INSIDE
    expected = 1.0 if router_alpha > 0.5 else 0.0
    assert ev.summary["guarantee_held_tunable"] == expected and ev.summary["guarantee_held_held_out"] == expected
    assert ev.summary["guarantee_by"] == "router"


def test_certified_scope_reads_covers() -> None:
    cert = {"by": "router", "covers": {"clean_weight": 0.0, "corruptions": ["rotate"], "severities": [1, 2]}}
    assert certified_scope("clean", False, cert) == (False, OUTSIDE)
    assert certified_scope("rotate/2", False, cert) == (True, INSIDE)
    assert certified_scope("rotate/3", False, cert)[0] is False  # severity not certified
    assert certified_scope("fog/1", True, {"by": "router", "covers": {}})[0] is False  # no list: held-out is outside
    assert certified_scope("clean", False, {"by": "gates"})[0] is True


@pytest.mark.parametrize(
    ("figures", "level", "words"),
    [
        ({"silent_error": 0.05, "useful": 0.80, "best_single": 0.82, "guarantee_held_tunable": 0.95,
          "guarantee_held_held_out": 0.80}, "green", None),
        ({"silent_error": 0.15, "useful": 0.80, "best_single": 0.82, "guarantee_held_tunable": 0.95,
          "guarantee_held_held_out": 0.80}, "amber", "15.0% of shifted requests"),
        ({"silent_error": 0.05, "useful": 0.70, "best_single": 0.82, "guarantee_held_tunable": 0.95,
          "guarantee_held_held_out": 0.80}, "red", "12.0 points below"),
        ({"silent_error": 0.05, "useful": 0.80, "best_single": 0.82, "guarantee_held_tunable": 0.95,
          "guarantee_held_held_out": 0.50}, "amber", "50% of the held-out"),
        ({"silent_error": 0.25, "useful": 0.80, "best_single": 0.82, "guarantee_held_tunable": 0.40,
          "guarantee_held_held_out": 0.80}, "red", "40% of the tunable"),
    ],
)
def test_verdict_is_green_only_on_good_news(figures: dict[str, float], level: str, words: str | None) -> None:
    v = verdict(figures)
    assert v["level"] == level
    assert (not v["failures"]) if words is None else any(words in f for f in v["failures"])


def test_report_leads_with_silent_errors(gated, tmp_path) -> None:
    import json

    from fallbackformer.evaluation.report import write_report

    _, _, ev = gated
    paths = write_report(ev, tmp_path)
    md = paths["md"].read_text()
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Silent errors under shift"
    level = ev.summary["verdict"]["level"]
    assert level != "green"  # this system makes many silent errors
    lead = md.split("## Silent errors under shift")[1].split("\n## ")[0]
    assert f"**{level.upper()}**" in lead and "silent error, held-out corruptions" in lead
    assert "figures/risk_coverage_under_shift.png" in lead
    table = [r for r in lead.splitlines() if r.startswith("| ") and r.split("|")[1].strip() in ev.per_set]
    shown = [float(r.split("|")[3].strip().rstrip("%")) for r in table]
    assert shown == sorted(shown, reverse=True) and len(shown) == len(ev)
    page = paths["html"].read_text()
    assert page.index("Silent errors under shift") < page.index("<h2>Paths and gates</h2>")
    assert f"<div class='callout {level}'>" in page
    assert page.index("id='fig-risk_coverage_under_shift'") < page.index("<h2>Paths and gates</h2>")
    doc = json.loads(paths["json"].read_text())
    for key in ("silent_error", "silent_error_tunable", "silent_error_held_out", "useful", "best_single",
                "oracle_router", "guarantee_held_tunable", "guarantee_held_held_out"):
        assert isinstance(doc["summary"][key], float), key
    assert isinstance(doc["clean"]["accuracy_answered"], float) and "system" in doc["clean"]["coverage"]
    assert {"silent_error", "useful", "held_out"} <= set(doc["fog/1"])
