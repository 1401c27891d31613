"""A second embedded dataset, tabular: scikit-learn's breast cancer data (569 rows, 30 features, 2 classes).

The models read the 30 raw, unscaled features ``[B, 30]``; their standardisation is inside them
(:class:`~fallbackformer.models.transforms.Standardize`, fitted on the training split). Splits are
stratified and seeded like digits (:mod:`fallbackformer.data.splits`). The shift suite is the
tabular one (:class:`~fallbackformer.data.tabular_shift.TabularShiftSuite`), its statistics taken
from the same training split.

Features come in three groups of ten (scikit-learn's order): the mean of each cell measurement
(0..9), its standard error (10..19) and its worst value (20..29).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fallbackformer.data.split_datamodule import SplitDataModule
from fallbackformer.data.splits import SplitFractions, stratified_split_indices
from fallbackformer.data.tabular_shift import TabularShiftSuite
from fallbackformer.runtime.validation import InputSpec

__all__ = ["CLASS_NAMES", "INPUT_SPEC", "BreastCancerDataModule", "breast_cancer_shift_suite",
           "load_breast_cancer_splits"]

CLASS_NAMES = ["malignant", "benign"]  # scikit-learn's target 0 and 1
NUM_FEATURES = 30
FEATURE_GROUPS = {"mean": list(range(0, 10)), "error": list(range(10, 20)), "worst": list(range(20, 30))}

INPUT_SPEC = InputSpec(
    shape=(NUM_FEATURES,),
    dtype="float32",
    value_range=None,  # unscaled measurements; shifted data may leave any fixed range, and must still be served
    description="the 30 raw features of scikit-learn load_breast_cancer().data, unscaled",
)


def load_breast_cancer_splits(seed: int = 0, fractions: SplitFractions | None = None
                              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load the data and split it, stratified by class, reproducibly for ``seed``.

    Returns:
        ``{split: (features float32 [N, 30], labels int64 [N])}`` for the names in ``SPLIT_NAMES``.
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    return {name: (torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))
            for name, idx in stratified_split_indices(y, seed, fractions or SplitFractions()).items()}


class BreastCancerDataModule(SplitDataModule):
    """Breast cancer splits as dataloaders (a :class:`~fallbackformer.data.protocol.DataSource`).

    Args:
        seed: split seed.
        batch_size: training batch size.
        fractions: split fractions.
    """

    INPUT_SPEC = INPUT_SPEC  # the raw input: [30] float32, unscaled
    CLASS_NAMES = tuple(CLASS_NAMES)  # "malignant", "benign"
    LOAD_SPLITS = staticmethod(load_breast_cancer_splits)

    def __init__(self, seed: int = 0, batch_size: int = 32, fractions: SplitFractions | None = None) -> None:
        super().__init__(seed, batch_size, fractions)


def breast_cancer_shift_suite(
    names: Sequence[str] = ("feature_noise", "missing_features", "scale_drift"),
    held_out: Sequence[str] = ("subpopulation",),
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    data_seed: int = 0,
    fractions: SplitFractions | None = None,
    drift_group: str = "worst",
    subpopulation_feature: int = 0,
) -> TabularShiftSuite:
    """The tabular shift suite with its statistics from the breast cancer TRAINING split.

    Args:
        names: tunable shifts.
        held_out: shifts never used for tuning.
        severities: severities per shift.
        seed: the suite's seed.
        data_seed: the datamodule's split seed (the statistics come from its training split).
        fractions: the datamodule's split fractions.
        drift_group: the feature group ``scale_drift`` multiplies (``mean``, ``error`` or ``worst``).
        subpopulation_feature: the feature the subpopulation shift leans on (0: mean radius).
    """
    if drift_group not in FEATURE_GROUPS:
        raise ValueError(f"drift_group {drift_group!r} is unknown; choose one of {sorted(FEATURE_GROUPS)}")
    x_train = load_breast_cancer_splits(data_seed, fractions)["train"][0].double()
    return TabularShiftSuite(mean=x_train.mean(0).tolist(), std=x_train.std(0).tolist(), names=names,
                             held_out=held_out, severities=severities, seed=seed,
                             drift_features=FEATURE_GROUPS[drift_group], subpopulation_feature=subpopulation_feature)
