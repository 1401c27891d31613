"""LightningModule that distills a student from a frozen primary (Hinton et al., 2015).

With an :class:`~fallbackformer.data.augment.AugMix` augmentation the loss is the Hinton loss on the
clean view (teacher on the clean images) plus ``lambda_jsd`` times the Jensen-Shannon consistency of
the student over (clean, augmix1, augmix2). With ``lambda_views > 0`` the Hinton loss on each AugMix
view (against the teacher's logits on the clean image: the corruption does not change the label) is
added, their mean weighted by ``lambda_views``.
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from fallbackformer.data.augment import AugMix
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.training.robust import jensen_shannon


def hinton_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels)``.

    ``alpha`` weights the soft (teacher) term; the soft term is scaled by ``T^2`` so that its
    gradients keep their size as the temperature changes.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]`` (no gradient flows into the teacher).
        labels: ``[B]``.
        temperature: the softening temperature ``T > 0``.
        alpha: weight of the soft term in ``[0, 1]``.
    """
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need temperature > 0 and alpha in [0, 1]; got T={temperature}, alpha={alpha}")
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.detach() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * (t * t) * soft + (1.0 - alpha) * hard


class DistillModule(L.LightningModule):
    """Trains ``student`` on the primary's final-exit logits and the labels.

    Args:
        student: the fallback student (reads the raw input; its transform is inside).
        teacher: the trained primary; frozen and kept in eval mode.
        optimizer: a partial optimizer, called with the student's parameters.
        num_classes: number of classes.
        temperature: distillation temperature T.
        alpha: weight of the soft term (the hard-label term gets ``1 - alpha``).
        augment: AugMix for the JSD consistency loss (``None``, the default: clean training only);
            its ``lambda_jsd`` weighs the JSD term.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: MultiExitNet,
        optimizer: Callable[..., torch.optim.Optimizer],
        num_classes: int,
        temperature: float = 4.0,
        alpha: float = 0.7,
        augment: AugMix | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.optimizer_factory = optimizer
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.augment = augment

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()  # Lightning sets every submodule to train mode

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch  # x: [B, 1, 8, 8], y: [B]
        with torch.no_grad():
            teacher_logits = self.teacher(x)[-1]
        if self.augment is None:
            loss = hinton_loss(self.student(x), teacher_logits, y, self.temperature, self.alpha)
        else:
            views = torch.cat([x, *self.augment.views(x, 2)])  # [3B, 1, 8, 8]: clean, aug1, aug2
            logits = self.student(views)  # [3B, C]
            clean, aug1, aug2 = logits.chunk(3)
            distill = hinton_loss(clean, teacher_logits, y, self.temperature, self.alpha)
            jsd = jensen_shannon(clean, aug1, aug2)
            loss = distill + self.augment.lambda_jsd * jsd
            if self.augment.lambda_views > 0:
                on_views = sum(hinton_loss(v, teacher_logits, y, self.temperature, self.alpha) for v in (aug1, aug2)) / 2
                loss = loss + self.augment.lambda_views * on_views
                self.log("train/distill_views", on_views, sync_dist=True)
            self.log("train/jsd", jsd, sync_dist=True)
        self.log("train/distill_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self.student(x), y)
        self.log("val/acc_student", self.val_acc, on_epoch=True)  # a torchmetrics Metric: syncs across ranks itself

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.student.parameters())
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
