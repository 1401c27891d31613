"""The digits splits: stratified, disjoint, complete, seeded; the training-time shift augmentation."""

from __future__ import annotations

import pytest
import torch

from fallbackformer.data.datamodule import random_shift
from fallbackformer.data.digits import SPLIT_NAMES, SplitFractions, load_digits_splits


def test_splits_are_disjoint_complete_stratified_and_seeded():
    a = load_digits_splits(seed=0)
    assert tuple(a) == SPLIT_NAMES
    total = sum(len(y) for _, y in a.values())
    assert total == 1797
    # disjoint and complete: together the splits hold exactly the data set's images
    from sklearn.datasets import load_digits

    rows = torch.cat([x.reshape(len(x), -1) for x, _ in a.values()])
    full = torch.tensor(load_digits().data, dtype=torch.float32)
    assert torch.equal(torch.unique(rows, dim=0), torch.unique(full, dim=0))
    assert rows.shape == full.shape
    for name, frac in zip(SPLIT_NAMES, (0.55, 0.10, 0.15, 0.20)):
        x, y = a[name]
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert abs(len(y) / total - frac) < 0.01
        counts = torch.bincount(y, minlength=10).float() / len(y)
        assert counts.max() - counts.min() < 0.03  # every class in every split, in proportion
    b = load_digits_splits(seed=0)
    c = load_digits_splits(seed=1)
    assert torch.equal(a["test"][0], b["test"][0])
    assert not torch.equal(a["test"][0], c["test"][0])


def test_split_fractions_are_checked():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitFractions(0.5, 0.1, 0.1, 0.1)


def test_random_shift_moves_images_by_at_most_one_pixel_and_zero_fills():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 16.0
    y = random_shift(x, 1)
    assert y.shape == x.shape
    assert torch.all(y.sum(dim=(1, 2, 3)) == x.sum(dim=(1, 2, 3)))  # the blob stays inside
    moved = (y != x).flatten(1).any(dim=1)
    assert 0 < int(moved.sum()) < 64
