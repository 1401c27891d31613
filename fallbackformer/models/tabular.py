"""Reference models for tabular data ``[B, D]`` (the breast cancer data: D = 30, 2 classes).

Both read the raw, unscaled features. Their standardisation is part of the model: constants fitted
on the training split (:func:`~fallbackformer.models.transforms.fit_input_transforms`, called by the
pipeline before training) and kept as buffers, so a bundle rebuilds them from the weights file.

* ``tabular_mlp_exits``: an MLP cut into ``depth`` stages, an exit head after each.
* ``tabular_topk_student``: a tiny MLP (or a linear model) on the ``k`` features that separate the
  classes best on the training split (ANOVA F statistic), the selection a buffer too.
"""

from __future__ import annotations

import torch
from torch import nn

from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.models.registry import register_model
from fallbackformer.models.transforms import Standardize

__all__ = ["SelectTopK", "TopKStudent", "tabular_mlp_exits", "tabular_topk_student"]


@register_model("tabular_mlp_exits")
def tabular_mlp_exits(num_features: int = 30, num_classes: int = 2, hidden: int = 64, depth: int = 3,
                      dropout: float = 0.1) -> MultiExitNet:
    """An MLP of ``depth`` stages (Linear, ReLU, Dropout), with a linear exit head after each.

    Args:
        num_features: raw input features.
        num_classes: number of classes.
        hidden: width of every stage.
        depth: number of stages (``depth - 1`` early exits and the final head).
        dropout: dropout after each stage.
    """
    if depth < 1 or hidden < 1:
        raise ValueError(f"need depth >= 1 and hidden >= 1; got depth={depth}, hidden={hidden}")
    stages = [nn.Sequential(nn.Linear(num_features if i == 0 else hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
              for i in range(depth)]  # each [B, hidden]
    heads = {i: nn.Linear(hidden, num_classes) for i in range(depth)}
    return MultiExitNet(stages, heads, input_transform=Standardize(num_features))


class SelectTopK(nn.Module):
    """Standardise, then keep the ``k`` features with the largest ANOVA F statistic on training data.

    Args:
        num_features: raw input features.
        k: features kept.
    """

    def __init__(self, num_features: int, k: int) -> None:
        super().__init__()
        if not 1 <= k <= num_features:
            raise ValueError(f"k={k} must lie in 1..num_features={num_features}")
        self.standardize = Standardize(num_features)
        self.register_buffer("index", torch.arange(k))  # [k] the selected features, fitted

    @torch.no_grad()
    def fit_from_data(self, x: torch.Tensor, y: torch.Tensor) -> "SelectTopK":
        """Fit the standardisation and choose the features on training data ``x [N, D]``, ``y [N]``."""
        z = self.standardize.fit_from_data(x)(x.float()).double()  # [N, D]
        classes = torch.unique(y)
        if len(classes) < 2:
            raise ValueError(f"SelectTopK needs at least 2 classes in y to rank features; got {classes.tolist()}")
        grand = z.mean(0)
        between = sum((y == c).sum() * (z[y == c].mean(0) - grand) ** 2 for c in classes) / (len(classes) - 1)
        within = sum(((z[y == c] - z[y == c].mean(0)) ** 2).sum(0) for c in classes) / max(1, len(y) - len(classes))
        f_stat = between / within.clamp_min(1e-12)  # [D]
        self.index.copy_(f_stat.topk(self.index.shape[0]).indices.sort().values)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardize(x).index_select(1, self.index)  # [B, k]

    def extra_repr(self) -> str:
        return f"k={self.index.shape[0]}"


class TopKStudent(nn.Module):
    """The tabular fallback student: :class:`SelectTopK` then a tiny MLP (``hidden=0``: linear).

    Args:
        num_features: raw input features.
        num_classes: number of classes.
        k: features kept.
        hidden: hidden width, 0 for a linear model.
    """

    def __init__(self, num_features: int = 30, num_classes: int = 2, k: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.input_transform = SelectTopK(num_features, k)
        self.net = (nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)) if hidden
                    else nn.Linear(k, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, C]
        return self.net(self.input_transform(x))


@register_model("tabular_topk_student")
def tabular_topk_student(num_features: int = 30, num_classes: int = 2, k: int = 8, hidden: int = 16) -> TopKStudent:
    """The fallback student for tabular data: a tiny MLP on the top-``k`` features."""
    return TopKStudent(num_features, num_classes, k, hidden)
