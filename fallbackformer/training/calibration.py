"""The calibration step: gates from calibration logits, a report, and the figures behind it.

``calibrate_gates`` turns the calibration logits of every path into gates, either one gate per path
(``mode: per_path``, each with its own alpha) or one budget for the whole cascade
(``mode: system``, see :mod:`fallbackformer.gates.system`). The report records, per gate, the
guarantee and the calibration metrics before and after temperature scaling: ECE (15 equal-width
bins, torchmetrics ``MulticlassCalibrationError``, L1), NLL and Brier, plus the equal-mass and
classwise ECE of :mod:`fallbackformer.gates.temperature`. ``write_calibration_report`` writes
``calibration.json`` and, per gate, a reliability diagram and a risk-coverage curve (the figures of
:mod:`fallbackformer.evaluation.plots`).

Config keys (``cfg`` is the ``gate`` node, a dict or an OmegaConf ``DictConfig``):

``mode``            ``per_path`` (default) or ``system``
``alpha``           system: one float; per_path: ``{exits, primary, student}`` or one float
``delta``           failure probability of the guarantee (default 0.1)
``method``          ``ltt_binom`` (default), ``ltt_hb``, ``crc``, ``empirical``
``score``           ``max_softmax`` (default), ``margin``, ``neg_entropy``, ``learned``
``deadline_robust`` system mode: certify every truncated cascade too (default true)
``grid_size``       size of the fixed threshold grid (default 2000)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fallbackformer.common.jsonsafe import dumps, json_safe
from fallbackformer.common.paths import path_names
from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.gates.system import calibrate_system
from fallbackformer.gates.temperature import brier, nll

__all__ = ["calibrate_gates", "calibration_metrics", "write_calibration_report"]

MODES = ("per_path", "system")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        value = cfg.get(key, default)
        return default if value is None else value
    return getattr(cfg, key, default)


def calibration_metrics(logits: Tensor, labels: Tensor, temperature: float = 1.0, n_bins: int = 15) -> dict[str, float]:
    """ECE (``n_bins`` equal-width bins, L1), equal-mass and classwise ECE (all three from
    :mod:`fallbackformer.evaluation.metrics`), NLL, Brier and accuracy of ``softmax(logits / temperature)``
    over the rows with finite logits."""
    from fallbackformer.evaluation import metrics as M

    finite = torch.isfinite(logits).all(dim=1)
    z = logits[finite].detach().double() / float(temperature)
    y = labels[finite].long()
    if z.shape[0] == 0:
        return {k: math.nan for k in ("ece", "ece_equal_mass", "classwise_ece", "nll", "brier", "accuracy")}
    conf, pred = torch.softmax(z, dim=1).max(dim=1)  # [M]
    return {
        "ece": M.ece_from_logits(z, y, n_bins=n_bins),
        "ece_equal_mass": M.ece(conf, pred == y, n_bins=n_bins, binning="mass"),
        "classwise_ece": M.classwise_ece(z, y, n_bins=n_bins),
        "nll": nll(z, y),
        "brier": brier(z, y),
        "accuracy": float((z.argmax(1) == y).double().mean()),
    }


def calibrate_gates(
    exit_logits: Sequence[Tensor],
    student_logits: Tensor,
    labels: Tensor,
    cfg: Any = None,
    score_train: tuple[Sequence[Tensor], Tensor, Tensor] | None = None,
    names: Sequence[str] | None = None,
) -> tuple[list[ConfidenceGate], dict[str, Any]]:
    """Calibrate the gates ``[exit_1.., primary, student]`` on the calibration split.

    Args:
        exit_logits: calibration logits of every exit of the primary (last = final head), ``[N, C]``.
        student_logits: ``[N, C]``.
        labels: ``[N]``.
        cfg: the gate config (see the module docstring); None = all defaults.
        score_train: ``(exit_logits, student_logits, labels)`` of a split disjoint from calibration
            (e.g. validation), required for ``score: learned``.
        names: gate names (default ``exit_1.., primary, student``).

    Returns:
        ``(gates, report)``: the report is JSON-able: ``{"mode", "config", "gates": {name: {...}},
        "system": {...}}`` with each gate's guarantee and metrics before/after temperature scaling.
    """
    mode = str(_get(cfg, "mode", "per_path"))
    if mode not in MODES:
        raise ValueError(f"gate mode {mode!r} is unknown; choose one of {list(MODES)}.")
    delta = float(_get(cfg, "delta", 0.1))
    method = str(_get(cfg, "method", "ltt_binom"))
    score = str(_get(cfg, "score", "max_softmax"))
    grid_size = int(_get(cfg, "grid_size", 2000))
    alpha_cfg = _get(cfg, "alpha", 0.05)
    all_logits = [z.detach() for z in exit_logits] + [student_logits.detach()]
    m = len(all_logits)
    if names is None:
        names = path_names(m - 1)  # the primary's m - 1 heads, then the student
    labels = labels.detach().long()
    if mode == "system":
        if not isinstance(alpha_cfg, (int, float)):
            raise ValueError(f"mode 'system' takes one alpha (a number), got {alpha_cfg!r}.")
        gates = calibrate_system(
            list(exit_logits), student_logits, labels, alpha=float(alpha_cfg), delta=delta, method=method,
            score=score, deadline_robust=bool(_get(cfg, "deadline_robust", True)), score_train=score_train,
            grid_size=grid_size, names=names,
        )
        alphas = [float(alpha_cfg)] * m
    else:
        if isinstance(alpha_cfg, (int, float)):
            alphas = [float(alpha_cfg)] * m
        else:
            try:
                alphas = [float(alpha_cfg["exits"])] * (m - 2) + [float(alpha_cfg["primary"]), float(alpha_cfg["student"])]
            except (KeyError, TypeError):
                raise ValueError(
                    f"mode 'per_path' needs alpha as a number or {{exits, primary, student}}, got {alpha_cfg!r}."
                ) from None
        gates = []
        for i, (z, a) in enumerate(zip(all_logits, alphas)):
            train_i = None
            if score == "learned":
                if score_train is None:
                    raise ValueError("score 'learned' needs score_train=(exit_logits, student_logits, labels) from a split disjoint from calibration.")
                tr_exits, tr_student, tr_labels = score_train
                train_i = ((list(tr_exits) + [tr_student])[i], tr_labels)
            gates.append(ConfidenceGate.calibrate(z, labels, alpha=a, delta=delta, method=method, score=score,
                                                  score_train=train_i, grid_size=grid_size))
    report: dict[str, Any] = {
        "mode": mode,
        "config": {"alpha": alphas if mode == "per_path" else alphas[0], "delta": delta, "method": method,
                   "score": score, "grid_size": grid_size},
        "n_cal": int(labels.shape[0]),
        "gates": {},
    }
    with torch.no_grad():
        accepted = torch.stack([g.accept(z) for g, z in zip(gates, all_logits)])  # [M, N]
    first = torch.where(accepted, torch.arange(m)[:, None], torch.full_like(accepted, m, dtype=torch.long)).min(0).values
    preds = torch.stack([z.argmax(1) for z in all_logits])
    for i, (name, gate, z) in enumerate(zip(names, gates, all_logits)):
        own = accepted[i]
        wrong = preds[i] != labels
        report["gates"][name] = {
            "temperature": float(gate.temperature),
            "threshold": float(gate.threshold),
            "alpha": alphas[i],
            "guarantee": gate.guarantee.to_dict() if gate.guarantee is not None else None,
            "before": calibration_metrics(z, labels, 1.0),
            "after": calibration_metrics(z, labels, float(gate.temperature)),
            "standalone_coverage_cal": float(own.double().mean()),
            "standalone_selective_risk_cal": float((own & wrong).sum() / own.sum()) if own.any() else None,
            "served_share_cal": float((first == i).double().mean()),
        }
    served = first < m
    wrong_served = (preds.gather(0, first.clamp(max=m - 1)[None])[0] != labels) & served
    report["system"] = {
        "coverage_cal": float(served.double().mean()),
        "selective_risk_cal": float(wrong_served.sum() / served.sum()) if served.any() else None,
        "default_share_cal": float((~served).double().mean()),
    }
    return gates, json_safe(report, "calibration report")


def write_calibration_report(
    report: Mapping[str, Any],
    gates: Sequence[ConfidenceGate],
    cal_logits: Sequence[Tensor],
    labels: Tensor,
    out_dir: str | Path,
    names: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write ``calibration.json`` and, per gate, ``reliability_<name>.png`` and ``risk_coverage_<name>.png``.

    Args:
        report: the report from :func:`calibrate_gates`.
        gates: the gates, ``[exit_1.., primary, student]``.
        cal_logits: the calibration logits in the same order (exits..., primary, student).
        labels: ``[N]`` calibration labels.
        out_dir: directory (created if needed).
        names: gate names (default: the report's order).

    Returns:
        ``{"calibration.json": path, "reliability_<name>": path, "risk_coverage_<name>": path, ...}``.
    """
    from fallbackformer.evaluation import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if names is None:
        names = list(report.get("gates", {})) or [f"gate_{i}" for i in range(len(gates))]
    if not (len(names) == len(gates) == len(cal_logits)):
        raise ValueError(
            f"names ({len(names)}), gates ({len(gates)}) and cal_logits ({len(cal_logits)}) must have one entry per path."
        )
    paths: dict[str, Path] = {}
    labels = labels.long()
    for name, gate, z in zip(names, gates, cal_logits):
        finite = torch.isfinite(z).all(dim=1)
        with torch.no_grad():
            probs = torch.softmax(z[finite].double() / float(gate.temperature), dim=1)
            conf = probs.max(1).values
            correct = probs.argmax(1) == labels[finite]
            score = gate.confidence(z)[finite]
            acc = gate.accept(z)[finite]
        fig_path = out / f"reliability_{name}.png"
        plots.reliability_diagram(conf, correct, title=f"{name}, calibration split, T={float(gate.temperature):.3g}",
                                  path=fig_path)
        paths[f"reliability_{name}"] = fig_path
        op = None
        if acc.any():
            op = (float(acc.double().mean()), float((~correct & acc).sum() / acc.sum()))
        rc_path = out / f"risk_coverage_{name}.png"
        plots.risk_coverage_curve(score, correct, title=f"{name}, calibration split ({gate.score})",
                                  alpha=gate.guarantee.alpha if gate.guarantee is not None else None, operating_point=op, path=rc_path)
        paths[f"risk_coverage_{name}"] = rc_path
    json_path = out / "calibration.json"
    json_path.write_text(dumps(dict(report), indent=2, where="calibration report"))
    paths["calibration.json"] = json_path
    return paths
