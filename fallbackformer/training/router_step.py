"""Fit and certify the router: the training step between calibration and assembly.

1. Feature scores (class-conditional Mahalanobis per head) on the training split, clean.
2. Scorers on the validation split, clean plus one corrupted copy per tunable corruption and
   severity (disjoint from calibration; the held-out corruptions are never used).
3. The shared threshold certified by Learn-then-Test on the calibration split drawn once, i.i.d.,
   from the stated mixture (:func:`fallbackformer.data.mixture.draw_mixture`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fallbackformer.data.mixture import corrupted_copies, draw_mixture
from fallbackformer.data.protocol import ShiftSuiteLike
from fallbackformer.gates.router import Router
from fallbackformer.gates.router_calibration import certify, collect_evidence, mixture_covers

__all__ = ["RouterConfig", "fit_router"]


@dataclass
class RouterConfig:
    """How the router is fitted and certified (``configs/router/*.yaml``).

    Attributes:
        alpha: the system selective risk certified on the mixture.
        delta: 1 - confidence of the guarantee.
        method: the p-value (``ltt_binom`` or ``ltt_hb``).
        clean_weight: probability that a calibration sample stays clean.
        corruptions: tunable corruptions of the mixture (``None``: the shift suite's tunable names).
        severities: severities of the mixture and of the scorers' training data.
        hidden: hidden units of each scorer.
        exit_floor: an early exit answers only when the router judges it at least this likely right.
        deadline_robust: certify every cascade a deadline cuts short too.
        seed: seeds the mixture draw and the scorers.
    """

    alpha: float = 0.1
    delta: float = 0.1
    method: str = "ltt_binom"
    clean_weight: float = 0.5
    corruptions: Sequence[str] | None = None
    severities: Sequence[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    hidden: int = 16
    exit_floor: float = 0.9
    deadline_robust: bool = True
    seed: int = 0


@torch.no_grad()
def fit_router(primary: nn.Module, student: nn.Module, splits: dict[str, tuple[Tensor, Tensor]],
               config: RouterConfig, suite: ShiftSuiteLike, num_classes: int) -> tuple[Router, dict[str, Any]]:
    """Fit the router's feature scores and scorers, certify its threshold. Returns ``(router, report)``.

    Args:
        primary: the trained primary.
        student: the trained student.
        splits: the datamodule's splits (train fits feature scores, val the scorers, calibration certifies).
        config: how to fit and certify.
        suite: the dataset's shift suite; its tunable ``names`` (or ``config.corruptions``) make the
            mixture, through its ``corrupt``.
        num_classes: number of classes.
    """
    names = list(config.corruptions or suite.names)
    x_train, y_train = splits["train"]
    _, pooled = collect_evidence(primary, student, None, x_train)
    router = Router(primary.num_exits, num_classes, [p.shape[1] for p in pooled], hidden=config.hidden,
                    exit_floor=config.exit_floor)
    router.fit_feature_scores(pooled, y_train)

    x_val, y_val = splits["val"]
    x_fit, y_fit = corrupted_copies(x_val, y_val, names, config.severities, seed=config.seed + 1, suite=suite)
    ev_fit, _ = collect_evidence(primary, student, router, x_fit)
    router.fit(ev_fit, y_fit, seed=config.seed)

    x_cal, y_cal = splits["calibration"]
    x_mix, kinds = draw_mixture(x_cal, names, config.severities, config.clean_weight, seed=config.seed + 2,
                                 suite=suite)
    ev_cal, _ = collect_evidence(primary, student, router, x_mix)
    covers = mixture_covers(config.clean_weight, names, config.severities, config.seed + 2)
    certify(router, ev_cal, y_cal, config.alpha, config.delta, covers, method=config.method,
            deadline_robust=config.deadline_robust)
    report = {"guarantee": router.guarantee.to_dict() if router.guarantee is not None else None, "n_fit": int(y_fit.shape[0]),
              "n_calibration": int(y_cal.shape[0]),
              "calibration_clean_share": sum(k == "clean" for k in kinds) / max(1, len(kinds))}
    return router.eval(), report
