"""Seeded, stratified train / val / calibration / test splits, shared by every embedded dataset.

``train`` fits weights, ``val`` chooses checkpoints (and trains learned scores), ``calibration`` fits
temperatures and thresholds, ``test`` (and the shift sets made from it) is touched only by evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SPLIT_NAMES", "SplitFractions", "stratified_split_indices"]

SPLIT_NAMES = ("train", "val", "calibration", "test")


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of the data per split; they must sum to 1."""

    train: float = 0.55
    val: float = 0.10
    calibration: float = 0.15
    test: float = 0.20

    def __post_init__(self) -> None:
        values = [self.train, self.val, self.calibration, self.test]
        if any(v <= 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(
                f"split fractions must be positive and sum to 1; got {values} (sum {sum(values):.4f})"
            )


def stratified_split_indices(labels: np.ndarray, seed: int, fractions: SplitFractions) -> dict[str, np.ndarray]:
    """Row indices per split, stratified by class and reproducible for ``seed`` (sorted within a split)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    cuts = np.cumsum([fractions.train, fractions.val, fractions.calibration])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.round(cuts * len(idx)).astype(int)
        for name, chunk in zip(SPLIT_NAMES, np.split(idx, bounds)):
            parts[name].append(chunk)
    return {name: np.sort(np.concatenate(parts[name])) for name in SPLIT_NAMES}
