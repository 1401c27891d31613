"""Early exits: per-sample exits with compaction against the full primary, gated and routed.

Gated (today's fields): the calibrated exit gates, the final answer always served; accuracy, FLOPs
(``torch.utils.flop_counter``, measured on the real calls and cross-checked against a per-sample
count), wall time, and the oracle exit (the earliest exit that agrees with the full primary) as the
limit. ``router``: the same on the clean test split with the router deciding (the system as served:
the student runs first for every sample and its FLOPs are counted for every sample; an answer by the
safe default counts as wrong). Goal: ``compute_saved >= goal_compute_saved`` at
``accuracy_drop_pt <= goal_accuracy_drop_pt``.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from fallbackformer.benchmarks.common import accept_all, bare, flops, get, interleaved, median_ratio
from fallbackformer.benchmarks.context import BenchmarkContext
from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.policy import Policy
from fallbackformer.runtime.validation import InputSpec

__all__ = ["bench_early_exit"]


def _stage_flops(primary: MultiExitNet, x1: Tensor) -> tuple[list[int], dict[int, int]]:
    """FLOPs of each stage (the input transform in stage 0) and of each head, for one sample."""
    stage_f, head_f = [], {}
    h = x1
    for i, stage in enumerate(primary.stages):
        inp = primary.input_transform(h) if i == 0 else h
        stage_f.append(flops(lambda: stage(inp)))
        h = stage(inp)
        if i in primary.exit_stages:
            head_f[i] = flops(lambda: primary.head(i)(h))
    return stage_f, head_f


def _exit_cost(k: int, primary: MultiExitNet, live: list[bool], stage_f: list[int], head_f: dict[int, int],
               oracle: bool) -> int:
    """FLOPs for one sample that leaves at exit ``k`` (``oracle``: only that exit's head is computed)."""
    s = primary.exit_stages[k]
    cost = sum(stage_f[: s + 1])
    if oracle:
        return cost + head_f[s]
    return cost + sum(head_f[e] for j, e in enumerate(primary.exit_stages) if e <= s and (live[j] or j == k))


def _model(primary: MultiExitNet, student: nn.Module, exit_gates: list[ConfidenceGate],
           spec: InputSpec) -> FallbackModel:
    """The gated exits with the final answer always served, no deadline."""
    gates = list(exit_gates) + [accept_all(), accept_all()]
    policy = Policy(budget_ms=1e9, hedge="off", admission=False)
    return FallbackModel(primary, student, gates, policy, input_spec=spec).eval()


def _figures(model: FallbackModel, x: Tensor, y: Tensor, stage_f: list[int], head_f: dict[int, int], full_f: int,
             student_f: int = 0) -> dict[str, Any]:
    """Accuracy against the full primary and the FLOPs saved (per-sample count) of ``model`` on ``(x, y)``."""
    primary = model.primary
    names = primary.exit_names
    with torch.inference_mode():
        outs = [model(xb) for xb in x.split(256)]
        final = primary(x)[-1].argmax(dim=1)
    served = [s for o in outs for s in o.served_by]
    pred = torch.cat([o.prediction for o in outs])
    if model.router is not None:  # the router computes every head it reaches
        live = [True] * primary.num_exits
    else:
        live = [not math.isinf(float(model.gates[n].threshold)) for n in names[:-1]] + [True]
    last = primary.num_exits - 1
    cost = [student_f + _exit_cost(names.index(s) if s in names else last, primary, live, stage_f, head_f, oracle=False)
            for s in served]
    acc_sys = float((pred == y).float().mean())
    acc_primary = float((final == y).float().mean())
    return {
        "accuracy_primary": acc_primary,
        "accuracy_exits": acc_sys,
        "accuracy_drop_pt": 100.0 * (acc_primary - acc_sys),
        "compute_saved": 1.0 - sum(cost) / (full_f * len(served)),
        "served_by": {k: v / len(served) for k, v in sorted(Counter(served).items())},
    }


def _routed(ctx: BenchmarkContext, stage_f: list[int], head_f: dict[int, int], full_f: int,
            goals: dict[str, float]) -> dict[str, Any]:
    """The routed system on the clean test split: FLOPs saved (the student counted for every sample)."""
    system, router = ctx.system, ctx.router
    primary, student, gates = system["primary"], system["student"], system["gates"]
    x, y = system["splits"]["test"]
    model = FallbackModel(primary, student, list(gates), Policy(budget_ms=1e9, hedge="off", admission=False),
                          input_spec=ctx.input_spec, router=router).eval()
    with torch.inference_mode():
        student_f = flops(lambda: student(x[:1]))
        out = _figures(model, x, y, stage_f, head_f, full_f, student_f=student_f)
        measured = flops(lambda: [model(xb) for xb in x.split(256)])
    out["compute_saved_measured"] = 1.0 - measured / (full_f * len(x))  # scorers and feature scores included
    out["student_flops_share"] = student_f / full_f
    out["coverage"] = 1.0 - out["served_by"].get("default", 0.0)
    out["accuracy_answered"] = _accuracy_answered(model, x, y)
    out["router_threshold"] = float(router.threshold)
    out["router_exit_floor"] = float(router.exit_floor)
    out["router_guarantee_satisfied"] = router.guarantee is not None and router.guarantee.satisfied
    out["router_source"] = system.get("router_report", {}).get("fitted_by", "the bundle")
    out["goal_met"] = out["compute_saved"] >= goals["goal_compute_saved"] and out["accuracy_drop_pt"] <= goals["goal_accuracy_drop_pt"]
    return out


def _accuracy_answered(model: FallbackModel, x: Tensor, y: Tensor) -> float:
    """Accuracy among the samples not served by the safe default (selective accuracy)."""
    with torch.inference_mode():
        outs = [model(xb) for xb in x.split(256)]
    answered = torch.tensor([s != "default" for o in outs for s in o.served_by])
    pred = torch.cat([o.prediction for o in outs])
    return float((pred[answered] == y[answered]).float().mean()) if bool(answered.any()) else float("nan")


def bench_early_exit(ctx: BenchmarkContext) -> dict[str, Any]:
    """Per-sample exits with compaction against the full primary (gated, then routed), the oracle as the limit."""
    cfg = ctx.section("early_exit")
    rounds, inner = int(get(cfg, "rounds", 9)), int(get(cfg, "inner", 20))
    goals = {"goal_compute_saved": float(get(cfg, "goal_compute_saved", 0.5)),
             "goal_accuracy_drop_pt": float(get(cfg, "goal_accuracy_drop_pt", 0.5))}
    system = ctx.system
    primary, student, gates = system["primary"], system["student"], system["gates"]
    spec = ctx.input_spec
    x, y = system["splits"]["test"]
    model = _model(primary, student, list(gates[: primary.num_exits - 1]), spec)
    run_bare = bare(primary)
    with torch.inference_mode():
        stage_f, head_f = _stage_flops(primary, x[:1])
        full_f = sum(stage_f) + head_f[primary.exit_stages[-1]]  # per sample
        out = _figures(model, x, y, stage_f, head_f, full_f)
        # the FLOPs of the real calls (compaction included) against the bare primary on the same data
        measured = flops(lambda: [model(xb) for xb in x.split(256)])
        bare_measured = flops(lambda: [run_bare(xb) for xb in x.split(256)])
        out["compute_saved_measured"] = 1.0 - measured / bare_measured
        out["flops_per_sample_full"] = full_f
        out["flops_check_rel_err"] = abs(bare_measured - full_f * len(x)) / (full_f * len(x))
        # oracle: the earliest exit that agrees with the full primary (no accuracy change)
        all_logits = primary(x)
        final = all_logits[-1].argmax(dim=1)
        agree = torch.stack([lg.argmax(dim=1) == final for lg in all_logits])  # [E, N]
        first = agree.float().argmax(dim=0).tolist()
        live = [True] * primary.num_exits
        oracle = [_exit_cost(k, primary, live, stage_f, head_f, oracle=True) for k in first]
        out["oracle_compute_saved"] = 1.0 - sum(oracle) / (full_f * len(first))
        # wall time: batch 1 (one sample per call) and batch 256
        xs1 = [x[i : i + 1] for i in range(min(len(x), int(get(cfg, "b1_samples", 64))))]
        t1 = interleaved({"primary": lambda: [run_bare(s) for s in xs1], "exits": lambda: [model(s) for s in xs1]},
                         rounds, 1)
        x256 = x[:256] if len(x) >= 256 else x.repeat(-(-256 // len(x)), 1, 1, 1)[:256]
        t256 = interleaved({"primary": lambda: run_bare(x256), "exits": lambda: model(x256)}, rounds, max(3, inner // 4))
    out["wall_b1_primary_ms"] = statistics.median(t1["primary"]) / len(xs1)
    out["wall_b1_exits_ms"] = statistics.median(t1["exits"]) / len(xs1)
    out["wall_speedup_b1"] = median_ratio(t1["primary"], t1["exits"])
    out["wall_b256_primary_ms"] = statistics.median(t256["primary"])
    out["wall_b256_exits_ms"] = statistics.median(t256["exits"])
    out["wall_speedup_b256"] = median_ratio(t256["primary"], t256["exits"])
    out.update(goals)
    out["goal"] = f"compute_saved >= {goals['goal_compute_saved']:g} at accuracy_drop_pt <= {goals['goal_accuracy_drop_pt']:g}"
    out["goal_met"] = out["compute_saved"] >= goals["goal_compute_saved"] and out["accuracy_drop_pt"] <= goals["goal_accuracy_drop_pt"]
    out["alpha_sweep"] = _alpha_sweep(ctx, cfg, stage_f, head_f, full_f)
    if get(cfg, "router", True):
        out["router"] = _routed(ctx, stage_f, head_f, full_f, goals)
    return out


def _alpha_sweep(ctx: BenchmarkContext, cfg: Any, stage_f: list[int], head_f: dict[int, int],
                 full_f: int) -> list[dict[str, float]]:
    """The trade-off along the exits' alpha (calibrated on the calibration split, read on test)."""
    alphas = list(get(cfg, "alpha_sweep", []))
    if not alphas:
        return []
    from fallbackformer.training.calibration import calibrate_gates

    system = ctx.system
    primary, student = system["primary"], system["student"]
    x, y = system["splits"]["test"]
    x_cal, y_cal = system["splits"]["calibration"]
    with torch.no_grad():  # (not inference mode: calibration fits a temperature with autograd)
        cal_logits, cal_student = primary(x_cal), student(x_cal)
    gate_cfg = dict(get(ctx.cfg, "gate_sweep", {}) or {})
    sweep = []
    for a in alphas:
        g_cfg = {**gate_cfg, "mode": "per_path", "alpha": {"exits": float(a), "primary": 0.5, "student": 0.5}}
        swept, _ = calibrate_gates(cal_logits, cal_student, y_cal, g_cfg)
        model = _model(primary, student, swept[: primary.num_exits - 1], ctx.input_spec)
        fig = _figures(model, x, y, stage_f, head_f, full_f)
        sweep.append({"alpha_exits": float(a), **{k: fig[k] for k in ("compute_saved", "accuracy_drop_pt")}})
    return sweep
