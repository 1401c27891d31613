"""The embedded default data: scikit-learn's digits (1797 images, 8x8, values 0..16), split once.

Splits are stratified and seeded: ``train`` fits weights, ``val`` chooses checkpoints,
``calibration`` fits temperatures and thresholds, ``test`` (and the shift sets made from it) is
touched only by evaluation.
"""

from __future__ import annotations

import numpy as np
import torch

from fallbackformer.data.splits import SPLIT_NAMES, SplitFractions, stratified_split_indices
from fallbackformer.runtime.validation import InputSpec

__all__ = ["CLASS_NAMES", "INPUT_SPEC", "SPLIT_NAMES", "SplitFractions", "load_digits_splits"]

CLASS_NAMES = [str(i) for i in range(10)]

INPUT_SPEC = InputSpec(
    shape=(1, 8, 8),
    dtype="float32",
    value_range=(0.0, 16.0),
    description="raw 8x8 digits image, values 0..16 (scikit-learn load_digits().images)",
)
"""The raw input of every digits model: what the datamodule serves and the bundle records."""


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
