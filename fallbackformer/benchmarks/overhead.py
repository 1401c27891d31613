"""Overhead: the wrapper on the primary's path against the bare primary and against a gated peer.

Today's figures (``ratio_b1``, ``ratio_b64`` ...) compare the wrapper with the bare primary (its
stages and final head), with two references: the final gate alone and the floor (the tensor work of
any validated, gated answer). Issue 12 restates it against :class:`~fallbackformer.benchmarks.peers.GatedPeer`:
plain PyTorch making the same decisions with the same models and gates, no deadline
(``ratio_vs_gated_peer_b1``, ``added_us_vs_gated_peer_b1``), on the configured primary and on a
ResNet-18-sized CNN (``realistic``). Both sides run the whole primary: the early exits cannot answer.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import Tensor

from fallbackformer.benchmarks.common import (
    accept_all, bare, flops, get, interleaved, median_added_us, median_ratio, never, random_input, ratio_quartiles,
)
from fallbackformer.benchmarks.context import BenchmarkContext
from fallbackformer.benchmarks.peers import GatedPeer
from fallbackformer.benchmarks.realistic import resnet18_exits, resnet_input_spec, small_image_student
from fallbackformer.models.registry import create_model
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.policy import Policy
from fallbackformer.runtime.validation import InputSpec

__all__ = ["bench_overhead"]


def _wrapper(primary: Any, student: Any, gates: list, spec: InputSpec, budget_ms: float, warm: Tensor,
             **policy: Any) -> FallbackModel:
    model = FallbackModel(primary, student, gates, Policy(budget_ms=budget_ms, **policy), input_spec=spec).eval()
    model.warm_up(warm, repeats=10, discard=2)
    return model


def _floor(primary: Any, gate: Any, spec: InputSpec) -> Any:
    """The tensor work of any validated, gated answer and nothing else, as the runtime does it: the input
    range check (one reduction, two syncs), the primary, the final gate's decision and its sync."""
    lo, hi = spec.value_range if spec.value_range is not None else (float("-inf"), float("inf"))
    tol = 1e-3 * (hi - lo)
    run = bare(primary)

    def floor(x: Tensor) -> Any:
        x_min, x_max = x.aminmax()
        if not (lo - tol <= x_min.item() and x_max.item() <= hi + tol):
            raise ValueError("benchmark input out of range")
        accept, conf, prediction = gate.decide(run(x))
        n_accept = int(accept.sum()) if accept.shape[0] > 1 else int(accept.item())
        return prediction, conf, n_accept

    return floor


def _configured(ctx: BenchmarkContext, cfg: Any, rounds: int, inner: int, budget_ms: float) -> dict[str, Any]:
    """The comparison on the registered primary and student the config names, built fresh (random weights)."""
    names = {k: get(cfg, k) for k in ("primary", "student")} | {"num_classes": get(ctx.root, "num_classes")}
    missing = [k for k, v in names.items() if v is None]
    if missing:
        raise ValueError(f"the overhead section needs {missing} in the config (benchmark.overhead.primary, "
                         "benchmark.overhead.student: registered model names; num_classes)")
    name, width, num_classes = str(names["primary"]), int(get(cfg, "width", 64)), int(names["num_classes"])
    spec = ctx.input_spec
    torch.manual_seed(0)
    primary = create_model(name, num_classes=num_classes, width=width).eval()
    student = create_model(str(names["student"]), num_classes=num_classes).eval()
    # The primary's path: early exits off (their gates accept nothing, so their heads are not computed),
    # the final answer always accepted. What remains is the wrapper's own work.
    gates = [never() for _ in range(primary.num_exits - 1)] + [accept_all(), accept_all()]
    warm = random_input(spec, 64, seed=1)
    default = _wrapper(primary, student, gates, spec, budget_ms, warm)
    hedged = _wrapper(primary, student, gates, spec, budget_ms, warm, hedge="always")
    run_bare, final_gate = bare(primary), gates[primary.num_exits - 1]
    floor, peer = _floor(primary, final_gate, spec), GatedPeer(primary, student, gates, spec)
    out: dict[str, Any] = {"primary": f"{name} width={width}", "rounds": rounds, "inner": inner,
                           "budget_ms": budget_ms}
    with torch.inference_mode():
        for b in (1, 64):
            x = random_input(spec, b, seed=b)
            assert default(x).served_by == ["primary"] * b
            assert torch.equal(peer(x), default(x).prediction)  # the peer makes the same decisions
            times = interleaved(
                {
                    "bare": lambda: run_bare(x),
                    "bare_gate": lambda: final_gate(run_bare(x)),
                    "floor": lambda: floor(x),
                    "peer": lambda: peer(x),
                    "wrapper": lambda: default(x),
                    "hedged": lambda: hedged(x),
                },
                rounds,
                inner if b == 1 else max(5, inner // 8),
            )
            t = {k: statistics.median(v) for k, v in times.items()}
            out[f"bare_b{b}_ms"], out[f"wrapper_b{b}_ms"] = t["bare"], t["wrapper"]
            out[f"hedged_b{b}_ms"], out[f"gated_peer_b{b}_ms"] = t["hedged"], t["peer"]
            out[f"ratio_b{b}"] = median_ratio(times["wrapper"], times["bare"])
            out[f"overhead_us_b{b}"] = median_added_us(times["wrapper"], times["bare"])
            out[f"floor_us_b{b}"] = median_added_us(times["floor"], times["bare"])
            out[f"ratio_b{b}_iqr"] = ratio_quartiles(times["wrapper"], times["bare"])
            out[f"ratio_hedged_b{b}"] = median_ratio(times["hedged"], times["bare"])
            out[f"ratio_gate_only_b{b}"] = median_ratio(times["bare_gate"], times["bare"])
            out[f"ratio_floor_b{b}"] = median_ratio(times["floor"], times["bare"])
            out[f"ratio_vs_gated_peer_b{b}"] = median_ratio(times["wrapper"], times["peer"])
            out[f"ratio_vs_gated_peer_b{b}_iqr"] = ratio_quartiles(times["wrapper"], times["peer"])
            out[f"added_us_vs_gated_peer_b{b}"] = median_added_us(times["wrapper"], times["peer"])
            out[f"gated_peer_ratio_b{b}"] = median_ratio(times["peer"], times["bare"])
    out["goal_ratio_b1"] = float(get(cfg, "goal_ratio_b1", 1.05))
    out["goal_met"] = out["ratio_b1"] <= out["goal_ratio_b1"]
    hedged.close(timeout_s=5.0)  # joined: a worker thread ending during interpreter exit can abort it
    return out


def _realistic(cfg: Any, budget_ms: float) -> dict[str, Any]:
    """The same comparison at batch 1 on a ResNet-18-sized CNN (random weights)."""
    size, width = int(get(cfg, "image_size", 32)), int(get(cfg, "width", 64))
    num_classes = int(get(cfg, "num_classes", 10))
    rounds, inner = int(get(cfg, "rounds", 9)), int(get(cfg, "inner", 5))
    torch.manual_seed(0)
    primary, student = resnet18_exits(num_classes, width), small_image_student(num_classes)
    spec = resnet_input_spec(size)
    gates = [accept_all(), accept_all()]
    model = _wrapper(primary, student, gates, spec, budget_ms, random_input(spec, 1, seed=1))
    peer, run_bare = GatedPeer(primary, student, gates, spec), bare(primary)
    x = random_input(spec, 1, seed=2)
    with torch.inference_mode():
        assert model(x).served_by == ["primary"] and torch.equal(peer(x), model(x).prediction)
        times = interleaved({"bare": lambda: run_bare(x), "peer": lambda: peer(x), "wrapper": lambda: model(x)},
                            rounds, inner)
        gflops = flops(lambda: run_bare(x)) / 1e9
    return {
        "model": f"ResNet-18 (CIFAR form, width {width}, random weights) on {size}x{size} input, one head",
        "gflops_b1": gflops,
        "rounds": rounds,
        "inner": inner,
        "bare_b1_ms": statistics.median(times["bare"]),
        "gated_peer_b1_ms": statistics.median(times["peer"]),
        "wrapper_b1_ms": statistics.median(times["wrapper"]),
        "ratio_b1": median_ratio(times["wrapper"], times["bare"]),
        "ratio_vs_gated_peer_b1": median_ratio(times["wrapper"], times["peer"]),
        "ratio_vs_gated_peer_b1_iqr": ratio_quartiles(times["wrapper"], times["peer"]),
        "added_us_vs_gated_peer_b1": median_added_us(times["wrapper"], times["peer"]),
    }


def bench_overhead(ctx: BenchmarkContext) -> dict[str, Any]:
    """The wrapper on the primary's path: against the bare primary and the gated peer (batch 1 and 64),
    and against the gated peer on a ResNet-18-sized CNN (batch 1, ``realistic``)."""
    cfg = ctx.section("overhead")
    rounds, inner = int(get(cfg, "rounds", 15)), int(get(cfg, "inner", 40))
    budget_ms = float(get(cfg, "budget_ms", 1e4))
    out = _configured(ctx, cfg, rounds, inner, budget_ms)
    realistic = get(cfg, "realistic", None)
    if realistic is not None and get(realistic, "enabled", True):
        out["realistic"] = _realistic(realistic, budget_ms)
    return out
