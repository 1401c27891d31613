"""Typed safe defaults: each answers a batch as documented, round-trips through JSON, and refuses bad
values with a message that names them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fallbackformer.rungs.defaults import (
    Abstain,
    CallableDefault,
    Coarse,
    ConstantClass,
    Prior,
    default_from_dict,
    default_from_policy,
    list_default_actions,
    register_default_action,
)

NAN = float("nan")
LOOPS = {"loop": [0, 6, 8, 9], "straight": [1, 4, 7], "curve": [2, 3, 5]}


def _logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _round_trip(default):
    return default_from_dict(json.loads(json.dumps(default.to_dict())))


@register_default_action("test_stop_if_dark")
def _stop_if_dark(x, logits):
    """Class 0 ("stop") for a dark image, else abstain."""
    return torch.where(x.flatten(1).mean(1) < 1.0, 0, -1).long()


def test_abstain_answers_minus_one_with_every_class_possible():
    out = Abstain().answer(torch.full((3, 4), NAN))
    assert out.prediction.tolist() == [-1, -1, -1] and torch.isnan(out.confidence).all()
    assert out.prediction_set.all() and out.prediction_set.shape == (3, 4)
    assert _round_trip(Abstain()) == Abstain() and Abstain().to_dict() == {"kind": "abstain"}


def test_constant_class_answers_its_class_and_is_checked_against_the_classes():
    out = ConstantClass(2).answer(_logits([5.0, 0.0, 0.0, 0.0], [NAN] * 4))
    assert out.prediction.tolist() == [2, 2] and torch.isnan(out.confidence).all()
    assert out.prediction_set.tolist() == [[False, False, True, False]] * 2
    assert _round_trip(ConstantClass(2)) == ConstantClass(2)
    with pytest.raises(ValueError, match="class_index=7 is not one of the 4 classes"):
        ConstantClass(7).answer(torch.zeros(1, 4))
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="is not a class index"):
            ConstantClass(bad)


def test_prior_is_the_most_frequent_training_class_with_its_frequency_as_confidence():
    labels = torch.tensor([3, 1, 3, 2, 3, 1, 0, 3])
    prior = Prior.from_labels(labels, num_classes=4)
    assert prior == Prior(3, 0.5)
    out = prior.answer(torch.zeros(2, 4))
    assert out.prediction.tolist() == [3, 3] and out.confidence.tolist() == [0.5, 0.5]
    assert out.prediction_set[:, 3].all() and out.prediction_set.sum().item() == 2
    assert _round_trip(prior) == prior
    assert Prior.from_labels(torch.tensor([1, 0]), 2) == Prior(0, 0.5)  # a tie: the smallest class
    with pytest.raises(ValueError, match="class indices in 0..3"):
        Prior.from_labels(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="frequency=0.0 must lie in \\(0, 1\\]"):
        Prior(1, 0.0)


def test_coarse_chooses_the_group_with_the_most_probability_mass():
    coarse = Coarse(LOOPS)
    z = torch.zeros(3, 10)
    z[0, 6], z[0, 8] = 2.0, 2.0  # the two most likely classes both have loops
    z[1, 1], z[1, 7], z[1, 8] = 2.0, 2.0, 2.5  # 8 is the most likely class, but straight strokes hold more mass
    z[2] = NAN  # no path produced logits: abstain
    out = coarse.answer(z)
    assert out.prediction.tolist() == [-1, -1, -1]
    assert coarse.group_of(out.prediction_set) == ["loop", "straight", None]
    assert out.prediction_set[2].all() and math.isnan(out.confidence[2])
    p = torch.softmax(z[:2], 1)
    assert out.confidence[0].item() == pytest.approx(p[0, [0, 6, 8, 9]].sum().item(), abs=1e-6)
    assert out.confidence[1].item() == pytest.approx(p[1, [1, 4, 7]].sum().item(), abs=1e-6)
    assert out.confidence[1] > p[1, [0, 6, 8, 9]].sum()


def test_coarse_abstains_below_min_mass_and_round_trips():
    coarse = Coarse({"low": [0, 1], "high": [2, 3]}, min_mass=0.9)
    out = coarse.answer(_logits([5.0, 5.0, -5.0, -5.0], [0.0, 0.0, 0.0, 0.0]))
    assert coarse.group_of(out.prediction_set) == ["low", None] and math.isnan(out.confidence[1])
    assert _round_trip(coarse) == coarse and hash(_round_trip(coarse)) == hash(coarse)
    assert len({coarse, Coarse({"low": [0, 1], "high": [2, 3]}, min_mass=0.9), Coarse({"low": [0, 1]})}) == 2
    assert coarse.to_dict() == {"kind": "coarse", "groups": {"low": [0, 1], "high": [2, 3]}, "min_mass": 0.9}


@pytest.mark.parametrize("groups, match", [
    ({"loop": []}, "group 'loop' is empty"),
    ({"a": [0, 1], "b": [1, 2]}, "class 1 is in Coarse groups 'a' and 'b'"),
    ({}, "non-empty"),
    ({"": [0]}, "name '' must be a non-empty string"),
    ({"a": [0, -2]}, "is not a class index"),
    ({"a": "0,1"}, "not a list of classes"),
])
def test_bad_hierarchies_are_named(groups, match):
    with pytest.raises(ValueError, match=match):
        Coarse(groups)


def test_coarse_classes_outside_the_model_are_named():
    with pytest.raises(ValueError, match="group 'loop' names class 9, but there are 5 classes"):
        Coarse(LOOPS).answer(torch.zeros(1, 5))


def test_callable_default_runs_the_registered_function_by_name():
    assert "test_stop_if_dark" in list_default_actions()
    default = CallableDefault("test_stop_if_dark")
    x = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 9.0)])
    out = default.answer(torch.full((2, 3), NAN), x)
    assert out.prediction.tolist() == [0, -1] and torch.isnan(out.confidence).all()
    assert out.prediction_set.tolist() == [[True, False, False], [True, True, True]]
    assert _round_trip(default) == default and default.to_dict() == {"kind": "callable", "name": "test_stop_if_dark"}


def test_callable_default_refuses_unregistered_names_and_bad_answers():
    with pytest.raises(ValueError, match="no default action is registered as 'nope'.*register_default_action"):
        CallableDefault("nope")
    with pytest.raises(ValueError, match="no default action is registered as 'nope'"):
        default_from_dict({"kind": "callable", "name": "nope"})

    @register_default_action("test_out_of_range")
    def _bad(x, logits):
        return torch.full((logits.shape[0],), 5)

    with pytest.raises(ValueError, match="returned \\[5, 5\\]; each value must be a class in 0..2 or -1"):
        CallableDefault("test_out_of_range").answer(torch.zeros(2, 3))

    @register_default_action("test_wrong_shape")
    def _shape(x, logits):
        return torch.zeros(1)

    with pytest.raises(ValueError, match="returned torch.float32 \\(1,\\); it must return an integer tensor \\[B\\]"):
        CallableDefault("test_wrong_shape").answer(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="already registered"):
        register_default_action("test_wrong_shape")(lambda x, logits: x)


def test_manifest_form_refuses_unknown_kinds_and_fields():
    with pytest.raises(ValueError, match="unknown safe default kind 'maybe'"):
        default_from_dict({"kind": "maybe"})
    with pytest.raises(ValueError, match="'constant' has unknown fields \\['confidence'\\]"):
        default_from_dict({"kind": "constant", "class_index": 1, "confidence": 0.5})
    with pytest.raises(ValueError, match="'prior' needs the fields"):
        default_from_dict({"kind": "prior", "class_index": 1})


def test_policy_default_class_maps_onto_the_typed_defaults():
    assert default_from_policy(None) == Abstain() and default_from_policy(3) == ConstantClass(3)
    with pytest.raises(ValueError, match="logits \\[B, C\\]"):
        Abstain().answer(torch.zeros(3))
