"""MultiExitNet: any stack of blocks becomes a primary with early exits."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from fallbackformer.common.paths import exit_names


class MultiExitNet(nn.Module):
    """A primary model cut into stages, with an exit head after some of them.

    The last stage always has a head: its output is the primary answer. Every other head is an
    early exit. The model reads the raw input as a user has it; ``input_transform`` (part of the
    model and of its bundle) turns it into what the first stage expects.

    Args:
        stages: the blocks, applied in order.
        heads: ``{stage_index: head}``; a head maps that stage's output to logits ``[B, C]``.
        input_transform: applied to the raw input before the first stage (identity if ``None``).

    >>> net = MultiExitNet([nn.Linear(4, 8), nn.Linear(8, 8)], {0: nn.Linear(8, 3), 1: nn.Linear(8, 3)})
    >>> [t.shape for t in net(torch.zeros(2, 4))]
    [torch.Size([2, 3]), torch.Size([2, 3])]
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        heads: Mapping[int, nn.Module],
        input_transform: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(stages) == 0:
            raise ValueError("MultiExitNet needs at least one stage; got an empty sequence of stages")
        last = len(stages) - 1
        bad = [k for k in heads if not isinstance(k, int) or not 0 <= k <= last]
        if bad:
            raise ValueError(
                f"head keys {bad} are not stage indices in [0, {last}]; key each head by the index "
                "of the stage whose output it reads"
            )
        if last not in heads:
            raise ValueError(
                f"the last stage (index {last}) has no head; add heads[{last}], the primary answer"
            )
        self.input_transform = input_transform if input_transform is not None else nn.Identity()
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleDict({str(k): heads[k] for k in sorted(heads)})
        self.exit_stages: list[int] = sorted(heads)

    @property
    def num_exits(self) -> int:
        """Number of heads, the final one included."""
        return len(self.exit_stages)

    @property
    def exit_names(self) -> list[str]:
        """``["exit_1", ..., "exit_{E-1}", "primary"]``: the ``served_by`` name of each head."""
        return exit_names(self.num_exits)

    def head(self, stage_index: int) -> nn.Module:
        """The head after stage ``stage_index``."""
        return self.heads[str(stage_index)]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features after each exit stage, in order (the raw input goes through the transform)."""
        h = self.input_transform(x)
        feats = []
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i in self.exit_stages:
                feats.append(h)
        return feats

    def forward_head(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Logits of each head from :meth:`forward_features`' output."""
        return [self.head(s)(f) for s, f in zip(self.exit_stages, feats)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All exits' logits, ``list`` of ``[B, C]``, in order (the primary last)."""
        return self.forward_head(self.forward_features(x))
