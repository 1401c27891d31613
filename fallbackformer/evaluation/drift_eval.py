"""Calibration drift under shift: how soon the runtime notices, and what each drift policy serves then.

The gates' guarantees hold on data like the calibration split; under shift they may not (the report's
"broken" rows). ``Policy(drift_check=True)`` watches the first live gate's score and raises
``calibration_drift``; what follows is the policy's ``on_drift``. This study tells a product owner
which choice to sign off, per corruption:

* a clean stream of ``clean_requests`` requests: does the check raise a false alarm?
* for every corruption at one severity, a stream of ``requests`` requests drawn (seeded, with
  replacement) from that shift set and sent in calls of ``batch_size``: after how many requests the
  signal came (``detected_after``), and, on the requests after the detecting call, the accuracy and
  coverage (answers that are not the safe default) of ``on_drift="alert"`` (the system keeps
  answering as before) and ``on_drift="student"`` (the student answers). ``on_drift="default"``
  needs no stream: it abstains on every request after detection (coverage 0).

The same requests go through both policies, so their figures compare like with like. The model's own
policy and sinks are restored afterwards; its drift state is reset (as after ``reset_drift()``).

>>> study = drift_study(model, {"clean": (x, y), "fog/5": (xf, yf)})   # doctest: +SKIP
>>> study["sets"]["fog/5"]["detected_after"], study["sets"]["fog/5"]["after"]["student"]   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from fallbackformer.data.protocol import parse_set_key
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.fallback_model import FallbackModel

__all__ = ["DRIFT_POLICIES", "drift_study", "stream_indices"]

#: the drift policies streamed (``default`` abstains after detection: nothing to measure)
DRIFT_POLICIES = ("alert", "student")
CLEAN = "clean"


def stream_indices(n: int, requests: int, seed: int, key: str) -> Tensor:
    """``requests`` indices into a set of ``n``, drawn with replacement, seeded per (seed, set)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randint(0, n, (requests,), generator=gen)


def _run_stream(model: FallbackModel, x: Tensor, y: Tensor, batch_size: int) -> dict[str, Any]:
    """One stream through ``model`` (its policy already set): when drift was signalled, and the
    accuracy and coverage of the answers after the detecting call."""
    model.reset_drift()
    detected_after: int | None = None
    correct = answered = total = 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        out = model(xb)
        if detected_after is not None:
            served = torch.tensor([who != R.DEFAULT for who in out.served_by])
            correct += int(((out.prediction == yb) & served).sum())
            answered += int(served.sum())
            total += len(yb)
        elif R.CALIBRATION_DRIFT in out.signals:
            detected_after = start + len(yb)
    return {
        "detected_after": detected_after,
        "n_after": total,
        "accuracy": correct / total if total else None,
        "coverage": answered / total if total else None,
        "selective_accuracy": correct / answered if answered else None,
    }


@torch.inference_mode()
def drift_study(
    model: FallbackModel,
    sets: Mapping[str, tuple[Tensor, Tensor]],
    *,
    severity: int = 5,
    requests: int = 400,
    batch_size: int = 8,
    clean_requests: int = 1000,
    held_out: Iterable[str] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """Stream the clean set and every shift set of ``severity`` under each drift policy.

    Args:
        model: the system; its first live gate must carry calibration-time reference scores.
        sets: ``{"clean": (x, y), "<corruption>/<severity>": (x, y), ...}`` (raw inputs).
        severity: which shift sets are streamed.
        requests: requests per shift stream (a multiple of ``batch_size`` reads best).
        batch_size: requests per call.
        clean_requests: requests of the clean stream (false alarms); 0 skips it.
        held_out: corruption names never used for tuning (marked in the result).
        seed: seeds the streams (each set its own).

    Returns:
        ``{"config", "clean", "sets": {key: {"corruption", "held_out", "detected_after",
        "after": {policy: {"accuracy", "coverage", "selective_accuracy", "n_after"}}}}, "summary"}``
        (JSON-able); ``{"skipped": reason}`` when the model cannot run the check.
    """
    if requests < 1 or batch_size < 1 or clean_requests < 0:
        raise ValueError(
            f"drift_study needs requests >= 1, batch_size >= 1, clean_requests >= 0; got "
            f"{requests}, {batch_size}, {clean_requests}"
        )
    first = model.drift_gate
    if model.gates[first].reference_scores.numel() < 2:
        return {"skipped": f"gate {first!r} carries no calibration-time reference scores; recalibrate it"}
    held = set(held_out)
    saved_policy, saved_sinks = model.policy, model.sinks
    # no deadline, no hedging threads; the breaker, rollback and compilation stay as they are
    base = dataclasses.replace(saved_policy, drift_check=True, hedge="off", budget_ms=1e9, on_invalid_input="default")
    policies = {p: dataclasses.replace(base, on_drift=p) for p in DRIFT_POLICIES}
    result: dict[str, Any] = {
        "config": {"severity": severity, "requests": requests, "batch_size": batch_size,
                   "clean_requests": clean_requests, "seed": seed, "gate": first,
                   "window": base.drift_window, "level": base.drift_level,
                   "check_every": base.drift_check_every, "horizon": base.drift_horizon},
        "clean": None,
        "sets": {},
    }
    model.sinks = []
    try:
        if clean_requests and CLEAN in sets:
            x, y = sets[CLEAN]
            idx = stream_indices(len(y), clean_requests, seed, CLEAN)
            model.policy = policies["alert"]
            run = _run_stream(model, x[idx], y[idx], batch_size)
            result["clean"] = {"requests": clean_requests, "false_alarm": run["detected_after"] is not None,
                               "detected_after": run["detected_after"]}
        for key, (x, y) in sets.items():
            parsed = parse_set_key(key)
            if parsed is None or parsed[1] != severity:
                continue
            idx = stream_indices(len(y), requests, seed, key)
            xs, ys = x[idx], y[idx]
            after: dict[str, Any] = {}
            detected = None
            for name, policy in policies.items():
                model.policy = policy
                run = _run_stream(model, xs, ys, batch_size)
                detected = run.pop("detected_after")  # the same for every policy (same scores until then)
                after[name] = run
            result["sets"][key] = {"corruption": parsed[0], "held_out": parsed[0] in held,
                                   "detected_after": detected, "after": after}
    finally:
        model.policy, model.sinks = saved_policy, saved_sinks
        model.reset_drift()
    result["summary"] = _summarize(result["sets"])
    return result


def _summarize(sets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    detected = [e["detected_after"] for e in sets.values() if e["detected_after"] is not None]
    out: dict[str, Any] = {
        "n_sets": len(sets),
        "detected": len(detected),
        "median_detected_after": statistics.median(detected) if detected else None,
        "mean_accuracy_after": {},
        "student_better": sorted(
            k for k, e in sets.items()
            if e["after"]["student"]["accuracy"] is not None
            and e["after"]["student"]["accuracy"] > e["after"]["alert"]["accuracy"]
        ),
    }
    for policy in DRIFT_POLICIES:
        accs = [e["after"][policy]["accuracy"] for e in sets.values() if e["after"][policy]["accuracy"] is not None]
        out["mean_accuracy_after"][policy] = statistics.fmean(accs) if accs else None
    return out
