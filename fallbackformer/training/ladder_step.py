"""The ladder step of the main job: classical rungs fitted on the primary, their gates, the veto, the
cache and the typed default (``configs/ladder/default.yaml``, a default of the main job; the pipeline
calls it when the config has a ``ladder`` node, ``ladder=none`` has none).

1. Each model rung is fitted with :mod:`fallbackformer.training.rung_fit` on the training split against
   the primary (trees on its hard labels, the linear model on its soft labels); the fit itself checks
   100% agreement with scikit-learn's ``predict``.
2. Each rung's gate is calibrated with the project's gate calibration
   (:meth:`~fallbackformer.gates.gate.ConfidenceGate.calibrate`): with a router, on the calibration
   split drawn from the router's own shifted mixture (the same draw its threshold was certified on: the
   rungs answer mostly when the primary's path cannot, i.e. under shift); without one, on the clean
   calibration split.
3. The veto (and the confidence below which it reviews answers), the cache (:class:`~fallbackformer.rungs.CacheConfig`) and the typed default
   (:class:`~fallbackformer.rungs.SafeDefault`) come from the config as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fallbackformer.common.jsonsafe import json_float
from fallbackformer.data.protocol import ShiftSuiteLike
from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.models.classical import transform_spec_of
from fallbackformer.rungs import CacheConfig, Rung, SafeDefault
from fallbackformer.training.rung_fit import TREE_KINDS, fit_linear_rung, fit_tree_rung

__all__ = ["LadderConfig", "Ladder", "RungSpec", "build_ladder", "fit_rung"]

RUNG_KINDS = ("linear",) + TREE_KINDS


@dataclass
class RungSpec:
    """One model rung: its ``served_by`` name, its kind and the fit's keyword arguments."""

    name: str
    kind: str
    fit: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in RUNG_KINDS:
            raise ValueError(f"ladder rung {self.name!r} has kind={self.kind!r}; use one of {list(RUNG_KINDS)}")


@dataclass
class LadderConfig:
    """The ladder's config (``cfg.ladder``).

    Attributes:
        rungs: the model rungs after the student, in order.
        alpha: each rung gate's certified selective risk.
        delta: 1 - confidence of each gate's guarantee.
        method: the gates' p-value (``ltt_binom``, ``ltt_hb``, ``crc``, ``empirical``).
        score: the gates' score.
        veto: names of rungs whose agreement an answer of the primary's path or the student needs.
        veto_below: the veto reviews only answers whose confidence (the router's probability that the
            answer is right, or the gate's calibrated confidence) is below this; ``inf``: every answer.
        cache: the response cache rung, or ``None``.
        default: the typed safe default, or ``None`` (the policy's ``default_class``).
    """

    rungs: Sequence[RungSpec]
    alpha: float = 0.05
    delta: float = 0.1
    method: str = "ltt_binom"
    score: str = "max_softmax"
    veto: Sequence[str] = ()
    veto_below: float = math.inf
    cache: CacheConfig | None = None
    default: SafeDefault | None = None

    def __post_init__(self) -> None:
        self.rungs = [r if isinstance(r, RungSpec) else RungSpec(**r) for r in self.rungs]
        names = [r.name for r in self.rungs]
        unknown = sorted(set(self.veto) - set(names))
        if unknown:
            raise ValueError(f"ladder.veto names {unknown}, which are not rungs of the ladder {names}")


@dataclass
class Ladder:
    """What :func:`build_ladder` returns: the ``FallbackModel`` keyword arguments and the step's report."""

    fallbacks: list[Rung]
    veto: tuple[str, ...]
    veto_below: float
    cache: CacheConfig | None
    default: SafeDefault | None
    report: dict[str, Any]

    def model_kwargs(self) -> dict[str, Any]:
        return {"fallbacks": self.fallbacks, "veto": self.veto, "veto_below": self.veto_below, "cache": self.cache,
                "default": self.default}


def fit_rung(spec: RungSpec, primary: nn.Module, x_train: Tensor, transform: Mapping[str, Any] | None) -> nn.Module:
    """The torch model of rung ``spec`` fitted on the primary's answers on ``x_train`` (read through ``transform``)."""
    if spec.kind == "linear":
        return fit_linear_rung(primary, x_train, transform=transform, **dict(spec.fit)).module
    return fit_tree_rung(primary, x_train, kind=spec.kind, transform=transform, **dict(spec.fit)).module


def gate_data(splits: Mapping[str, tuple[Tensor, Tensor]], router_cfg: Any, suite: ShiftSuiteLike | None
              ) -> tuple[Tensor, Tensor, str]:
    """Where the rungs' gates calibrate: the router's shifted mixture over the calibration split (its own
    draw: names, severities, clean weight and seed), or the clean calibration split without a router."""
    x_cal, y_cal = splits["calibration"]
    if router_cfg is None or suite is None:
        return x_cal, y_cal, "calibration"
    from fallbackformer.data.mixture import draw_mixture

    names = list(router_cfg.corruptions or suite.names)
    x_mix, _ = draw_mixture(x_cal, names, router_cfg.severities, router_cfg.clean_weight,
                            seed=router_cfg.seed + 2, suite=suite)
    return x_mix, y_cal, f"calibration drawn from the router's mixture (clean weight {router_cfg.clean_weight})"


@torch.no_grad()
def build_ladder(config: LadderConfig, primary: nn.Module, student: nn.Module,
                 splits: Mapping[str, tuple[Tensor, Tensor]], router_cfg: Any = None,
                 suite: ShiftSuiteLike | None = None) -> Ladder:
    """Fit the rungs, calibrate their gates (see the module docstring); return the ladder and its report.

    Args:
        config: the ladder config.
        primary: the trained primary (labels the training split for the rungs).
        student: the trained student (the rungs read the input through its feature transform).
        splits: the datamodule's splits (``train`` fits, ``calibration`` calibrates).
        router_cfg: the router's config when the model has a router (its mixture calibrates the gates).
        suite: the shift suite (needed with a router).
    """
    x_train = splits["train"][0]
    transform = transform_spec_of(getattr(student, "input_transform", None))
    x_gate, y_gate, where = gate_data(splits, router_cfg, suite)
    fallbacks, report = [], {"gates_calibrated_on": where, "n_gate": int(y_gate.shape[0]), "rungs": {}}
    for spec in config.rungs:
        module = fit_rung(spec, primary, x_train, transform)
        logits = torch.cat([module(xb) for xb in x_gate.split(512)])
        gate = ConfidenceGate.calibrate(logits, y_gate, alpha=config.alpha, delta=config.delta,
                                        method=config.method, score=config.score)
        accepted = gate.accept(logits)
        right = logits.argmax(1) == y_gate
        report["rungs"][spec.name] = {
            "kind": spec.kind, "accuracy_gate_data": float(right.double().mean()),
            "coverage_gate_data": float(accepted.double().mean()),
            "selective_risk_gate_data": float((accepted & ~right).sum() / accepted.sum()) if accepted.any() else None,
            "guarantee": gate.guarantee.to_dict() if gate.guarantee is not None else None,
        }
        fallbacks.append(Rung(spec.name, module, gate))
    report.update(veto=list(config.veto), veto_below=json_float(config.veto_below), cache=None if config.cache is None else config.cache.to_dict(),
                  default=None if config.default is None else config.default.to_dict())
    return Ladder(fallbacks, tuple(config.veto), float(config.veto_below), config.cache, config.default, report)
