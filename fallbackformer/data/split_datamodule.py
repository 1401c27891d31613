"""The LightningDataModule every embedded dataset shares: seeded splits served as dataloaders.

A dataset names its raw input (``INPUT_SPEC``), its classes (``CLASS_NAMES``) and the function that
makes its four splits (``LOAD_SPLITS(seed, fractions)``); everything else (setup, seeded loaders) is
here once, so the datasets differ only in what is theirs.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from fallbackformer.data.splits import SPLIT_NAMES, SplitFractions
from fallbackformer.runtime.validation import InputSpec

__all__ = ["SplitDataModule"]


class SplitDataModule(L.LightningDataModule):
    """Seeded train / val / calibration / test splits as dataloaders (subclass and set the class attributes).

    Args:
        seed: split seed (also seeds the training loader's shuffling).
        batch_size: training batch size.
        fractions: split fractions.

    Attributes:
        INPUT_SPEC: the raw input a model reads (set by each dataset).
        CLASS_NAMES: the classes, in label order (set by each dataset).
        LOAD_SPLITS: ``(seed, fractions) -> {split: (x, y)}`` for every name in ``SPLIT_NAMES``
            (a ``staticmethod``, set by each dataset).
    """

    INPUT_SPEC: InputSpec
    CLASS_NAMES: tuple[str, ...]
    LOAD_SPLITS: Callable[[int, SplitFractions], dict[str, tuple[torch.Tensor, torch.Tensor]]]

    def __init__(self, seed: int = 0, batch_size: int = 64, fractions: SplitFractions | None = None) -> None:
        super().__init__()
        self.seed, self.batch_size = seed, batch_size
        self.fractions = fractions or SplitFractions()
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def input_spec(self) -> InputSpec:
        """The raw input the models read."""
        return self.INPUT_SPEC

    @property
    def class_names(self) -> list[str]:
        """The classes, in label order."""
        return list(self.CLASS_NAMES)

    @property
    def num_classes(self) -> int:
        """How many classes."""
        return len(self.CLASS_NAMES)

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            splits = type(self).LOAD_SPLITS(self.seed, self.fractions)
            if tuple(splits) != SPLIT_NAMES:
                raise ValueError(f"{type(self).__name__}.LOAD_SPLITS returned {tuple(splits)}; expected {SPLIT_NAMES}")
            self.splits = splits

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        x, y = self.splits[name]
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=shuffle, generator=gen)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
