"""Tabular reference models: registered, standardisation and feature choice fitted into buffers."""

from __future__ import annotations

import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.breast_cancer import load_breast_cancer_splits
from fallbackformer.models.transforms import Standardize, fit_input_transforms


def test_registered_and_shaped():
    assert {"tabular_mlp_exits", "tabular_topk_student"} <= set(ff.list_models())
    primary = ff.create_model("tabular_mlp_exits", num_features=30, num_classes=2, hidden=8, depth=3)
    student = ff.create_model("tabular_topk_student", num_features=30, num_classes=2, k=5, hidden=0)
    x = torch.rand(4, 30)
    assert [t.shape for t in primary(x)] == [torch.Size([4, 2])] * 3 and primary.num_exits == 3
    assert student(x).shape == (4, 2)


def test_fitted_constants_are_buffers_that_a_rebuild_restores():
    x, y = load_breast_cancer_splits(seed=0)["train"]
    primary = ff.create_model("tabular_mlp_exits", hidden=8)
    student = ff.create_model("tabular_topk_student", k=6)
    assert fit_input_transforms(primary, x, y) == ["input_transform"]
    assert fit_input_transforms(student, x, y) == ["input_transform"]
    z = primary.input_transform(x)
    assert torch.allclose(z.mean(0), torch.zeros(30), atol=1e-4) and torch.allclose(z.std(0), torch.ones(30), atol=1e-3)
    chosen = student.input_transform.index.tolist()
    assert len(chosen) == 6 and 27 in chosen  # "worst concave points" separates the classes best
    for model in (primary, student):
        rebuilt = ff.create_model(model.registry_name, **model.registry_kwargs)
        rebuilt.load_state_dict(model.state_dict())  # buffers travel with the weights
        model.eval(), rebuilt.eval()
        out_a, out_b = model(x[:5]), rebuilt(x[:5])
        for a, b in zip(out_a if isinstance(out_a, list) else [out_a], out_b if isinstance(out_b, list) else [out_b]):
            assert torch.equal(a, b)


def test_standardize_errors_name_the_fix():
    with pytest.raises(ValueError, match="Standardize\\(3\\)"):
        Standardize(2).fit_from_data(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="k=9"):
        ff.create_model("tabular_topk_student", num_features=4, k=9)
