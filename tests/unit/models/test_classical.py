"""Classical rungs as tensors: a hand-built tree traversed by gathers, the linear rung, the feature
transforms, and the reduced-input digits student (no scikit-learn here: see training/test_rung_fit.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.models.classical import (
    MISSING_CLASS_LOGIT,
    TreeEnsemble,
    build_feature_transform,
    transform_spec_of,
)
from fallbackformer.models.transforms import ScaleShift, Standardize
from fallbackformer.models.tabular import SelectTopK


def _two_trees() -> TreeEnsemble:
    """Tree 0: x0 <= 0.5 ? (x1 <= 2 ? leaf A : leaf B) : leaf C.  Tree 1: a single leaf D (depth 0)."""
    m = ff.create_model("tree_rung", num_features=2, num_classes=3, num_trees=2, num_nodes=5, depth=2,
                        output="sum")
    with torch.no_grad():
        # tree 0 rows 0..4: 0 root, 1 inner, 2 leaf C, 3 leaf A, 4 leaf B
        m.feature[:5] = torch.tensor([0, 1, 0, 0, 0])
        m.threshold[:5] = torch.tensor([0.5, 2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        m.left[:5] = torch.tensor([1, 3, 2, 3, 4])
        m.right[:5] = torch.tensor([2, 4, 2, 3, 4])
        m.value[2] = torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64)  # C
        m.value[3] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # A
        m.value[4] = torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)  # B
        m.value[5] = torch.tensor([0.25, 0.25, 0.25], dtype=torch.float64)  # tree 1's root is a leaf
        m.bias.copy_(torch.tensor([0.0, 0.1, -0.1], dtype=torch.float64))
    return m.eval()


def _brute_force(x: torch.Tensor) -> torch.Tensor:
    out = []
    for x0, x1 in x.tolist():
        leaf = [0.0, 0.0, 5.0] if x0 > 0.5 else ([1.0, 0.0, 0.0] if x1 <= 2.0 else [0.0, 2.0, 0.0])
        out.append([a + b + 0.25 for a, b in zip(leaf, [0.0, 0.1, -0.1])])
    return torch.tensor(out)


def test_gather_traversal_equals_a_brute_force_walk_thresholds_inclusive():
    m = _two_trees()
    x = torch.tensor([[0.5, 2.0], [0.5, 2.0001], [0.51, -7.0], [-1.0, 1.0], [3.0, 9.0]])
    assert torch.allclose(m(x), _brute_force(x), atol=1e-6)
    assert m.leaves(x).tolist() == [[3, 5], [4, 5], [2, 5], [3, 5], [2, 5]]  # global node indices


def test_mean_proba_output_is_a_floored_log_of_the_average_leaf_probability():
    m = _two_trees()
    m.output, m.floor = "mean_proba", 1e-3
    with torch.no_grad():
        m.bias.zero_()
        m.value[2] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        m.value[5] = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    logits = m(torch.tensor([[1.0, 0.0]]))  # leaf C and tree 1's leaf: mean [0.25, 0.25, 0.5]
    assert torch.allclose(logits, torch.log(torch.tensor([[0.25, 0.25, 0.5]])))
    m.value[5] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert m(torch.tensor([[1.0, 0.0]]))[0, 0].item() == pytest.approx(math.log(1e-3))  # the floor, finite


def test_non_finite_rows_get_nan_logits_that_no_gate_accepts():
    m = _two_trees()
    x = torch.tensor([[float("nan"), 0.0], [0.0, float("inf")], [0.0, 0.0]])
    logits = m(x)
    assert torch.isnan(logits[:2]).all() and torch.isfinite(logits[2]).all()
    gate = ff.ConfidenceGate(threshold=0.0)
    assert gate.accept(logits).tolist() == [False, False, True]
    lin = ff.create_model("linear_rung", num_features=2, num_classes=3)
    assert torch.isnan(lin(x)[:2]).all()


def test_linear_rung_is_a_float64_linear_layer_on_the_transformed_flat_input():
    torch.manual_seed(0)
    spec = {"kind": "scale_shift", "scale": 16.0, "mean": 0.3, "std": 0.4}
    m = ff.create_model("linear_rung", num_features=64, num_classes=10, transform=spec).eval()
    assert m.linear.weight.dtype == torch.float64
    nn.init.normal_(m.linear.weight)
    x = torch.rand(5, 1, 8, 8) * 16
    z = ((x / 16 - 0.3) / 0.4).reshape(5, 64).double()
    expected = (z @ m.linear.weight.T + m.linear.bias).float()
    assert torch.allclose(m(x), expected, atol=1e-5) and m(x).dtype == torch.float32
    with pytest.raises(ValueError, match="reads 64 features per sample; got input \\(5, 1, 4, 4\\)"):
        m(torch.rand(5, 1, 4, 4))


def test_feature_transforms_from_specs_and_from_students():
    assert isinstance(build_feature_transform(None, 4), nn.Identity)
    assert isinstance(build_feature_transform({"kind": "standardize"}, 4), Standardize)
    student = ff.create_model("digits_mlp_student")
    spec = transform_spec_of(student.input_transform)
    assert spec == {"kind": "scale_shift", "scale": 16.0, "mean": 0.305, "std": 0.385}
    assert isinstance(build_feature_transform(spec, 64), ScaleShift)
    assert transform_spec_of(Standardize(30)) == {"kind": "standardize"}
    assert transform_spec_of(None) == {"kind": "identity"}
    with pytest.raises(ValueError, match="cannot reproduce the transform"):
        transform_spec_of(SelectTopK(30, 5))
    with pytest.raises(ValueError, match="kind one of"):
        build_feature_transform({"kind": "log"}, 4)
    with pytest.raises(ValueError, match="kind one of"):
        build_feature_transform({"kind": "scale_shift", "offset": 1.0}, 4)


def test_bad_tree_arguments_are_named():
    with pytest.raises(ValueError, match="trees_per_step=3 must divide num_trees=4"):
        ff.create_model("tree_rung", num_features=2, num_classes=3, num_trees=4, num_nodes=3, depth=1,
                        trees_per_step=3)
    with pytest.raises(ValueError, match="output='vote'"):
        ff.create_model("tree_rung", num_features=2, num_classes=3, num_trees=1, num_nodes=3, depth=1, output="vote")


def test_the_registry_rebuilds_rungs_on_the_meta_device_with_the_same_tensors():
    m = _two_trees()
    with torch.device("meta"):
        rebuilt = ff.create_model(m.registry_name, **m.registry_kwargs)
    assert {k: (v.shape, v.dtype) for k, v in rebuilt.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in m.state_dict().items()}
    assert MISSING_CLASS_LOGIT > -1e30  # finite: a gate would turn -inf into NaN


def test_pooled_student_reads_the_4x4_average_only():
    torch.manual_seed(0)
    m = ff.create_model("digits_pooled_student").eval()
    assert "digits_pooled_student" in ff.list_models()
    x = torch.rand(3, 1, 8, 8) * 16
    y = x.clone()
    y[:, :, 0, 0] += 2.0  # the same 2x2 block keeps its mean
    y[:, :, 1, 1] -= 2.0
    assert torch.allclose(m(x), m(y), atol=1e-5)
    y[:, :, 1, 1] += 2.0  # now the block mean changes
    assert not torch.allclose(m(x), m(y), atol=1e-3)
    assert m.net[0].in_features == 16
    with pytest.raises(ValueError, match="pool=3 must be >= 1 and divide image_size=8"):
        ff.create_model("digits_pooled_student", pool=3)
