"""The fallback ladder in the runtime: rungs after the student, the agreement veto, the cache, typed defaults."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.export.onnx_export import compare_decisions, runtime_decisions
from fallbackformer.rungs import CacheConfig, Coarse, Prior, Rung
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.events import ListSink

SPEC = ff.InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0))


def _inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 16


def _gate_for(logits: torch.Tensor, fraction: float) -> ff.ConfidenceGate:
    """A gate that accepts about ``fraction`` of a reference batch's logits."""
    gate = ff.ConfidenceGate(temperature=1.0, threshold=0.0)
    conf = gate.confidence(logits).sort(descending=True).values
    k = int(fraction * len(conf))
    gate.threshold.fill_(float((conf[k - 1] + conf[k]) / 2))
    return gate


def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = ff.create_model("linear_rung", num_features=64, num_classes=10).eval()
    with torch.no_grad():
        m.linear.weight.normal_(0.0, 0.3)
    return m


def _ladder(veto=(), cache=None, default=None, policy=None, router=None, veto_below=math.inf):
    torch.manual_seed(0)
    primary = ff.create_model("digits_cnn_exits", num_classes=10, width=4).eval()
    student = ff.create_model("digits_mlp_student", num_classes=10, hidden=16).eval()
    x = _inputs(256, seed=1000)
    rungs_m = {"tree": _linear(1), "linear": _linear(2)}
    with torch.no_grad():
        logits = primary(x) + [student(x)]
        gates = [_gate_for(z, f) for z, f in zip(logits, (0.3, 0.3, 0.3, 0.5, 0.6))]
        rungs = [Rung(n, m, _gate_for(m(x), 0.5)) for n, m in rungs_m.items()]
    policy = policy or ff.Policy(budget_ms=1e6, hedge="off")
    return ff.FallbackModel(primary, student, gates, policy, input_spec=SPEC, fallbacks=rungs, veto=veto,
                            veto_below=veto_below, cache=cache, default=default).eval()


@pytest.mark.parametrize("veto", [(), ("tree", "linear")])
def test_the_ladders_whole_batch_decisions_equal_the_runtime(veto):
    model = _ladder(veto=veto)
    assert model.path_names[-3:] == ["student", "tree", "linear"]
    x = _inputs(300)
    want = runtime_decisions(model, x)
    with torch.no_grad():
        got = dict(zip(("prediction", "served_by", "confidence", "logits"), model.decisions(x)))
    report = compare_decisions(want, got)
    assert report["decisions_agree"], report
    codes = set(report["served_by_counts"])
    assert {5, 6, 7} <= codes  # the student, both rungs and the default all serve some samples
    out = model(x)
    assert {"tree", "linear"} <= set(out.served_by)
    if veto:  # an answer kept by the veto: some vetoing rung predicts its class
        assert R.RUNG_DISAGREEMENT in out.reason
        with torch.no_grad():
            votes = torch.stack([model.decisions.rungs[n](x).argmax(1) for n in veto])  # [2, B]
        kept = torch.tensor([s in model.primary.exit_names + ["student"] for s in out.served_by])
        assert bool((votes[:, kept] == out.prediction[kept]).any(0).all())
        assert all(s not in model.primary.exit_names for s, r in zip(out.served_by, out.reason)
                   if r == R.RUNG_DISAGREEMENT)  # a vetoed answer went down the ladder


def _reviewed_and_refused(model, x, out):
    """Rows whose final answer came from the primary's path or the student, and the rows the veto refused."""
    kept = torch.tensor([s in model.primary.exit_names + ["student"] for s in out.served_by])
    refused = torch.tensor([r == R.RUNG_DISAGREEMENT for r in out.reason])
    return kept, refused


def test_the_veto_reviews_only_answers_less_confident_than_its_level():
    """veto_below: a confident answer stands without a vetoing rung's agreement, a less confident one needs it;
    the whole-batch decisions (the exported graph) equal the runtime's, and fewer answers are taken back."""
    every = _ladder(veto=("tree", "linear"))
    x = _inputs(300)
    plain = _ladder()(x)  # the level: the median confidence of the primary's path's answers without a veto
    on_path = torch.tensor([s in every.primary.exit_names for s in plain.served_by])
    level = float(plain.confidence[on_path].median())
    model = _ladder(veto=("tree", "linear"), veto_below=level)
    assert model.veto_below == level and model.rebuild().veto_below == level
    report = compare_decisions(runtime_decisions(model, x), dict(zip(
        ("prediction", "served_by", "confidence", "logits"), model.decisions(x))))
    assert report["decisions_agree"], report
    out, out_every = model(x), every(x)
    with torch.no_grad():
        votes = torch.stack([model.decisions.rungs[n](x).argmax(1) for n in ("tree", "linear")])  # [2, B]
    kept, refused = _reviewed_and_refused(model, x, out)
    agreed = (votes == out.prediction).any(0)
    unsure = out.confidence < level
    assert bool((agreed | ~unsure)[kept].all())  # every kept answer below the level has a rung's agreement
    assert bool((kept & ~unsure & ~agreed).any())  # ... and above it some stand without one
    _, refused_every = _reviewed_and_refused(every, x, out_every)
    assert 0 < int(refused.sum()) < int(refused_every.sum())
    with pytest.raises(ValueError, match="veto_below"):
        _ladder(veto=("tree",), veto_below=0.0)


def test_the_veto_off_leaves_the_single_student_answers_unchanged():
    model = _ladder()
    plain = ff.FallbackModel(model.primary, model.student, {n: model.gates[n] for n in model.path_names[:5]},
                             model.policy, input_spec=SPEC).eval()
    x = _inputs(200)
    a, b = plain(x), model(x)
    served = [s not in ("tree", "linear", "default") for s in b.served_by]
    assert [s for s, keep in zip(a.served_by, served) if keep] == [s for s, keep in zip(b.served_by, served) if keep]
    assert torch.equal(a.prediction[torch.tensor(served)], b.prediction[torch.tensor(served)])
    assert sum(s == "default" for s in a.served_by) > sum(s == "default" for s in b.served_by)


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("rung broke")


def test_a_rung_that_raises_leaves_a_record_and_the_next_rung_serves():
    model = _ladder()
    sink = ListSink()
    broken = model.rebuild(fallbacks=[Rung("tree", _Boom(), model.gates["tree"]), model.fallbacks[1]], sinks=[sink])
    out = broken(_inputs(200))
    assert "tree" not in out.served_by and "linear" in out.served_by
    broken.flush_events()
    assert sink.events and all("tree RuntimeError: rung broke" in e.detail for e in sink.events)


def test_the_cache_answers_identical_inputs_when_the_primary_cannot():
    model = _ladder(cache=CacheConfig(max_entries=64, ttl_ms=math.inf, min_confidence=0.0))
    x = _inputs(40)
    first = model(x)
    primary_rows = [i for i, s in enumerate(first.served_by) if s in model.primary.exit_names]
    assert len(model.cache) == len(primary_rows) > 0
    model.set_rollback(True)  # the primary's path is down: breaker_open
    near = x.clone()
    near[:, 0, 0, 0] = torch.nextafter(near[:, 0, 0, 0], torch.tensor(100.0))  # one ulp away
    again, other = model(x), model(near)
    for i in primary_rows:
        assert again.served_by[i] == "cache" and again.reason[i] == R.BREAKER_OPEN
        assert again.prediction[i] == first.prediction[i] and again.confidence[i] == first.confidence[i]
        assert other.served_by[i] != "cache"  # a near-duplicate is another input
    assert "cache" not in [again.served_by[i] for i in range(40) if i not in primary_rows]


def test_the_cache_is_bounded_and_filled_only_from_the_primarys_path():
    model = _ladder(cache=CacheConfig(max_entries=5, ttl_ms=math.inf, min_confidence=0.0))
    for seed in range(4):
        model(_inputs(50, seed=seed))
    assert len(model.cache) == 5
    assert model.cache.stats()["evicted"] > 0


def test_a_coarse_default_answers_minus_one_with_a_set():
    coarse = Coarse({"loop": [0, 6, 8, 9], "straight": [1, 4, 7], "other": [2, 3, 5]})
    model = _ladder(default=coarse)
    x = _inputs(400)
    out = model(x)
    sets = out.prediction_set
    assert sets.dtype == torch.bool and sets.shape == (400, 10)
    for i, s in enumerate(out.served_by):
        if s == "default":
            assert out.prediction[i] == -1
            assert coarse.group_of(sets[i:i + 1])[0] is not None or bool(sets[i].all())
        else:
            assert sets[i].sum() == 1 and bool(sets[i, out.prediction[i]])
    assert "default" in out.served_by


def test_a_prior_default_answers_its_class_with_its_frequency():
    model = _ladder(default=Prior(class_index=3, frequency=0.25))
    out = model(_inputs(400))
    rows = [i for i, s in enumerate(out.served_by) if s == "default"]
    assert rows and all(int(out.prediction[i]) == 3 for i in rows)
    assert all(float(out.confidence[i]) == pytest.approx(0.25) for i in rows)


def test_a_typed_default_and_a_default_class_together_are_refused():
    with pytest.raises(ValueError, match="default_class"):
        _ladder(default=Prior(class_index=3, frequency=0.25), policy=ff.Policy(default_class=1, hedge="off"))


def test_the_ladder_under_hedging_decides_as_inline():
    model = _ladder(policy=ff.Policy(budget_ms=1e6, hedge="always"))
    inline = model.rebuild(policy=ff.Policy(budget_ms=1e6, hedge="off"))
    x = _inputs(400)
    try:
        out, want = model(x), inline(x)
        assert out.served_by == want.served_by and torch.equal(out.prediction, want.prediction)
        assert {"tree", "linear"} <= set(out.served_by)
    finally:
        model.close(timeout_s=1.0)


def test_stats_count_every_rung_as_a_fallback():
    model = _ladder()
    out = model(_inputs(100))
    stats = model.stats()
    off_primary = sum(s not in model.primary.exit_names for s in out.served_by)
    assert stats["fallback_rate"] == pytest.approx(off_primary / 100)
    assert dataclasses.asdict(model.policy)["hedge"] == "off"


def test_a_vetoed_fallback_keeps_its_trigger_and_rebuild_takes_every_paths_gates():
    """The rollback switch sends every sample to the student; the veto then refuses some of its answers, and
    those keep breaker_open (why they left the primary's path). model.gates as it is rebuilds the ladder."""
    model = _ladder(veto=("tree", "linear"))
    same = model.rebuild(gates={n: model.gates[n] for n in model.path_names})
    assert [r.gate for r in same.fallbacks] == [r.gate for r in model.fallbacks]
    plain = _ladder()
    model.set_rollback(True)
    plain.set_rollback(True)
    x = _inputs(200)
    out, unvetoed = model(x), plain(x)
    assert set(out.reason) == {R.BREAKER_OPEN}
    assert out.served_by.count("student") < unvetoed.served_by.count("student")  # the veto refused some
