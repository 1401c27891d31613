"""Robust training helpers: the AugMix Jensen-Shannon consistency loss and the selection criterion.

* :func:`jensen_shannon` is the consistency term of AugMix (Hendrycks et al., ICLR 2020): the mean KL
  of each view's predictive distribution to their mixture, over the clean view and two AugMix views.
* :func:`tuning_robustness` is the criterion for choosing a training setting (e.g. ``augment=none``
  vs ``augment=augmix``): accuracy on the VALIDATION split, clean and corrupted with the TUNABLE
  corruptions only. Held-out corruptions are refused: they must never decide anything.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fallbackformer.data.protocol import ShiftSuiteLike

__all__ = ["jensen_shannon", "tuning_robustness"]


def jensen_shannon(logits_clean: Tensor, logits_aug1: Tensor, logits_aug2: Tensor, eps: float = 1e-7) -> Tensor:
    """Jensen-Shannon divergence of three predictive distributions, averaged over the batch.

    ``JS = (KL(p_c || M) + KL(p_1 || M) + KL(p_2 || M)) / 3`` with ``M = (p_c + p_1 + p_2) / 3`` and
    ``p = softmax(logits)``; ``log M`` is clamped at ``log(eps)`` as in the AugMix reference code.

    Args:
        logits_clean: ``[B, C]`` logits on the clean images.
        logits_aug1: ``[B, C]`` logits on the first AugMix view.
        logits_aug2: ``[B, C]`` logits on the second AugMix view.
        eps: floor of the mixture's probabilities.

    Returns:
        A scalar tensor (natural log units), differentiable in all three inputs.
    """
    if not logits_clean.shape == logits_aug1.shape == logits_aug2.shape or logits_clean.dim() != 2:
        raise ValueError(
            f"jensen_shannon needs three [B, C] logits of one shape, got {tuple(logits_clean.shape)}, "
            f"{tuple(logits_aug1.shape)}, {tuple(logits_aug2.shape)}"
        )
    probs = [F.softmax(lg, dim=1) for lg in (logits_clean, logits_aug1, logits_aug2)]  # 3 x [B, C]
    log_mixture = torch.clamp((probs[0] + probs[1] + probs[2]) / 3.0, eps, 1.0).log()  # [B, C]
    kls = [F.kl_div(log_mixture, p, reduction="batchmean") for p in probs]  # KL(p || M) each
    return (kls[0] + kls[1] + kls[2]) / 3.0


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    out = [model(xb) for xb in x.split(batch_size)]
    logits = torch.cat([o[-1] if isinstance(o, (list, tuple)) else o for o in out])  # [N, C]
    return float((logits.argmax(dim=1) == y).float().mean())


def tuning_robustness(
    models: dict[str, nn.Module],
    images: Tensor,
    labels: Tensor,
    names: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    seed: int = 0,
    suite: ShiftSuiteLike | None = None,
) -> dict[str, dict[str, float]]:
    """Clean and tunable-shift accuracy of each model on a selection split (the validation split).

    A model returning a list of logits (a :class:`MultiExitNet`) is scored on its last (final) exit.

    Args:
        models: name -> model (e.g. ``{"primary": primary, "student": student}``), put in eval mode.
        images: raw inputs ``[N, ...]`` of the VALIDATION split (never test).
        labels: ``[N]``.
        names: tunable corruptions to average over (default: the suite's ``names``); held-out names raise.
        severities: severities to average over (default: the suite's).
        seed: corruption seed.
        suite: the dataset's shift suite (default: the digits suite).

    Returns:
        ``{model: {"clean": acc, "tunable": mean acc over names x severities, "worst": min over sets}}``.

    Raises:
        ValueError: a held-out corruption in ``names``.
    """
    if suite is None:
        from fallbackformer.data.shift import ShiftSuite

        suite = ShiftSuite()
    names = list(suite.names if names is None else names)
    severities = list(suite.severities if severities is None else severities)
    held = sorted(set(names) & set(suite.held_out))
    if held:
        raise ValueError(
            f"{held} are held-out corruptions and must never be used to choose a setting; "
            f"use the suite's tunable names: {list(suite.names)}"
        )
    sets = [suite.corrupt(images, n, s, seed) for n in names for s in severities]
    result: dict[str, dict[str, float]] = {}
    for key, model in models.items():
        was_training = model.training
        model.eval()
        accs = [_accuracy(model, xs, labels) for xs in sets]
        result[key] = {"clean": _accuracy(model, images, labels), "tunable": sum(accs) / len(accs), "worst": min(accs)}
        model.train(was_training)
    return result
