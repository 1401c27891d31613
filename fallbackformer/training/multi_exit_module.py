"""LightningModule that trains a MultiExitNet: a weighted sum of the exits' cross-entropies.

With an :class:`~fallbackformer.data.augment.AugMix` augmentation, each training batch also gets two
AugMix views; the loss is the exits' cross-entropy on the clean view plus ``lambda_jsd`` times the
Jensen-Shannon consistency over (clean, augmix1, augmix2), applied on EVERY exit with the same exit
weights (each exit answers on its own at serving time, so each should be robust on its own). With
``lambda_views > 0`` the exits' cross-entropy on the two views (their mean) is added with that weight.
"""

from __future__ import annotations

from typing import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from fallbackformer.data.augment import AugMix
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.training.robust import jensen_shannon

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class MultiExitModule(L.LightningModule):
    """Trains every exit of a primary jointly.

    Args:
        model: the primary.
        optimizer: a partial optimizer (``_partial_: true`` in Hydra), called with the parameters.
        num_classes: number of classes (for the metrics).
        exit_weights: loss weight per exit (defaults to equal weights); the final exit's weight
            is the primary's.
        label_smoothing: cross-entropy label smoothing.
        augment: AugMix for the JSD consistency loss (``None``, the default: clean training only);
            its ``lambda_jsd`` weighs the JSD term.
    """

    def __init__(
        self,
        model: MultiExitNet,
        optimizer: OptimizerFactory,
        num_classes: int,
        exit_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        augment: AugMix | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        weights = list(exit_weights) if exit_weights is not None else [1.0] * model.num_exits
        if len(weights) != model.num_exits:
            raise ValueError(
                f"exit_weights has {len(weights)} entries; the model has {model.num_exits} exits {model.exit_names}"
            )
        self.register_buffer("exit_weights", torch.tensor(weights) / sum(weights))
        self.label_smoothing = label_smoothing
        self.augment = augment
        self.val_acc = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(x)

    def exit_loss(self, all_logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """The ``exit_weights``-weighted sum of every exit's cross-entropy (label smoothing applied)."""
        losses = torch.stack([F.cross_entropy(lg, y, label_smoothing=self.label_smoothing) for lg in all_logits])
        return (losses * self.exit_weights).sum()

    def _jsd(self, all_logits: list[torch.Tensor]) -> torch.Tensor:
        """Exit-weighted JSD; each entry of ``all_logits`` is ``[3B, C]`` (clean, aug1, aug2)."""
        jsds = torch.stack([jensen_shannon(*lg.chunk(3)) for lg in all_logits])
        return (jsds * self.exit_weights).sum()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch  # x: [B, 1, 8, 8], y: [B]
        if self.augment is None:
            loss = self.exit_loss(self.model(x), y)
        else:
            views = torch.cat([x, *self.augment.views(x, 2)])  # [3B, 1, 8, 8]: clean, aug1, aug2
            all_logits = self.model(views)  # per exit [3B, C]
            chunks = list(zip(*(lg.chunk(3) for lg in all_logits)))  # (clean, aug1, aug2), each per exit
            ce = self.exit_loss(list(chunks[0]), y)
            jsd = self._jsd(all_logits)
            loss = ce + self.augment.lambda_jsd * jsd
            if self.augment.lambda_views > 0:
                views_ce = (self.exit_loss(list(chunks[1]), y) + self.exit_loss(list(chunks[2]), y)) / 2
                loss = loss + self.augment.lambda_views * views_ce
                self.log("train/ce_views", views_ce, sync_dist=True)
            self.log("train/ce", ce, sync_dist=True)
            self.log("train/jsd", jsd, sync_dist=True)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        all_logits = self.model(x)
        self.log("val/loss", self.exit_loss(all_logits, y), sync_dist=True)
        for name, metric, logits in zip(self.model.exit_names, self.val_acc, all_logits):
            metric.update(logits, y)
            self.log(f"val/acc_{name}", metric, on_epoch=True)  # a torchmetrics Metric: syncs across ranks itself

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.model.parameters())
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
