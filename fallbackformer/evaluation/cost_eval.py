"""What a bundle costs: FLOPs per path, measured stage latencies, and the accuracy-vs-budget sweep.

* **FLOPs** (``torch.utils.flop_counter.FlopCounterMode``, counted once per path on one sample):
  ``exit_k`` costs the input transform, the stages up to its own and heads 1..k; ``primary`` all
  stages and heads; ``student`` and ``default`` answers cost the whole primary plus the student (an upper
  bound: a deadline fallback stopped earlier), except ``breaker_open`` (student only) and
  ``invalid_input`` (nothing). :func:`answer_flops` combines these with the served_by mix.
* **accuracy vs budget** (:func:`budget_sweep`): a simulation with the real runtime logic (deadline
  checks, admission control): the stages and the student are wrapped in ``ScriptedDelay`` on a
  ``FakeClock``, each taking its measured single-sample median time per call, the latency profile is
  seeded with ``warm_up``, and ``policy.budget_ms`` is set to each budget (hedging, compilation and the
  breaker off). It answers "what would this bundle do at budget B on a machine with these stage times".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fallbackformer.common.paths import is_fallback
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import median_ms
from fallbackformer.runtime.fallback_model import FallbackModel

__all__ = ["path_flops", "answer_flops", "measure_stage_latency", "default_budgets", "budget_sweep"]

@torch.no_grad()
def path_flops(model: FallbackModel, example: Tensor) -> dict[str, Any]:
    """FLOPs of one sample per path, counted once with ``FlopCounterMode``.

    Args:
        model: the system.
        example: one raw input ``[1, ...]`` (or a batch; only the first sample is used).

    Returns:
        ``{"cascade": {exit_k | "primary": FLOPs when that head serves, all earlier heads included},
        "alone": {path: FLOPs of that path run by itself}, "student": FLOPs, "fallback": FLOPs of a
        student answer after the whole primary}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    primary: MultiExitNet = model.primary
    x = example[:1]

    def count(fn: Any, *args: Any) -> tuple[int, Any]:
        with FlopCounterMode(display=False) as fc:
            out = fn(*args)
        return int(fc.get_total_flops()), out

    cum, h = count(primary.input_transform, x)
    heads_cum = 0
    cascade: dict[str, int] = {}
    alone: dict[str, int] = {}
    names = primary.exit_names
    k = 0
    for i, stage in enumerate(primary.stages):
        f, h = count(stage, h)
        cum += f
        if i in primary.exit_stages:
            fh, _ = count(primary.head(i), h)
            heads_cum += fh
            cascade[names[k]] = cum + heads_cum
            alone[names[k]] = cum + fh
            k += 1
    student_f, _ = count(model.student, x)
    alone[R.STUDENT] = student_f
    return {
        "cascade": cascade,
        "alone": alone,
        "student": student_f,
        "fallback": cascade[R.PRIMARY] + student_f,
        "note": "FlopCounterMode counts matmul/conv/bmm FLOPs (2 per multiply-add); elementwise ops and "
        "interpolation are not counted",
    }


def answer_flops(served_by: Sequence[str], reasons: Sequence[str], flops: Mapping[str, Any]) -> float:
    """Mean FLOPs per answer of one call's ``served_by`` / ``reason`` lists under :func:`path_flops`.

    Returns:
        NaN for no answers.
    """
    if not served_by:
        return math.nan
    total = 0.0
    for who, why in zip(served_by, reasons):
        if who in flops["cascade"]:
            total += flops["cascade"][who]
        elif why == R.INVALID_INPUT:
            continue
        elif why == R.BREAKER_OPEN:
            total += flops["student"]
        else:
            total += flops["fallback"]
    return total / len(served_by)


@torch.inference_mode()
def measure_stage_latency(model: FallbackModel, example: Tensor, reps: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median single-sample wall time (ms) of each primary stage (its head included) and the student.

    The input transform is counted in the first stage. Uses ``time.perf_counter_ns`` (real time).

    Returns:
        ``{"stage_0": ms, ..., "student": ms, "total_primary": ms}``.
    """
    primary: MultiExitNet = model.primary
    x = example[:1]
    feats = []
    h = primary.input_transform(x)
    for stage in primary.stages:
        feats.append(h)
        h = stage(h)
    out: dict[str, float] = {}

    def timed(fn: Any) -> float:
        return median_ms(fn, reps, warmup)

    for i, stage in enumerate(primary.stages):
        head = primary.head(i) if i in primary.exit_stages else None
        inp = feats[i]

        def run(stage: nn.Module = stage, head: nn.Module | None = head, inp: Tensor = inp, i: int = i) -> None:
            z = primary.input_transform(x) if i == 0 else inp
            z = stage(z)
            if head is not None:
                head(z)

        out[f"stage_{i}"] = timed(run)
    out[R.STUDENT] = timed(lambda: model.student(x))
    out["total_primary"] = sum(v for k, v in out.items() if k.startswith("stage_"))
    return out


def default_budgets(stage_ms: Mapping[str, float], margin_ms: float = 0.0, n: int = 12) -> list[float]:
    """Log-spaced budgets from half the first stage to twice (primary + student + margin).

    Admission control reserves the student's time and the policy's margin, so the whole primary only
    runs once the budget covers all three.
    """
    lo = max(1e-3, 0.5 * stage_ms["stage_0"])
    hi = max(lo * 4, 2.0 * (stage_ms["total_primary"] + stage_ms[R.STUDENT] + margin_ms))
    return [float(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]


def _sim_policy(model: FallbackModel, budget_ms: float) -> Any:
    """The model's policy at another budget, with the parts that do not belong in a simulation off:
    no hedging threads, no compilation, no circuit breaker (its state would carry between sets)."""
    policy = model.policy
    changes: dict[str, Any] = {"budget_ms": float(budget_ms)}
    for name, value in (("hedge", "off"), ("compile", "off"), ("breaker", None)):
        if hasattr(policy, name):
            changes[name] = value
    return dataclasses.replace(policy, **changes)


def _timed_copy(model: FallbackModel, stage_ms: Mapping[str, float], budget_ms: float) -> FallbackModel:
    """The same weights and gates with stages and student that take ``stage_ms`` on a FakeClock."""
    from fallbackformer.runtime.clock import FakeClock, ScriptedDelay

    clock = FakeClock()
    primary: MultiExitNet = model.primary
    stages = [ScriptedDelay(s, clock, [float(stage_ms[f"stage_{i}"])]) for i, s in enumerate(primary.stages)]
    heads = {s: primary.head(s) for s in primary.exit_stages}
    timed_primary = MultiExitNet(stages, heads, input_transform=primary.input_transform)
    timed_student = ScriptedDelay(model.student, clock, [float(stage_ms[R.STUDENT])])
    return model.rebuild(primary=timed_primary, student=timed_student, policy=_sim_policy(model, budget_ms),
                         clock=clock).eval()


@torch.inference_mode()
def budget_sweep(
    model: FallbackModel,
    sets: Mapping[str, tuple[Tensor, Tensor]],
    budgets_ms: Sequence[float],
    stage_ms: Mapping[str, float],
) -> dict[str, Any]:
    """Accuracy and fallback rate of the system against the latency budget (simulated time).

    Per set, the model is rebuilt around the same weights and gates with stages and a student that
    each take ``stage_ms`` (per call, whatever the batch) on a :class:`FakeClock`; its latency profile
    is seeded with ``warm_up`` (so admission control predicts those times); then for each budget the
    policy's ``budget_ms`` is set (hedging, compilation and the breaker off) and the set is served in
    one call. The model passed in is not modified.

    Returns:
        ``{"budgets_ms": [...], "policy_budget_ms": float, "stage_ms": {...},
        "sets": {name: {"accuracy": [...], "fallback_rate": [...], "deadline_rate": [...]}}}``.
    """
    result: dict[str, Any] = {
        "budgets_ms": [float(b) for b in budgets_ms],
        "policy_budget_ms": float(model.policy.budget_ms),
        "stage_ms": dict(stage_ms),
        "sets": {},
    }
    for name, (x, y) in sets.items():
        r = result["sets"][name] = {"accuracy": [], "fallback_rate": [], "deadline_rate": []}
        if len(y) == 0:
            continue
        timed = _timed_copy(model, stage_ms, max(budgets_ms))
        if hasattr(timed, "warm_up"):
            timed.warm_up(x, repeats=8, discard=0, batch_sizes=[len(y)])
        for b in budgets_ms:
            timed.policy = _sim_policy(model, b)  # (the call reads the new policy)
            out = timed(x)
            n = len(y)
            fb = sum(is_fallback(s) for s in out.served_by) / n
            dl = sum(r_ in (R.DEADLINE_EXCEEDED, R.DEADLINE_PREDICTED) for r_ in out.reason) / n
            r["accuracy"].append(float((out.prediction.cpu() == y.cpu()).double().mean()))
            r["fallback_rate"].append(fb)
            r["deadline_rate"].append(dl)
    return result
