"""LightningDataModule over the digits splits (a :class:`~fallbackformer.data.protocol.DataSource`)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from fallbackformer.data.digits import CLASS_NAMES, INPUT_SPEC, SplitFractions, load_digits_splits
from fallbackformer.runtime.validation import InputSpec


class DigitsDataModule(L.LightningDataModule):
    """Digits splits as dataloaders; the raw images (0..16) go to the models unchanged.

    Args:
        seed: split seed.
        batch_size: training batch size.
        fractions: split fractions.
        augment_shift: if > 0, training images are shifted by up to this many pixels at random
            (a light augmentation; the models are translation-sensitive on 8x8 inputs).
    """

    def __init__(
        self,
        seed: int = 0,
        batch_size: int = 64,
        fractions: SplitFractions | None = None,
        augment_shift: int = 1,
    ) -> None:
        super().__init__()
        self.seed, self.batch_size, self.augment_shift = seed, batch_size, augment_shift
        self.fractions = fractions or SplitFractions()
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def input_spec(self) -> InputSpec:
        """The raw input: ``[1, 8, 8]`` float32 in 0..16."""
        return INPUT_SPEC

    @property
    def class_names(self) -> list[str]:
        """``["0", ..., "9"]``."""
        return list(CLASS_NAMES)

    @property
    def num_classes(self) -> int:
        """10."""
        return len(CLASS_NAMES)

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = load_digits_splits(self.seed, self.fractions)

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

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        if self.trainer is not None and self.trainer.training and self.augment_shift > 0:
            x = random_shift(x, self.augment_shift)
        return x, y


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, zero-filled."""
    b = x.shape[0]
    padded = torch.nn.functional.pad(x, [max_shift] * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (b,))
    dy = torch.randint(0, 2 * max_shift + 1, (b,))
    h, w = x.shape[-2:]
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    return out.gather(3, cols)
