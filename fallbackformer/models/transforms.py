"""Input transforms: part of each model, so inference code never repeats the preprocessing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScaleShift(nn.Module):
    """``(x / scale - mean) / std``: maps raw values (digits: 0..16) to a normalised range.

    Args:
        scale: the raw value range's top (16 for digits).
        mean: mean of ``x / scale`` on the training data.
        std: standard deviation of ``x / scale`` on the training data.
    """

    def __init__(self, scale: float = 16.0, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        if scale <= 0 or std <= 0:
            raise ValueError(f"scale and std must be positive; got scale={scale}, std={std}")
        self.scale, self.mean, self.std = float(scale), float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self.scale - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"scale={self.scale}, mean={self.mean}, std={self.std}"


class Resize(nn.Module):
    """Bilinear resize of ``[B, C, H, W]`` images to ``size x size``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"
