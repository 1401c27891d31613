"""One set, every number: each path alone, the whole system, silent errors, the guarantee check,
failure detection, slices, latency and the references.

:func:`evaluate_set` runs every path alone (one forward of the primary gives all exits) and the real
``FallbackModel.forward`` in batches, then derives the metrics. Definitions (the report repeats them):

* **answered**: ``prediction >= 0``, whatever path gave it (a safe default that answers a class counts).
  **silent_error**: share of requests answered and wrong; **useful**: share answered and right.
* **fallback rate**: fraction of answers not served by the primary's own path (exits are that path):
  :func:`~fallbackformer.common.paths.is_fallback`.
* **selective risk** ``<path>``: the path's gate applied alone to that path's logits on every sample
  (what ``ConfidenceGate.calibrate`` guaranteed on the calibration split): errors among accepted /
  accepted for ``ltt_hb`` and ``empirical``, accepted and wrong / all for ``crc``. ``system``: errors
  among answered / answered, against the router's ``alpha`` when a router serves, else the loosest gate
  ``alpha``. Which checks count for "the guarantee holds": :mod:`~fallbackformer.evaluation.guarantee_eval`.
* **coverage**: ``system``: answered share; ``<path>``: fraction its gate accepts alone.
* **ECE** (15 bins) per path on ``softmax(logits / T_gate)``; ``system``: on the answers of the paths,
  with the serving path's temperature.
* **failure detection** per path with the gate's ``confidence(logits)`` as the ranking, for the system
  with ``FallbackOutput.confidence`` (unanswered requests last): AUROC of correct vs wrong and AURC.
* **latency**: ``FallbackOutput.latency_ms`` of single-sample calls (the model's clock), p50 and p99.
* **oracle exit**: the cheapest correct exit, if any; **oracle router**: primary or student, whichever
  is correct; **best single**: the better accuracy of the primary alone and the student alone.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fallbackformer.common.jsonsafe import json_safe
from fallbackformer.common.paths import is_fallback, served_by_codes
from fallbackformer.evaluation import metrics as M
from fallbackformer.evaluation.containers import PathArrays
from fallbackformer.evaluation.cost_eval import answer_flops
from fallbackformer.evaluation.guarantee_eval import risk_check
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.latency import nearest_rank

__all__ = ["gate_info", "evaluate_set", "failure_detection"]


def gate_info(model: FallbackModel) -> dict[str, dict[str, Any]]:
    """``{path: {"alpha", "delta", "method", "threshold", "temperature", "score"}}`` of the model's gates."""
    info = {}
    for name in model.path_names:
        gate = model.gates[name]
        g = gate.guarantee
        info[name] = {
            "alpha": g.alpha if g is not None else None,
            "delta": g.delta if g is not None else None,
            "method": g.method if g is not None else None,
            "threshold": float(gate.threshold),
            "temperature": float(gate.temperature),
            "score": getattr(gate, "score", None),
        }
    return info


def failure_detection(confidence: Tensor, correct: Tensor) -> dict[str, float | None]:
    """``{"auroc", "aurc"}`` of one ranking (``None`` where undefined: an empty set, or one class only)."""
    if confidence.numel() == 0:
        return {"auroc": None, "aurc": None}
    return {"auroc": _nan_to_none(M.failure_auroc(confidence, correct)), "aurc": _nan_to_none(M.aurc(confidence, correct))}


def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _rank(conf: Tensor) -> Tensor:
    conf = conf.detach().double().cpu()
    return torch.where(torch.isfinite(conf), conf, torch.full_like(conf, -math.inf))


def _percentile(values: Sequence[float], q: float) -> float:
    return float(nearest_rank(sorted(values), q)) if values else math.nan


@torch.inference_mode()
def evaluate_set(
    model: FallbackModel,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    latency_samples: int,
    flops: Mapping[str, Any],
    gates: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    certificate: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, PathArrays]]:
    """Every metric of one set (see the module docstring).

    Args:
        model: the system, in eval mode.
        x: raw inputs ``[N, ...]``.
        y: labels ``[N]``.
        batch_size: request size of the system's calls.
        latency_samples: single-sample calls timed on the model's clock (0 to skip).
        flops: :func:`~fallbackformer.evaluation.cost_eval.path_flops` of the model.
        gates: :func:`gate_info` of the model.
        class_names: names of the classes, by index (slices).
        certificate: :func:`~fallbackformer.evaluation.guarantee_eval.serving_certificate`; its
            ``alpha`` and ``delta`` are what the system's check is held to.

    Returns:
        ``(entry, arrays)``: the JSON-able metrics and ``{path or "system": PathArrays}``.
    """
    paths = list(model.path_names)  # exit_1.., primary, student
    y = y.detach().cpu().long()
    n = len(y)
    # ---- every path alone: one forward of the primary gives all exits
    chunks = [model.primary(xb) + [model.student(xb)] for xb in x.split(max(batch_size, 512))]
    logits = {p: torch.cat([c[i] for c in chunks]).float().cpu() for i, p in enumerate(paths)}  # [N, C] each
    # ---- the system
    outs = [model(xb) for xb in x.split(batch_size)]
    pred = torch.cat([o.prediction.cpu() for o in outs]) if n else torch.zeros(0, dtype=torch.long)  # [N]
    served: list[str] = [s for o in outs for s in o.served_by]
    reasons: list[str] = [r for o in outs for r in o.reason]
    sys_logits = torch.cat([o.logits.float().cpu() for o in outs]) if n else torch.zeros(0, 1)
    sys_conf = torch.cat([o.confidence.float().cpu() for o in outs]) if n else torch.zeros(0)

    arrays: dict[str, PathArrays] = {}
    acc: dict[str, float] = {}
    ece: dict[str, float | None] = {}
    cov: dict[str, float | None] = {}
    risk: dict[str, Any] = {}
    detect: dict[str, dict[str, float | None]] = {}
    correct_by_path: dict[str, Tensor] = {}
    for p in paths:
        lg = logits[p]
        gate = model.gates[p]
        ok = lg.argmax(dim=1) == y
        correct_by_path[p] = ok
        accepted = gate(lg)[0].cpu()
        conf = _rank(gate.confidence(lg))
        prob = torch.softmax(lg.double() / float(gate.temperature), dim=1).max(dim=1).values
        finite = torch.isfinite(prob)
        arrays[p] = PathArrays(conf, prob, ok, accepted)
        acc[p] = M.accuracy(lg.argmax(dim=1), y)
        ece[p] = _nan_to_none(M.ece(prob[finite], ok[finite])) if bool(finite.any()) else None
        detect[p] = failure_detection(conf, ok)
        cov[p] = _nan_to_none(M.coverage(accepted))
        info = gates[p]
        n_acc = int(accepted.sum())
        errs = int((accepted & ~ok).sum())
        joint = info.get("method") == "crc"
        check = risk_check(errs, n_acc, n if joint else n_acc, info.get("alpha"), info.get("delta"))
        check["kind"] = "joint (accepted and wrong / all)" if joint else "selective (wrong / accepted)"
        check["method"] = info.get("method")
        risk[p] = check

    # ---- the system: answered = prediction >= 0, whoever answered
    sys_ok = pred == y
    answered = pred >= 0
    acc["system"] = float(sys_ok.double().mean()) if n else math.nan
    temps = {p: float(model.gates[p].temperature) for p in paths}
    sys_prob = torch.full((n,), math.nan, dtype=torch.float64)
    for p in paths:
        idx = torch.tensor([i for i, s in enumerate(served) if s == p], dtype=torch.long)
        if idx.numel():
            sys_prob[idx] = torch.softmax(sys_logits[idx].double() / temps[p], dim=1).max(dim=1).values
    sys_rank = torch.where(answered, _rank(sys_conf), torch.full((n,), -math.inf, dtype=torch.float64))
    arrays["system"] = PathArrays(sys_rank, sys_prob, sys_ok, answered)
    good = answered & torch.isfinite(sys_prob)
    ece["system"] = _nan_to_none(M.ece(sys_prob[good], sys_ok[good])) if bool(good.any()) else None
    detect["system"] = failure_detection(sys_rank, sys_ok)
    cov["system"] = _nan_to_none(M.coverage(answered)) if n else None
    n_ans = int(answered.sum())
    n_wrong = int((answered & ~sys_ok).sum())
    sys_check = risk_check(n_wrong, n_ans, n_ans, certificate.get("alpha"), certificate.get("delta"))
    sys_check["kind"] = (
        "selective (wrong / answered), against the router's alpha" if certificate.get("by") == "router"
        else "selective (wrong / answered), against the loosest gate alpha"
    )
    risk = {"system": sys_check, **risk}

    # ---- served_by mix, reasons, accuracy by server
    counts = Counter(served)
    servers = served_by_codes(paths)
    served_frac = {s: counts.get(s, 0) / n if n else math.nan for s in servers}
    reason_counts = Counter(r for r in reasons if r)
    acc_by_server = {}
    for s in servers:
        idx = [i for i, v in enumerate(served) if v == s]
        acc_by_server[s] = float(sys_ok[idx].double().mean()) if idx else None
    fallback = [is_fallback(s) for s in served]

    # ---- references
    exit_paths = [p for p in paths if p != R.STUDENT]
    exit_ok = torch.stack([correct_by_path[p] for p in exit_paths], dim=1) if n else torch.zeros(0, len(exit_paths), dtype=torch.bool)
    any_exit = exit_ok.any(dim=1)
    first = torch.where(any_exit, exit_ok.double().argmax(dim=1), torch.full((n,), -1, dtype=torch.long))
    oracle_dist = {p: int((first == i).sum()) / n if n else math.nan for i, p in enumerate(exit_paths)}
    oracle_dist["none_correct"] = float((~any_exit).double().mean()) if n else math.nan
    cascade_cost = [flops["cascade"][p] for p in exit_paths]
    oracle_flops = (
        float(sum(cascade_cost[int(i)] if i >= 0 else flops["cascade"][R.PRIMARY] for i in first.tolist()) / n)
        if n
        else math.nan
    )
    acc["oracle_exit"] = float(any_exit.double().mean()) if n else math.nan
    acc["oracle_router"] = float((correct_by_path[R.PRIMARY] | correct_by_path[R.STUDENT]).double().mean()) if n else math.nan

    # ---- slices: per class
    per_class: dict[str, dict[str, Any]] = {}
    fb_t = torch.tensor(fallback, dtype=torch.bool)
    for c in sorted(set(y.tolist())):
        m = y == c
        name = class_names[c] if c < len(class_names) else str(c)
        per_class[name] = {
            "n": int(m.sum()),
            "accuracy": float(sys_ok[m].double().mean()),
            "fallback_rate": float(fb_t[m].double().mean()),
            "accuracy_primary": float(correct_by_path[R.PRIMARY][m].double().mean()),
        }
    disparity = {}
    for key, worst_is_max in (("accuracy", False), ("fallback_rate", True)):
        if per_class:
            vals = {k: v[key] for k, v in per_class.items()}
            hi = max(vals, key=vals.__getitem__)
            lo = min(vals, key=vals.__getitem__)
            disparity[key] = {
                "gap": vals[hi] - vals[lo],
                "worst_class": hi if worst_is_max else lo,
                "best_class": lo if worst_is_max else hi,
                "worst": vals[hi] if worst_is_max else vals[lo],
                "best": vals[lo] if worst_is_max else vals[hi],
            }

    # ---- latency (single-sample calls on the model's own clock)
    lat: list[float] = []
    for i in range(min(latency_samples, n)):
        lat.append(float(model(x[i : i + 1]).latency_ms))

    entry: dict[str, Any] = {
        "n": n,
        "silent_error": n_wrong / n if n else None,
        "useful": int((answered & sys_ok).sum()) / n if n else None,
        "best_single": max(acc[R.PRIMARY], acc[R.STUDENT]) if n else None,
        "accuracy": {k: _nan_to_none(v) for k, v in acc.items()},
        "accuracy_answered": _nan_to_none(float(sys_ok[answered].double().mean())) if n_ans else None,
        "accuracy_by_server": acc_by_server,
        "fallback_rate": sum(fallback) / n if n else None,
        "served_by": served_frac,
        "served_by_counts": {s: counts.get(s, 0) for s in servers},
        "reasons": {r: c / n for r, c in sorted(reason_counts.items())},
        "reason_counts": dict(sorted(reason_counts.items())),
        "selective_risk": json_safe(risk),
        "guarantee_broken": sorted(k for k, v in risk.items() if v["significant"]),
        "guarantee_exceeded": sorted(k for k, v in risk.items() if v["violated"]),
        "coverage": cov,
        "ece": ece,
        "aurc": {k: v["aurc"] for k, v in detect.items()},
        "failure_detection": detect,
        "flops": {
            "mean": answer_flops(served, reasons, flops) if n else None,
            "primary_alone": flops["alone"][R.PRIMARY],
            "student_alone": flops["alone"][R.STUDENT],
            "oracle_exit": oracle_flops,
        },
        "latency_ms": {
            "p50": _nan_to_none(_percentile(lat, 0.5)),
            "p99": _nan_to_none(_percentile(lat, 0.99)),
            "mean": _nan_to_none(sum(lat) / len(lat)) if lat else None,
            "n_calls": len(lat),
            "batch_size": 1,
        },
        "oracle_exit_distribution": oracle_dist,
        "slices": {"per_class": per_class, "max_disparity": disparity},
    }
    return entry, arrays
