"""The embedded default data: scikit-learn's digits (1797 images, 8x8, values 0..16), split once.

Splits are stratified and seeded: ``train`` fits weights, ``val`` chooses checkpoints,
``calibration`` fits temperatures and thresholds, ``test`` (and the shift sets made from it) is
touched only by evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fallbackformer.runtime.validation import InputSpec

SPLIT_NAMES = ("train", "val", "calibration", "test")
CLASS_NAMES = [str(i) for i in range(10)]

INPUT_SPEC = InputSpec(
    shape=(1, 8, 8),
    dtype="float32",
    value_range=(0.0, 16.0),
    description="raw 8x8 digits image, values 0..16 (scikit-learn load_digits().images)",
)
"""The raw input of every digits model: what the datamodule serves and the bundle records."""


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


def load_digits_splits(
    seed: int = 0, fractions: SplitFractions | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load digits and split it, stratified by class, reproducibly for ``seed``.

    Args:
        seed: the split seed.
        fractions: split fractions (defaults: 0.55 / 0.10 / 0.15 / 0.20).

    Returns:
        ``{split: (images float32 [N, 1, 8, 8] in 0..16, labels int64 [N])}`` for the names in
        :data:`SPLIT_NAMES`.
    """
    from sklearn.datasets import load_digits

    fractions = fractions or SplitFractions()
    data = load_digits()
    images = data.images.astype(np.float32)  # [N, 8, 8]
    labels = data.target.astype(np.int64)
    out = {}
    for name, idx in stratified_split_indices(labels, seed, fractions).items():
        out[name] = (torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx]))
    return out
