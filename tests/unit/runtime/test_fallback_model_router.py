"""FallbackModel with a router: the student first, routed exits, router_preferred, student alone after a
deadline or an error, the default when the router trusts nobody; the ONNX-bound graph decides the same."""

from __future__ import annotations

import math

import pytest
import torch

import fallbackformer as ff
from fallbackformer.export.graph import CombinedGraph, served_by_codes
from fallbackformer.gates.router import Router
from fallbackformer.gates.router_calibration import collect_evidence
from fallbackformer.runtime import reasons as R

SPEC = ff.InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0))


@pytest.fixture(scope="module")
def routed():
    """Untrained digits-shaped models (about 10% right: both right and wrong answers) with a fitted router."""
    torch.manual_seed(0)
    primary = ff.create_model("digits_cnn_exits", num_classes=10, width=4).eval()
    student = ff.create_model("digits_mlp_student", num_classes=10, hidden=16).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(600, 1, 8, 8, generator=g) * 16
    # labels that the models get right about half the time, so every scorer sees both outcomes
    with torch.no_grad():
        p_pred, s_pred = primary(x)[-1].argmax(-1), student(x).argmax(-1)
    coin = torch.rand(600, generator=g)
    y = torch.where(coin < 0.4, p_pred, torch.where(coin < 0.7, s_pred, torch.randint(0, 10, (600,), generator=g)))
    _, pooled = collect_evidence(primary, student, None, x)
    router = Router(primary.num_exits, 10, [p.shape[1] for p in pooled], hidden=4)
    router.fit_feature_scores(pooled, y)
    ev, _ = collect_evidence(primary, student, router, x)
    router.fit(ev, y)
    router.threshold.fill_(0.45)
    return primary, student, router


def _model(routed, **policy) -> ff.FallbackModel:
    primary, student, router = routed
    gates = [ff.ConfidenceGate(temperature=1.0, threshold=0.5) for _ in range(primary.num_exits + 1)]
    return ff.FallbackModel(primary, student, gates, ff.Policy(**{"budget_ms": 1e6, **policy}),
                            input_spec=SPEC, router=router).eval()


def _inputs(n: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 16


def test_routed_answers_match_the_router_on_full_evidence(routed):
    primary, student, router = routed
    model = _model(routed)
    x = _inputs()
    out = model(x)
    ev, _ = collect_evidence(primary, student, router, x)
    # replay the cascade by hand on the full evidence
    for i in range(x.shape[0]):
        who, pred = "default", -1
        for k in range(primary.num_exits - 1):
            ok, conf, p = router.decide_exit(ev.select(torch.tensor([i])), k)
            if bool(ok):
                who, pred = f"exit_{k + 1}", int(p)
                break
        else:
            ok, use_s, conf, p = router.decide_final(ev.select(torch.tensor([i])))
            if bool(ok):
                who, pred = ("student" if bool(use_s) else "primary"), int(p)
        assert (out.served_by[i], int(out.prediction[i])) == (who, pred), i
        if who == "student":
            assert out.reason[i] == R.ROUTER_PREFERRED
        if who == "default":
            assert out.reason[i] == R.LOW_CONFIDENCE
    assert {"default", "student"} <= set(out.served_by)  # the test exercises both non-primary outcomes


def test_graph_decides_exactly_as_the_runtime(routed):
    model = _model(routed)
    x = _inputs(200, seed=5)
    x[3, 0, 0, 0] = float("nan")  # invalid input: the default in both (policy: default)
    model.policy = ff.Policy(budget_ms=1e6, on_invalid_input="default")
    out = model(x)
    graph = CombinedGraph(model).eval()
    with torch.no_grad():
        pred, served, conf, _ = graph(x)
    codes = served_by_codes(model.path_names)
    assert [codes[int(c)] for c in served] == out.served_by
    assert torch.equal(pred, out.prediction)
    both = ~torch.isnan(out.confidence)
    assert torch.allclose(conf[both], out.confidence[both], atol=1e-6)


def test_deadline_leaves_the_student_alone_to_the_router(routed):
    primary, student, router = routed
    model = _model(routed, budget_ms=1e6)
    x = _inputs(64, seed=2)
    model.policy = ff.Policy(budget_ms=1e-6, hedge="off")  # 1 ns: the student alone takes longer, so the primary never starts
    out = model(x)
    assert set(out.served_by) <= {"student", "default"}
    accept, conf, pred = router.decide_student_alone(student(x))
    for i in range(64):
        assert out.served_by[i] == ("student" if bool(accept[i]) else "default")
        assert out.reason[i] in (R.DEADLINE_PREDICTED, R.DEADLINE_EXCEEDED)


def test_a_failing_primary_falls_back_to_the_student_alone(routed):
    primary, student, router = routed
    model = _model(routed)

    def boom(module, inp):
        raise RuntimeError("stage 2 down")

    handle = primary.stages[2].register_forward_pre_hook(boom)
    try:
        out = model(_inputs(32, seed=3))
    finally:
        handle.remove()
    assert set(out.reason) <= {R.PRIMARY_ERROR, ""}
    assert all(s in ("exit_1", "exit_2", "student", "default") for s in out.served_by)
    assert any(r == R.PRIMARY_ERROR for r in out.reason)


def test_an_uncertified_router_answers_nothing(routed):
    primary, student, router = routed
    saved = float(router.threshold)
    router.threshold.fill_(math.inf)
    try:
        out = _model(routed)(_inputs(16))
    finally:
        router.threshold.fill_(saved)
    assert out.served_by == ["default"] * 16 and bool((out.prediction == -1).all())


def test_bundle_round_trip_keeps_the_router(routed, tmp_path):
    model = _model(routed)
    x = _inputs(64, seed=4)
    before = model(x)
    ff.save(model, tmp_path / "b")
    loaded = ff.load(tmp_path / "b")
    loaded.policy = ff.Policy(budget_ms=1e6)
    after = loaded(x)
    assert loaded.router is not None and float(loaded.router.threshold) == pytest.approx(0.45)
    assert after.served_by == before.served_by and torch.equal(after.prediction, before.prediction)


@pytest.mark.parametrize("scoped", [False, True])
def test_the_veto_with_a_router_decides_as_the_whole_batch_graph(routed, scoped):
    """Router + agreement veto + two rungs: the runtime and the whole-batch decisions agree per sample, and
    every kept answer of the primary's path or the student has a vetoing rung's agreement (scoped: every
    kept answer the router judges less likely right than veto_below, the median of its answers' p)."""
    from fallbackformer.export.onnx_export import compare_decisions, runtime_decisions
    from fallbackformer.rungs import Rung

    primary, student, router = routed
    torch.manual_seed(3)
    rungs = []
    for name in ("tree", "linear"):
        m = ff.create_model("linear_rung", num_features=64, num_classes=10).eval()
        with torch.no_grad():
            m.linear.weight.normal_(0.0, 0.3)
        rungs.append(Rung(name, m, ff.ConfidenceGate(temperature=1.0, threshold=0.3)))
    gates = [ff.ConfidenceGate(temperature=1.0, threshold=0.5) for _ in range(primary.num_exits + 1)]
    model = ff.FallbackModel(primary, student, gates, ff.Policy(budget_ms=1e6, hedge="off"), input_spec=SPEC,
                             router=router, fallbacks=rungs, veto=("tree", "linear")).eval()
    x = _inputs(300, seed=5)
    if scoped:
        plain = model.rebuild(veto=())(x)
        on_path = torch.tensor([s in primary.exit_names + ["student"] for s in plain.served_by])
        model = model.rebuild(veto_below=float(plain.confidence[on_path].median()))
    report = compare_decisions(runtime_decisions(model, x), dict(zip(
        ("prediction", "served_by", "confidence", "logits"), model.decisions(x))))
    assert report["decisions_agree"], report
    out = model(x)
    assert R.RUNG_DISAGREEMENT in out.reason and {"tree", "linear"} & set(out.served_by)
    with torch.no_grad():
        votes = torch.stack([r.module(x).argmax(1) for r in rungs])  # [2, B]
    kept = torch.tensor([s in primary.exit_names + ["student"] for s in out.served_by])
    reviewed = kept & (out.confidence < model.veto_below)
    assert reviewed.any() and bool((votes[:, reviewed] == out.prediction[reviewed]).any(0).all())
    if scoped:  # above the level an answer stands without a vetoing rung's agreement
        assert bool((kept & ~reviewed & ~(votes == out.prediction).any(0)).any())
