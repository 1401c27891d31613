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


class Standardize(nn.Module):
    """``(x - mean) / std`` per feature, with ``mean`` and ``std`` as buffers fitted on training data.

    The constants are buffers, so they travel in the model's weights file and a bundle rebuilds the
    transform exactly (the registry builds it with the defaults, the weights file fills them in).

    Args:
        num_features: size of the last dimension.

    >>> t = Standardize(2).fit_from_data(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))
    >>> t(torch.tensor([[1.0, 20.0]]))
    tensor([[0., 0.]])
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.register_buffer("mean", torch.zeros(num_features))  # [D]
        self.register_buffer("std", torch.ones(num_features))  # [D]

    @torch.no_grad()
    def fit_from_data(self, x: torch.Tensor, y: torch.Tensor | None = None) -> "Standardize":
        """Set ``mean`` and ``std`` from training inputs ``x`` ``[N, D]`` (``y`` is unused); returns self."""
        x = x.reshape(x.shape[0], -1).double()
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"Standardize was built for {self.mean.shape[0]} features; x has {x.shape[1]}. "
                             f"Build it with Standardize({x.shape[1]})")
        self.mean.copy_(x.mean(0).to(self.mean.dtype))
        self.std.copy_(x.std(0).clamp_min(1e-6).to(self.std.dtype))  # a constant feature divides by 1e-6, not 0
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # [B, D]

    def extra_repr(self) -> str:
        return f"num_features={self.mean.shape[0]}"


@torch.no_grad()
def fit_input_transforms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Fit every data-fitted constant of ``model`` on training data, before training.

    Calls ``fit_from_data(x, y)`` on each submodule that has it, outermost first; a module that fits
    itself is trusted to fit its children, so they are skipped. Models without such modules (the
    digits references, with fixed constants) are left unchanged.

    Args:
        model: the model to fit (its raw input is ``x``).
        x: training inputs ``[N, ...]`` as the model reads them.
        y: training labels ``[N]``.

    Returns:
        The names of the fitted submodules (``""`` for the model itself).
    """
    fitted: list[str] = []
    for name, module in model.named_modules():
        if any(f == "" or name.startswith(f + ".") for f in fitted):
            continue
        fit = getattr(module, "fit_from_data", None)
        if callable(fit):
            fit(_raw_input_of(model, name, x), y)
            fitted.append(name)
    return fitted


def _raw_input_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` if submodule ``name`` reads the raw input, else a ValueError.

    A submodule reads the raw input when it is the model itself, its ``input_transform``, or the first
    element of an ``nn.Sequential`` on such a path (``nn.Sequential(Standardize(30), ...)``).
    """
    module = model
    for part in name.split(".") if name else []:
        if not (part == "input_transform" or (part == "0" and isinstance(module, nn.Sequential))):
            raise ValueError(f"submodule {name!r} has fit_from_data but does not read the raw input; only the "
                             "model, its input_transform, or the first module of an nn.Sequential may fit "
                             "constants from data")
        module = getattr(module, part) if part != "0" else module[0]
    return x
