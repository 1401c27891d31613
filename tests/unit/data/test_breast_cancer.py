"""Breast cancer data and the tabular shift suite: splits, the data protocol, determinism, severities."""

from __future__ import annotations

import pytest
import torch

from fallbackformer.data.breast_cancer import (
    CLASS_NAMES,
    BreastCancerDataModule,
    breast_cancer_shift_suite,
    load_breast_cancer_splits,
)
from fallbackformer.data.mixture import corrupted_copies, draw_mixture
from fallbackformer.data.protocol import DataSource, ShiftSuiteLike, parse_set_key
from fallbackformer.data.splits import SPLIT_NAMES
from fallbackformer.data.tabular_shift import TabularShiftSuite


@pytest.fixture(scope="module")
def splits():
    return load_breast_cancer_splits(seed=0)


@pytest.fixture(scope="module")
def suite():
    return breast_cancer_shift_suite(data_seed=0)


def test_splits_are_disjoint_complete_stratified_and_seeded(splits):
    assert tuple(splits) == SPLIT_NAMES
    assert sum(len(y) for _, y in splits.values()) == 569
    rows = torch.cat([x for x, _ in splits.values()])
    assert torch.unique(rows, dim=0).shape[0] == 569  # no row in two splits
    shares = [float(y.float().mean()) for _, y in splits.values()]
    assert max(shares) - min(shares) < 0.03  # stratified: the benign share is the same in every split
    again = load_breast_cancer_splits(seed=0)
    assert all(torch.equal(splits[k][0], again[k][0]) for k in SPLIT_NAMES)
    assert not torch.equal(splits["test"][0], load_breast_cancer_splits(seed=1)["test"][0])
    assert splits["train"][0].shape[1] == 30 and splits["train"][0].dtype == torch.float32


def test_datamodule_satisfies_the_data_protocol():
    dm = BreastCancerDataModule(seed=0)
    dm.setup()
    assert isinstance(dm, DataSource)
    assert dm.input_spec.shape == (30,) and dm.class_names == CLASS_NAMES and dm.num_classes == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 30) and y.dtype == torch.int64


def test_suite_protocol_sets_and_keys(suite, splits):
    assert isinstance(suite, ShiftSuiteLike)
    x, y = splits["test"]
    sets = suite.build(x, y)
    assert len(sets) == len(suite.all_names) * len(suite.severities)
    for key, (xs, ys) in sets.items():
        name, sev = parse_set_key(key)
        assert xs.shape == x.shape and ys.shape == y.shape and torch.isfinite(xs).all(), key
    assert suite.is_held_out("subpopulation/3") and not suite.is_held_out("feature_noise/3")
    assert set(suite.build(x, y, include_held_out=False)) == {k for k in sets if not k.startswith("subpopulation")}


def test_corruptions_are_deterministic_and_grow_with_severity(suite, splits):
    x = splits["test"][0]
    std = x.std(0)
    for name in suite.names:
        a, b = suite.corrupt(x, name, 3, seed=5), suite.corrupt(x, name, 3, seed=5)
        assert torch.equal(a, b), name
        dist = [float(((suite.corrupt(x, name, s, seed=5) - x).abs() / std).mean()) for s in range(1, 6)]
        assert all(d1 < d2 for d1, d2 in zip(dist, dist[1:])), (name, dist)
    assert not torch.equal(suite.corrupt(x, "feature_noise", 3, seed=5), suite.corrupt(x, "feature_noise", 3, seed=6))


def test_missing_values_take_the_training_mean_and_drift_moves_one_group(suite, splits):
    x = splits["test"][0]
    mean = splits["train"][0].double().mean(0).float()
    out = suite.corrupt(x, "missing_features", 5, seed=0)
    changed = out != x
    assert changed.any()
    assert torch.allclose(out[changed], mean.expand_as(x)[changed])
    drifted = suite.corrupt(x, "scale_drift", 5, seed=0)
    moved = (drifted != x).any(0).nonzero().flatten().tolist()
    assert moved and set(moved) <= set(range(20, 30))  # the "worst" group only


def test_subpopulation_leans_toward_the_upper_tail(suite, splits):
    x, y = splits["test"]
    xs, ys = suite.resample(x, y, 5, seed=0)
    assert float(xs[:, 0].mean()) > float(x[:, 0].mean())  # larger mean radius
    assert float(ys.float().mean()) < float(y.float().mean())  # so fewer benign rows
    with pytest.raises(ValueError, match="build"):
        suite.corrupt(x, "subpopulation", 3)


def test_mixture_and_router_data_use_the_suite(suite, splits):
    x, y = splits["calibration"]
    out, kinds = draw_mixture(x, suite.names, [1, 5], 0.5, seed=3, suite=suite)
    assert out.shape == x.shape and {k.split("/")[0] for k in kinds} <= {"clean", *suite.names}
    xs, ys = corrupted_copies(x, y, suite.names, [2], seed=1, suite=suite)
    assert xs.shape[0] == x.shape[0] * (1 + len(suite.names)) and torch.equal(ys[: len(y)], y)
    with pytest.raises(ValueError, match="held-out"):
        draw_mixture(x, ["subpopulation"], [1], 0.5, seed=0, suite=suite)


def test_bad_suite_settings_name_the_value():
    with pytest.raises(KeyError, match="rotate"):
        TabularShiftSuite(mean=[0.0], std=[1.0], names=["rotate"])
    with pytest.raises(ValueError, match="held_out"):
        TabularShiftSuite(mean=[0.0], std=[1.0], names=["subpopulation"], held_out=[])
    with pytest.raises(ValueError, match="outside"):
        TabularShiftSuite(mean=[0.0], std=[1.0], drift_features=[3])
    with pytest.raises(ValueError, match="drift_group"):
        breast_cancer_shift_suite(drift_group="nope")
