"""LightningDataModule over the digits splits (a :class:`~fallbackformer.data.protocol.DataSource`)."""

from __future__ import annotations

import torch

from fallbackformer.data.digits import CLASS_NAMES, INPUT_SPEC, SplitFractions, load_digits_splits
from fallbackformer.data.split_datamodule import SplitDataModule


class DigitsDataModule(SplitDataModule):
    """Digits splits as dataloaders; the raw images (0..16) go to the models unchanged.

    Args:
        seed: split seed.
        batch_size: training batch size.
        fractions: split fractions.
        augment_shift: if > 0, training images are shifted by up to this many pixels at random
            (a light augmentation; the models are translation-sensitive on 8x8 inputs).
    """

    INPUT_SPEC = INPUT_SPEC  # the raw input: [1, 8, 8] float32 in 0..16
    CLASS_NAMES = tuple(CLASS_NAMES)  # "0" .. "9"
    LOAD_SPLITS = staticmethod(load_digits_splits)

    def __init__(
        self,
        seed: int = 0,
        batch_size: int = 64,
        fractions: SplitFractions | None = None,
        augment_shift: int = 1,
    ) -> None:
        super().__init__(seed, batch_size, fractions)
        self.augment_shift = augment_shift

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
