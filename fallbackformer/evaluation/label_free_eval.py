"""The label-free accuracy estimate against the truth, per set.

Per set the whole set is one window: the model's estimator
(:func:`~fallbackformer.runtime.label_free.label_free_estimator`, or the mean served confidence
when it carries none) reads what the deployed model emitted, and the truth is the accuracy of the
answered requests (not served by the safe default, as the online controller counts them).
:func:`evaluate_set` stores the entry under ``"label_free"``; :func:`measure_label_free` serves
every set with the latency budget lifted and returns the entries alone (``scripts/label_free.py``
and the slow acceptance test use it). The table is
:func:`~fallbackformer.evaluation.governance_report.label_free_rows`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.label_free import LabelFreeEstimator, WindowStats, label_free_estimator, max_softmax

__all__ = ["label_free_entry", "measure_label_free", "TOLERANCE"]

TOLERANCE = 0.05
"""The acceptance tolerance: an estimate within 5 accuracy points of the truth counts."""


def label_free_entry(model: Any, served: Sequence[str], confidence: Tensor, prediction: Tensor,
                     served_max_softmax: Sequence[float], y: Tensor) -> dict[str, Any]:
    """``{"method", "estimate", "accuracy_answered", "n_answered", "error", "within"}`` of one set.

    ``served_max_softmax``: per request the max-softmax of its served logits
    (:func:`~fallbackformer.runtime.label_free.max_softmax`).
    """
    est = label_free_estimator(model) or LabelFreeEstimator.mean_confidence()
    window = WindowStats.of(list(served), confidence.float().cpu().tolist(), prediction.cpu().tolist(),
                            list(served_max_softmax), atc_threshold=est.atc_threshold)
    answered = torch.tensor([s != R.DEFAULT for s in served], dtype=torch.bool)
    n_ans = int(answered.sum())
    truth = float((prediction.cpu() == y.cpu())[answered].double().mean()) if n_ans else None
    value = est.estimate(window)
    error = None if value is None or truth is None else value - truth
    return {"method": est.method, "estimate": value, "accuracy_answered": truth, "n_answered": n_ans,
            "n": len(served), "error": error, "within": None if error is None else abs(error) <= TOLERANCE + 1e-12}


@torch.inference_mode()
def measure_label_free(model: Any, sets: Mapping[str, tuple[Tensor, Tensor]], held_out: Sequence[str] = (),
                       batch_size: int = 512) -> dict[str, dict[str, Any]]:
    """Serve every set with the budget lifted; ``{set: label_free_entry + "held_out"}``.

    Args:
        model: the system (its estimator is read from it; a lifted copy serves).
        sets: ``{"clean" | "<corruption>/<severity>": (x, y)}``.
        held_out: corruption names never used for tuning (flagged per entry).
        batch_size: request size.
    """
    lifted = model.rebuild(policy=dataclasses.replace(model.policy, budget_ms=1e9, hedge="off")).eval()
    held = set(held_out)
    out = {}
    for key, (x, y) in sets.items():
        outs = [lifted(xb) for xb in x.split(batch_size)]
        entry = label_free_entry(model, [s for o in outs for s in o.served_by],
                                 torch.cat([o.confidence for o in outs]), torch.cat([o.prediction for o in outs]),
                                 [m for o in outs for m in max_softmax(o.logits, len(o))], y)
        entry["held_out"] = key.rpartition("/")[0] in held
        out[key] = entry
    return out
