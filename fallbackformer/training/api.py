"""``ff.distill`` and ``ff.calibrate``: the two training steps of a user's own model, one call each.

``distill`` runs Lightning inside (no LightningModule to write); ``calibrate`` needs torch only. The
package's ``__init__`` imports this module lazily, so ``import fallbackformer`` and inference never
load Lightning.

>>> student = ff.distill(primary, student, train_loader, val_loader, max_epochs=20)   # doctest: +SKIP
>>> gates = ff.calibrate(primary, student, calib_loader, alpha=0.05, delta=0.1)        # doctest: +SKIP
>>> gates.guarantees["primary"].statement                                            # doctest: +SKIP
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fallbackformer.common.paths import path_names
from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.models.transforms import fit_input_transforms

__all__ = ["CalibratedGates", "calibrate", "distill"]


def _collect(loader: Iterable[Any], what: str) -> tuple[Tensor, Tensor]:
    """Concatenate a loader's ``(x, y)`` batches into ``(x [N, ...], y [N])``."""
    xs, ys = [], []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"{what} must yield (inputs, labels) pairs; got a {type(batch).__name__}. "
                             "Use DataLoader(TensorDataset(x, y), ...)")
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]).long())
    if not xs:
        raise ValueError(f"{what} yielded no batches; give it at least one (inputs, labels) batch")
    return torch.cat(xs), torch.cat(ys)


def distill(
    primary: MultiExitNet,
    student: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None = None,
    *,
    max_epochs: int = 20,
    temperature: float = 4.0,
    alpha: float = 0.7,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    fit_transforms: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Distill ``student`` from the frozen ``primary``'s final exit (Hinton loss), with Lightning inside.

    Args:
        primary: the trained primary; it is not changed.
        student: any ``nn.Module`` mapping the raw input to logits ``[B, C]``.
        train_loader: ``(x, y)`` batches of the training split.
        val_loader: ``(x, y)`` batches of the validation split; when given, the epoch with the best
            validation accuracy is kept.
        max_epochs: training epochs.
        temperature: distillation temperature ``T``.
        alpha: weight of the soft (teacher) term; the label term gets ``1 - alpha``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: seeds Lightning (weights, shuffling).
        fit_transforms: first fit the student's data-fitted constants (``fit_from_data``, e.g. a
            :class:`~fallbackformer.models.transforms.Standardize`) on the training data.
        trainer_kwargs: more ``lightning.Trainer`` arguments (e.g. ``{"accelerator": "gpu"}``).

    Returns:
        The trained student, in eval mode on the CPU.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fallbackformer.training.distill_module import DistillModule

    if not isinstance(primary, MultiExitNet):
        raise TypeError(f"primary must be a fallbackformer.MultiExitNet, got {type(primary).__name__}; "
                        "wrap your blocks: ff.MultiExitNet(stages, heads)")
    if max_epochs < 1:
        raise ValueError(f"max_epochs={max_epochs} must be >= 1")
    L.seed_everything(seed, workers=True, verbose=False)
    primary.eval()
    x_train, y_train = _collect(train_loader, "train_loader")
    if fit_transforms:
        fit_input_transforms(student, x_train, y_train)
    with torch.no_grad():
        num_classes = int(primary(x_train[:1])[-1].shape[-1])
    module = DistillModule(student, primary, functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
                           num_classes=num_classes, temperature=temperature, alpha=alpha)
    with tempfile.TemporaryDirectory(prefix="ff_distill_") as tmp:
        callbacks = []
        if val_loader is not None:
            callbacks.append(ModelCheckpoint(dirpath=tmp, monitor="val/acc_student", mode="max", save_top_k=1,
                                             filename="best", enable_version_counter=False))
        options: dict[str, Any] = {"max_epochs": max_epochs, "accelerator": "cpu", "devices": 1, "logger": False,
                                   "enable_progress_bar": False, "enable_model_summary": False,
                                   "enable_checkpointing": val_loader is not None, "default_root_dir": tmp,
                                   "callbacks": callbacks, "log_every_n_steps": 1, **dict(trainer_kwargs or {})}
        trainer = L.Trainer(**options)
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
        best = callbacks[0].best_model_path if callbacks else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)
            module.load_state_dict(state["state_dict"])
    return student.cpu().eval()


class CalibratedGates(list):
    """The gates ``[exit_1.., primary, student]`` (a list, as ``FallbackModel`` takes it) with their guarantees.

    Attributes:
        names: the path name of each gate.
        guarantees: ``{name: Guarantee}``: alpha, delta, method, threshold, calibration size ``n``,
            ``coverage``, the distribution it ``covers`` and its ``statement``, and whether it could
            be certified (``satisfied``) and why (``reason``).
        report: the full calibration report (metrics before and after temperature scaling).
    """

    def __init__(self, gates: list[ConfidenceGate], names: list[str], report: dict[str, Any]) -> None:
        super().__init__(gates)
        self.names = names
        self.guarantees = {n: g.guarantee for n, g in zip(names, gates)}
        self.report = report


@torch.no_grad()
def calibrate(
    primary: MultiExitNet,
    student: nn.Module,
    calib_loader: Iterable[Any],
    alpha: float | Mapping[str, float] = 0.05,
    delta: float = 0.1,
    *,
    method: str = "ltt_binom",
    score: str = "max_softmax",
    mode: str = "per_path",
) -> CalibratedGates:
    """Calibrate every gate on the calibration split: a temperature and a certified threshold per path.

    Args:
        primary: the trained primary.
        student: the trained student.
        calib_loader: ``(x, y)`` batches of the calibration split (disjoint from training and test).
        alpha: the risk to certify: one number, or ``{"exits", "primary", "student"}`` for
            ``mode="per_path"``.
        delta: the guarantee holds with probability at least ``1 - delta`` over the calibration draw.
        method: ``ltt_binom`` (default), ``ltt_hb``, ``crc`` or ``empirical`` (no guarantee).
        score: ``max_softmax``, ``margin`` or ``neg_entropy``.
        mode: ``per_path`` (each gate its own alpha) or ``system`` (one alpha for the whole cascade).

    Returns:
        :class:`CalibratedGates`: pass it to ``ff.FallbackModel``; ``.guarantees`` says what each
        gate certifies (a gate that cannot be certified accepts nothing, and says why).
    """
    from fallbackformer.training.calibration import calibrate_gates

    if score == "learned":
        raise ValueError("score='learned' needs a training split for the score; use the Hydra pipeline "
                         "(gate.score=learned) or choose max_softmax, margin or neg_entropy")
    primary.eval()
    student.eval()
    x, y = _collect(calib_loader, "calib_loader")
    chunks = [primary(xb) + [student(xb)] for xb in x.split(512)]
    logits = [torch.cat(parts) for parts in zip(*chunks)]  # [exit_1.., primary, student], each [N, C]
    cfg = {"mode": mode, "alpha": dict(alpha) if isinstance(alpha, Mapping) else float(alpha), "delta": float(delta),
           "method": method, "score": score}
    gates, report = calibrate_gates(logits[:-1], logits[-1], y, cfg)
    return CalibratedGates(gates, path_names(primary.num_exits), report)
