"""Benchmarks of the runtime: what the wrapper costs, what it saves, and whether it keeps the deadline.

``run_benchmark(cfg)`` (called by ``scripts/benchmark.py``, config ``configs/benchmark.yaml``) writes
``DIR/benchmark.json`` and ``DIR/BENCHMARKS.md`` with the machine described and these sections:

``overhead``   the wrapper on the primary path against the bare primary (its stages and final head),
               batch 1 and 64: ``ratio_b1``, ``ratio_b64`` (goal: ``ratio_b1 <= 1.05`` for a primary
               of about 1 ms), plus the ratio with the hard deadline on (``hedge="always"``), and two
               references: the final gate alone (``ratio_gate_only``) and the floor (``ratio_floor``:
               the tensor work of any validated, gated answer, without the runtime's bookkeeping).
``deadline``   a primary that stalls on some calls: fallbackformer (hedged) against a naive
               ``concurrent.futures`` timeout wrapper (``naive_timeout``) and the bare primary
               (``no_wrapper``): p50/p99/p99.9/max latency and misses (answers after budget + 5 ms).
``early_exit`` per-sample exits with compaction against the full primary, batch 1 and 256: accuracy,
               FLOPs (``torch.utils.flop_counter``, measured on the real calls and cross-checked
               against a per-sample count), wall time, and the oracle exit (the earliest exit that
               agrees with the full primary) as the limit. Goal: ``compute_saved >= 0.5`` at
               ``accuracy_drop_pt <= 0.5`` on digits.
``compile``    eager against ``torch.compile`` per module, as ``compile="auto"`` decides at warm-up.
``onnxruntime`` onnxruntime against the PyTorch runtime (eager), batch 1 and 64, at a fixed thread
               count: each combined graph (``where``, ``cond``) in one session, and the bundle loaded
               with ``backend="onnxruntime"`` (the same runtime, stages in onnxruntime); ratios are
               onnxruntime time / torch time, and decisions (prediction, served_by) must be identical.

More sections: :data:`SECTION_PROVIDERS` and :func:`register_section`.

The machine is noisy (shared cores): every comparison interleaves its contenders round by round and
reports medians of per-round figures; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.models.registry import create_model
from fallbackformer.runtime.clock import MonotonicClock, ScriptedDelay
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.policy import Policy

log = logging.getLogger(__name__)

__all__ = [
    "BenchmarkContext",
    "SECTION_PROVIDERS",
    "describe_machine",
    "register_section",
    "run_benchmark",
    "write_markdown",
]

#: Sections implemented outside this module: ``name -> "module:function"``; the function takes the
#: :class:`BenchmarkContext` and returns a JSON-able dict (rendered as a key/value table).
SECTION_PROVIDERS: dict[str, str] = {}
_REGISTERED: dict[str, Callable[[BenchmarkContext], dict[str, Any]]] = {}


def register_section(name: str) -> Callable[[Callable[[BenchmarkContext], dict[str, Any]]], Callable[..., Any]]:
    """Decorator: make ``fn(ctx) -> dict`` the benchmark section ``name`` (overrides a provider)."""

    def deco(fn: Callable[[BenchmarkContext], dict[str, Any]]) -> Callable[..., Any]:
        _REGISTERED[name] = fn
        return fn

    return deco


@dataclass
class BenchmarkContext:
    """What a section gets: its config node, the trained system (built on first use), the machine."""

    cfg: Any
    machine: dict[str, Any]
    out_dir: Path
    system_factory: Callable[[], dict[str, Any]] | None = None
    _system: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def system(self) -> dict[str, Any]:
        """``{"primary", "student", "gates", "splits"}`` of the trained digits system."""
        if self._system is None:
            if self.system_factory is None:
                raise RuntimeError("this benchmark run has no trained system; give bundle=PATH or let it train")
            self._system = self.system_factory()
        return self._system

    def section(self, name: str) -> Any:
        return _get(self.cfg, name, {})


# ------------------------------------------------------------------------------------- helpers


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, torch and Python versions, threads, load: what a reader needs to weigh figures."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu or "unknown",
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _pct(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (rank rounded up)."""
    k = max(1, math.ceil(q * len(sorted_ms)))
    return sorted_ms[k - 1]


def _latency_summary(ms: list[float], budget_ms: float, tolerance_ms: float) -> dict[str, Any]:
    s = sorted(ms)
    return {
        "calls": len(s),
        "p50_ms": _pct(s, 0.5),
        "p99_ms": _pct(s, 0.99),
        "p999_ms": _pct(s, 0.999),
        "max_ms": s[-1],
        "misses": sum(v > budget_ms + tolerance_ms for v in s),
    }


def _interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, inner: int) -> dict[str, list[float]]:
    """Per round and contender, the median ms of ``inner`` calls; the order alternates each round."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = fns[name]
            samples = []
            for _ in range(inner):
                t0 = time.perf_counter_ns()
                fn()
                samples.append((time.perf_counter_ns() - t0) / 1e6)
            out[name].append(statistics.median(samples))
    return out


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def _ratio_quartiles(num: list[float], den: list[float]) -> list[float]:
    """The 25th and 75th percentiles of the per-round ratios: the spread a reader should expect."""
    ratios = sorted(a / b for a, b in zip(num, den))
    if len(ratios) < 2:
        return [ratios[0], ratios[0]]
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q[0], q[2]]


def _bare(primary: MultiExitNet) -> Callable[[Tensor], Tensor]:
    """The primary as one would serve it without fallbackformer: its stages and final head."""
    last = primary.exit_stages[-1]

    def run(x: Tensor) -> Tensor:
        h = primary.input_transform(x)
        for stage in primary.stages:
            h = stage(h)
        return primary.head(last)(h)

    return run


def _flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _accept_all() -> ConfidenceGate:
    return ConfidenceGate(temperature=1.0, threshold=-math.inf)


def _never() -> ConfidenceGate:
    return ConfidenceGate(temperature=1.0, threshold=math.inf)


# ------------------------------------------------------------------------------------- sections


def bench_overhead(ctx: BenchmarkContext) -> dict[str, Any]:
    """The wrapper on the primary path against the bare primary, batch 1 and 64."""
    cfg = ctx.section("overhead")
    width = int(_get(cfg, "width", 64))
    rounds, inner = int(_get(cfg, "rounds", 15)), int(_get(cfg, "inner", 40))
    torch.manual_seed(0)
    primary = create_model("digits_cnn_exits", num_classes=10, width=width).eval()
    student = create_model("digits_mlp_student", num_classes=10).eval()
    # The primary path: early exits off (their gates accept nothing, so their heads are not computed),
    # the final answer always accepted. What remains is the wrapper's own work.
    gates = [_never() for _ in range(primary.num_exits - 1)] + [_accept_all(), _accept_all()]
    from fallbackformer.data.digits import INPUT_SPEC

    def wrapper(**policy: Any) -> FallbackModel:
        model = FallbackModel(primary, student, gates, Policy(budget_ms=1e4, **policy), input_spec=INPUT_SPEC).eval()
        model.warm_up(torch.rand(64, 1, 8, 8) * 16, repeats=10, discard=2)
        return model

    default, hedged = wrapper(), wrapper(hedge="always")
    bare = _bare(primary)
    final_gate = gates[primary.num_exits - 1]

    def bare_gated(x: Tensor) -> Any:  # what any gated answer costs: the final gate's confidence
        return final_gate(bare(x))

    lo, hi = INPUT_SPEC.value_range  # type: ignore[misc]
    tol = 1e-3 * (hi - lo)

    def floor(x: Tensor) -> Any:
        """The tensor work of any validated, gated answer and nothing else, as the runtime does it:
        the input range check (one reduction, two syncs), the primary, the final gate's decision
        (confidence and class from one reduction) and its sync."""
        x_min, x_max = x.aminmax()
        if not (lo - tol <= x_min.item() and x_max.item() <= hi + tol):
            raise ValueError("benchmark input out of range")
        logits = bare(x)
        accept, conf, prediction = final_gate.decide(logits)
        n_accept = int(accept.sum()) if accept.shape[0] > 1 else int(accept.item())
        return prediction, conf, n_accept

    out: dict[str, Any] = {"primary": f"digits_cnn_exits width={width}", "rounds": rounds, "inner": inner}
    with torch.inference_mode():
        for b in (1, 64):
            x = torch.rand(b, 1, 8, 8) * 16
            assert default(x).served_by == ["primary"] * b
            inner_b = inner if b == 1 else max(5, inner // 8)
            times = _interleaved(
                {
                    "bare": lambda: bare(x),
                    "bare_gate": lambda: bare_gated(x),
                    "floor": lambda: floor(x),
                    "wrapper": lambda: default(x),
                    "hedged": lambda: hedged(x),
                },
                rounds,
                inner_b,
            )
            out[f"bare_b{b}_ms"] = statistics.median(times["bare"])
            out[f"wrapper_b{b}_ms"] = statistics.median(times["wrapper"])
            out[f"hedged_b{b}_ms"] = statistics.median(times["hedged"])
            out[f"ratio_b{b}"] = _median_ratio(times["wrapper"], times["bare"])
            out[f"overhead_us_b{b}"] = 1e3 * statistics.median(w - r for w, r in zip(times["wrapper"], times["bare"]))
            out[f"floor_us_b{b}"] = 1e3 * statistics.median(f - r for f, r in zip(times["floor"], times["bare"]))
            out[f"ratio_b{b}_iqr"] = _ratio_quartiles(times["wrapper"], times["bare"])
            out[f"ratio_hedged_b{b}"] = _median_ratio(times["hedged"], times["bare"])
            out[f"ratio_gate_only_b{b}"] = _median_ratio(times["bare_gate"], times["bare"])
            out[f"ratio_floor_b{b}"] = _median_ratio(times["floor"], times["bare"])
    out["goal_ratio_b1"] = 1.05
    out["goal_met"] = out["ratio_b1"] <= 1.05
    hedged.close(timeout_s=5.0)  # joined: a worker thread ending during interpreter exit can abort it
    return out


def _stalling(primary: MultiExitNet, stall_ms: float, pattern: list[bool]) -> MultiExitNet:
    """The same primary whose first stage stalls ``stall_ms`` on the calls ``pattern`` marks."""
    script = [stall_ms if s else 0.0 for s in pattern] + [0.0]
    stages = [ScriptedDelay(primary.stages[0], MonotonicClock(), script)] + list(primary.stages[1:])
    heads = {s: primary.head(s) for s in primary.exit_stages}
    return MultiExitNet(stages, heads, input_transform=primary.input_transform).eval()


def bench_deadline(ctx: BenchmarkContext) -> dict[str, Any]:
    """Latency under injected stalls: fallbackformer vs a naive timeout wrapper vs the bare primary."""
    cfg = ctx.section("deadline")
    budget = float(_get(cfg, "budget_ms", 20.0))
    calls = int(_get(cfg, "calls", 500))
    p_stall = float(_get(cfg, "stall_probability", 0.1))
    stall_ms = float(_get(cfg, "stall_ms", 10 * budget))
    tolerance = float(_get(cfg, "miss_tolerance_ms", 5.0))
    margin = float(_get(cfg, "margin_ms", 1.0))
    workers = int(_get(cfg, "workers", 2))  # threads for the primary, the same for both wrappers
    interval = float(_get(cfg, "interval_ms", 5.0))  # open-loop arrivals
    system = ctx.system
    primary, student, gates = system["primary"], system["student"], system["gates"]
    x_test, y_test = system["splits"]["test"]
    gen = torch.Generator().manual_seed(int(_get(cfg, "seed", 0)))
    pattern = (torch.rand(calls, generator=gen) < p_stall).tolist()
    idx = torch.randint(0, len(x_test), (calls,), generator=gen).tolist()
    from fallbackformer.data.digits import INPUT_SPEC

    results: dict[str, Any] = {
        "budget_ms": budget,
        "calls": calls,
        "stall_probability": p_stall,
        "stall_ms": stall_ms,
        "miss": f"answer after budget + {tolerance:g} ms",
        "workers": workers,
        "interval_ms": interval,
    }

    def serve(call: Callable[[Tensor], Tensor]) -> tuple[list[float], float, float]:
        """Requests scheduled every ``interval`` ms (stalls are a matter of time, not of call count);
        returns each call's latency, the accuracy, and how far the client fell behind the schedule."""
        latencies, correct, behind = [], 0, 0.0
        t_start = time.perf_counter_ns()
        for k in range(calls):
            x = x_test[idx[k] : idx[k] + 1]
            arrival = t_start + int(k * interval * 1e6)
            wait = arrival - time.perf_counter_ns()
            if wait > 0:
                time.sleep(wait / 1e9)
            t0 = time.perf_counter_ns()
            behind = max(behind, (t0 - arrival) / 1e6)
            pred = call(x)
            latencies.append((time.perf_counter_ns() - t0) / 1e6)
            correct += int(pred[0] == y_test[idx[k]])
        return latencies, correct / calls, behind

    with torch.inference_mode():
        # fallbackformer: warmed up on the healthy primary, then the stalls begin
        stalled = _stalling(primary, stall_ms, [False] * 64 + pattern)
        model = FallbackModel(
            stalled,
            student,
            list(gates),
            Policy(budget_ms=budget, margin_ms=margin, hedge="always", hedge_workers=workers),
            input_spec=INPUT_SPEC,
        ).eval()
        model.warm_up(x_test[:8], repeats=20, discard=4, batch_sizes=[1])
        stalled.stages[0].calls = 64  # the warm-up consumed its healthy prefix; stalls start now
        lat, acc, behind = serve(lambda x: model(x).prediction)
        stats = model.stats()
        results["fallbackformer"] = {
            **_latency_summary(lat, budget, tolerance),
            "accuracy": acc,
            "behind_schedule_ms": behind,
            "default_rate": stats["served_by"].get("default", 0) / calls,
            "served_by": stats["served_by"],
            "reasons": stats["reasons"],
            "hedge": stats.get("hedge"),
        }
        model.close(timeout_s=5.0)

        # naive: primary on a thread pool, student on timeout
        stalled = _stalling(primary, stall_ms, pattern)
        bare_stalled = _bare(stalled)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        timeouts = 0

        def naive(x: Tensor) -> Tensor:
            nonlocal timeouts

            def primary_call() -> Tensor:
                with torch.inference_mode():
                    return bare_stalled(x).argmax(dim=1)

            future = pool.submit(primary_call)
            try:
                return future.result(timeout=budget / 1e3)
            except concurrent.futures.TimeoutError:
                timeouts += 1
                return student(x).argmax(dim=1)

        lat, acc, behind_naive = serve(naive)
        pool.shutdown(wait=True)
        results["naive_timeout"] = {
            **_latency_summary(lat, budget, tolerance),
            "accuracy": acc,
            "behind_schedule_ms": behind_naive,
            "timeouts": timeouts,
        }

        # no wrapper: the stalled primary, called directly
        stalled = _stalling(primary, stall_ms, pattern)
        bare_stalled = _bare(stalled)
        lat, acc, behind_bare = serve(lambda x: bare_stalled(x).argmax(dim=1))
        results["no_wrapper"] = {**_latency_summary(lat, budget, tolerance), "accuracy": acc, "behind_schedule_ms": behind_bare}
    return results


def _stage_flops(primary: MultiExitNet, x1: Tensor) -> tuple[list[int], dict[int, int]]:
    """FLOPs of each stage (the input transform in stage 0) and of each head, for one sample."""
    stage_f, head_f = [], {}
    h = x1
    for i, stage in enumerate(primary.stages):
        inp = primary.input_transform(h) if i == 0 else h
        stage_f.append(_flops(lambda: stage(inp)))
        h = stage(inp)
        if i in primary.exit_stages:
            head_f[i] = _flops(lambda: primary.head(i)(h))
    return stage_f, head_f


def _exit_cost(k: int, primary: MultiExitNet, live: list[bool], stage_f: list[int], head_f: dict[int, int], oracle: bool) -> int:
    """FLOPs for one sample that leaves at exit ``k`` (``oracle``: only that exit's head is computed)."""
    s = primary.exit_stages[k]
    cost = sum(stage_f[: s + 1])
    if oracle:
        return cost + head_f[s]
    return cost + sum(head_f[e] for j, e in enumerate(primary.exit_stages) if e <= s and (live[j] or j == k))


def _early_exit_model(primary: MultiExitNet, student: nn.Module, exit_gates: list[ConfidenceGate]) -> FallbackModel:
    from fallbackformer.data.digits import INPUT_SPEC

    gates = list(exit_gates) + [_accept_all(), _accept_all()]  # the final answer always served
    policy = Policy(budget_ms=1e9, hedge="off", admission=False)
    return FallbackModel(primary, student, gates, policy, input_spec=INPUT_SPEC).eval()


def _early_exit_figures(model: FallbackModel, x: Tensor, y: Tensor, stage_f: list[int], head_f: dict[int, int], full_f: int) -> dict[str, Any]:
    primary = model.primary
    names = primary.exit_names
    with torch.inference_mode():
        outs = [model(xb) for xb in x.split(256)]
        final = primary(x)[-1].argmax(dim=1)
    served = [s for o in outs for s in o.served_by]
    pred = torch.cat([o.prediction for o in outs])
    live = [not math.isinf(float(model.gates[n].threshold)) for n in names[:-1]] + [True]
    cost = [_exit_cost(names.index(s), primary, live, stage_f, head_f, oracle=False) for s in served]
    acc_sys = float((pred == y).float().mean())
    acc_primary = float((final == y).float().mean())
    return {
        "accuracy_primary": acc_primary,
        "accuracy_exits": acc_sys,
        "accuracy_drop_pt": 100.0 * (acc_primary - acc_sys),
        "compute_saved": 1.0 - sum(cost) / (full_f * len(served)),
        "served_by": {k: v / len(served) for k, v in sorted(Counter(served).items())},
    }


def bench_early_exit(ctx: BenchmarkContext) -> dict[str, Any]:
    """Per-sample exits with compaction against the full primary, with the oracle exit as the limit."""
    cfg = ctx.section("early_exit")
    rounds, inner = int(_get(cfg, "rounds", 9)), int(_get(cfg, "inner", 20))
    system = ctx.system
    primary, student, gates = system["primary"], system["student"], system["gates"]
    x, y = system["splits"]["test"]
    exit_gates = list(gates[: primary.num_exits - 1])
    model = _early_exit_model(primary, student, exit_gates)
    bare = _bare(primary)
    with torch.inference_mode():
        stage_f, head_f = _stage_flops(primary, x[:1])
        full_f = sum(stage_f) + head_f[primary.exit_stages[-1]]  # per sample
        out = _early_exit_figures(model, x, y, stage_f, head_f, full_f)
        # the FLOPs of the real calls (compaction included) against the bare primary on the same data
        measured = _flops(lambda: [model(xb) for xb in x.split(256)])
        bare_measured = _flops(lambda: [bare(xb) for xb in x.split(256)])
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
        xs1 = [x[i : i + 1] for i in range(min(len(x), int(_get(cfg, "b1_samples", 64))))]
        t1 = _interleaved(
            {"primary": lambda: [bare(s) for s in xs1], "exits": lambda: [model(s) for s in xs1]},
            rounds,
            1,
        )
        x256 = x[:256] if len(x) >= 256 else x.repeat(-(-256 // len(x)), 1, 1, 1)[:256]
        t256 = _interleaved({"primary": lambda: bare(x256), "exits": lambda: model(x256)}, rounds, max(3, inner // 4))
    out["wall_b1_primary_ms"] = statistics.median(t1["primary"]) / len(xs1)
    out["wall_b1_exits_ms"] = statistics.median(t1["exits"]) / len(xs1)
    out["wall_speedup_b1"] = _median_ratio(t1["primary"], t1["exits"])
    out["wall_b256_primary_ms"] = statistics.median(t256["primary"])
    out["wall_b256_exits_ms"] = statistics.median(t256["exits"])
    out["wall_speedup_b256"] = _median_ratio(t256["primary"], t256["exits"])
    out["goal"] = "compute_saved >= 0.5 at accuracy_drop_pt <= 0.5"
    out["goal_met"] = out["compute_saved"] >= 0.5 and out["accuracy_drop_pt"] <= 0.5
    # the trade-off along the exits' alpha (calibrated on the calibration split, read on test)
    sweep = []
    alphas = list(_get(cfg, "alpha_sweep", []))
    if alphas:
        from fallbackformer.training.calibration import calibrate_gates

        x_cal, y_cal = system["splits"]["calibration"]
        with torch.no_grad():  # (not inference mode: calibration fits a temperature with autograd)
            cal_logits = primary(x_cal)
            cal_student = student(x_cal)
        gate_cfg = dict(_get(ctx.cfg, "gate_sweep", {}) or {})
        for a in alphas:
            g_cfg = {**gate_cfg, "mode": "per_path", "alpha": {"exits": float(a), "primary": 0.5, "student": 0.5}}
            swept, _ = calibrate_gates(cal_logits, cal_student, y_cal, g_cfg)
            fig = _early_exit_figures(
                _early_exit_model(primary, student, swept[: primary.num_exits - 1]), x, y, stage_f, head_f, full_f
            )
            sweep.append({"alpha_exits": float(a), **{k: fig[k] for k in ("compute_saved", "accuracy_drop_pt")}})
    out["alpha_sweep"] = sweep
    return out


def bench_compile(ctx: BenchmarkContext) -> dict[str, Any]:
    """Eager against torch.compile per module, as ``compile="auto"`` decides at warm-up."""
    cfg = ctx.section("compile")
    b = int(_get(cfg, "batch_size", 1))
    rounds, inner = int(_get(cfg, "rounds", 7)), int(_get(cfg, "inner", 20))
    system = ctx.system
    primary, student, gates = system["primary"], system["student"], system["gates"]
    x = system["splits"]["test"][0][:b]
    from fallbackformer.data.digits import INPUT_SPEC

    def make(mode: str) -> FallbackModel:
        return FallbackModel(primary, student, list(gates), Policy(budget_ms=1e4, compile=mode), input_spec=INPUT_SPEC).eval()

    eager, auto = make("off"), make("auto")
    t0 = time.perf_counter()
    try:
        auto.warm_up(x, repeats=int(_get(cfg, "repeats", 20)), discard=3, batch_sizes=[b])
    except Exception as exc:  # torch.compile unavailable here: say so, do not fail the run
        return {"status": f"compile failed: {type(exc).__name__}: {exc}"[:300]}
    warm_s = time.perf_counter() - t0
    eager.warm_up(x, repeats=5, discard=1, batch_sizes=[b])
    with torch.inference_mode():
        times = _interleaved({"eager": lambda: eager(x), "auto": lambda: auto(x)}, rounds, inner)
    return {
        "batch_size": b,
        "per_module": auto.compile_report,
        "compiled_modules": sorted(k for k, v in auto.compile_report.items() if v.get("choice") == "compiled"),
        "warm_up_s": warm_s,
        "model_eager_ms": statistics.median(times["eager"]),
        "model_auto_ms": statistics.median(times["auto"]),
        "speedup_auto": _median_ratio(times["eager"], times["auto"]),
    }


def bench_onnxruntime(ctx: BenchmarkContext) -> dict[str, Any]:
    """onnxruntime against the PyTorch runtime (eager) at batch 1 and 64: ratios and decision parity.

    The trained system is saved as a bundle with its ONNX graphs (``ff.save(model, tmp, onnx=True)``),
    then timed by :func:`fallbackformer.export.onnxruntime_vs_torch` ``rounds`` times: the combined
    graphs (``variants``) in one session each and the bundle loaded with ``backend="onnxruntime"``
    (``ort_threads=threads``), torch at the same thread count. Figures are medians over the rounds,
    with the spread (min, max) of each ratio.
    """
    cfg = ctx.section("onnxruntime")
    repeats, rounds = int(_get(cfg, "repeats", 30)), int(_get(cfg, "rounds", 3))
    threads = int(_get(cfg, "threads", 1))
    variants = tuple(str(v) for v in _get(cfg, "variants", ["where", "cond"]))
    backend = bool(_get(cfg, "backend", True))
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:  # say so, do not fail the run
        return {"status": f"onnxruntime or onnxscript not installed ({exc.name}): pip install onnxruntime onnxscript"}
    import tempfile

    import fallbackformer as ff
    from fallbackformer.export.onnx_export import export_onnx, onnxruntime_vs_torch
    from fallbackformer.data.digits import INPUT_SPEC

    system = ctx.system
    model = FallbackModel(system["primary"], system["student"], list(system["gates"]), Policy(),
                          input_spec=INPUT_SPEC).eval()
    x_test = system["splits"]["test"][0]
    x_b1, x_b64 = x_test[:1], _tile(x_test, 64)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = ff.save(model, Path(tmp) / "bundle", onnx=True)  # model.onnx is the "where" graph
        paths = {v: (bundle / "model.onnx" if v == "where" else export_onnx(model, Path(tmp) / f"{v}.onnx", variant=v))
                 for v in variants}
        backend_model = ff.load(bundle, backend="onnxruntime", ort_threads=threads) if backend else None
        for _ in range(rounds):
            runs.append(onnxruntime_vs_torch(model, x_b1, x_b64, repeats=repeats, variants=variants,
                                             onnx_paths=paths, backend_model=backend_model, threads=threads))
    out: dict[str, Any] = {"threads": threads, "repeats": repeats, "rounds": rounds,
                           "torch_ms": {b: statistics.median(r["torch_ms"][b] for r in runs) for b in ("b1", "b64")}}
    for name in [f"onnx_{v}" for v in variants] + (["ort_backend"] if backend else []):
        rows = [r[name] for r in runs]
        out[name] = {
            "ms": {b: statistics.median(r["ms"][b] for r in rows) for b in ("b1", "b64")},
            "ratio": {b: statistics.median(r["ratio"][b] for r in rows) for b in ("b1", "b64")},
            "ratio_spread": {b: [min(r["ratio"][b] for r in rows), max(r["ratio"][b] for r in rows)] for b in ("b1", "b64")},
            "decisions_identical": all(r["decisions_identical"] for r in rows),
        }
    out["decisions_identical"] = all(out[k]["decisions_identical"] for k in out if isinstance(out[k], dict) and "ms" in out[k])
    return out


def _tile(x: Tensor, n: int) -> Tensor:
    """``x`` cut or repeated to ``n`` samples."""
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n]


def _external_section(name: str, ctx: BenchmarkContext) -> dict[str, Any]:
    fn = _REGISTERED.get(name)
    if fn is None:
        spec = SECTION_PROVIDERS.get(name)
        if spec is None:
            return {"status": f"no provider for section {name!r}"}
        module_name, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            return {"status": f"not available yet ({spec}: {type(exc).__name__})"}
    return dict(fn(ctx))


SECTIONS: dict[str, Callable[[BenchmarkContext], dict[str, Any]]] = {
    "overhead": bench_overhead,
    "deadline": bench_deadline,
    "early_exit": bench_early_exit,
    "compile": bench_compile,
    "onnxruntime": bench_onnxruntime,
}


# ------------------------------------------------------------------------------------- system


def _train_system(cfg: Any) -> dict[str, Any]:
    """Train the digits system with the run pipeline's functions (configured epochs), or load a bundle."""
    bundle = _get(cfg, "bundle", None)
    if bundle:
        import fallbackformer as ff

        model = ff.load(bundle)
        from fallbackformer.data.digits import load_digits_splits

        splits = load_digits_splits(seed=int(_get(cfg, "seed", 0)))
        gates = [model.gates[n] for n in model.path_names]
        return {"primary": model.primary, "student": model.student, "gates": gates, "splits": splits}
    from hydra.utils import instantiate

    from fallbackformer.training.calibration import calibrate_gates
    from fallbackformer.training.pipeline import distill_student, train_primary

    import lightning as L

    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    work = Path(cfg.out_dir) / "checkpoints"
    primary, _ = train_primary(cfg, datamodule, work)
    student, _ = distill_student(cfg, datamodule, primary, work)
    x_cal, y_cal = datamodule.splits["calibration"]
    primary.eval()
    student.eval()
    with torch.no_grad():  # (not inference mode: temperature fitting differentiates the logits' scale)
        exit_logits, student_logits = primary(x_cal), student(x_cal)
    gates, _ = calibrate_gates(exit_logits, student_logits, y_cal, cfg.gate)
    return {"primary": primary.eval(), "student": student.eval(), "gates": gates, "splits": datamodule.splits}


# ------------------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def _fmt_range(r: Any) -> str:
    return "" if not r else f"{r[0]:.3f}-{r[1]:.3f}"


def _table(rows: list[list[Any]], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def write_markdown(results: Mapping[str, Any], path: Path) -> None:
    """BENCHMARKS.md: the machine, then one section per benchmark."""
    m = results["machine"]
    lines = [
        "# fallbackformer benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable), "
        f"torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}, {m['platform']}"
        + (f", CUDA {m['cuda']}" if m.get("cuda") else ", no GPU")
        + f". Load average at start: {_fmt(m.get('load_average'))}.",
        "",
        "Shared, noisy cores: contenders are interleaved round by round; figures are medians of per-round "
        "medians and ratios are medians of per-round ratios. Regenerate with "
        "`python scripts/benchmark.py hydra.run.dir=DIR` (writes DIR/benchmark.json and DIR/BENCHMARKS.md).",
        "",
    ]
    if "overhead" in results:
        o = results["overhead"]
        lines += ["## Overhead (wrapper on the primary path vs the bare primary)", ""]
        if "ratio_b1" in o:
            lines += _table(
                [[b, o[f"bare_b{b}_ms"], o[f"wrapper_b{b}_ms"], o[f"ratio_b{b}"], _fmt_range(o.get(f"ratio_b{b}_iqr")),
                  o.get(f"overhead_us_b{b}", float("nan")), o.get(f"floor_us_b{b}", float("nan")),
                  o[f"hedged_b{b}_ms"], o[f"ratio_hedged_b{b}"]] for b in (1, 64)],
                ["batch", "bare ms", "wrapper ms", "ratio", "ratio IQR (rounds)", "overhead us", "floor us",
                 "hedged ms", "ratio hedged"],
            )
            lines += [
                "",
                f"Primary: {o['primary']}. Goal ratio_b1 <= 1.05: **{_fmt(o['goal_met'])}** (ratio_b1 = "
                f"{o['ratio_b1']:.3f}). The final gate alone (the calibrated confidence every answer reports) "
                f"takes the bare primary to {o['ratio_gate_only_b1']:.3f} at batch 1 and "
                f"{o['ratio_gate_only_b64']:.3f} at batch 64. The floor, the tensor work of any validated, "
                "gated answer and nothing else (the input range check, the final gate's decision, its sync), "
                f"takes it to {o.get('ratio_floor_b1', float('nan')):.3f} and "
                f"{o.get('ratio_floor_b64', float('nan')):.3f}; the rest is the runtime's Python: timing, "
                "admission, output assembly, the queued profile samples and tallies. 'overhead us' and "
                "'floor us' are the same in microseconds (medians of per-round differences). Small operations "
                "that follow the primary's convolutions run on cold caches: on this machine they cost 3-6 "
                "times what they cost in a loop of their own, which is why a few microseconds of work per call "
                "add up to several percent. 'hedged' is the hard deadline on (hedge=\"always\": a thread "
                "hand-off per call).",
                "",
            ]
        else:
            lines += [_fmt(o), ""]
    if "deadline" in results:
        d = results["deadline"]
        lines += ["## Deadline under injected stalls", ""]
        if "fallbackformer" in d:
            lines += [
                f"Budget {d['budget_ms']:g} ms; {d['calls']} calls of one sample; the primary stalls "
                f"{d['stall_ms']:g} ms with probability {d['stall_probability']:g}; a miss is an {d['miss']}. "
                f"Requests are scheduled every {d['interval_ms']:g} ms (one client; a call that overruns "
                f"delays the next: 'behind' is the worst delay). Both wrappers get {d['workers']} threads "
                "for the primary.",
                "",
            ]
            lines += _table(
                [[k, d[k]["p50_ms"], d[k]["p99_ms"], d[k]["p999_ms"], d[k]["max_ms"], d[k]["misses"], d[k]["accuracy"],
                  d[k]["behind_schedule_ms"]] for k in ("fallbackformer", "naive_timeout", "no_wrapper")],
                ["variant", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "misses", "accuracy", "behind ms"],
            )
            lines += ["", f"fallbackformer served_by: {_fmt(d['fallbackformer']['served_by'])}; reasons: "
                      f"{_fmt(d['fallbackformer']['reasons'])}; hedging: {_fmt(d['fallbackformer']['hedge'])}. "
                      f"naive_timeout: {d['naive_timeout']['timeouts']} timeouts. Accuracy counts an abstaining "
                      "safe default as wrong.", ""]
        else:
            lines += [_fmt(d), ""]
    if "early_exit" in results:
        e = results["early_exit"]
        lines += ["## Early exits (per-sample, with batch compaction) vs the full primary", ""]
        if "compute_saved" in e:
            lines += _table(
                [
                    ["accuracy (full primary / with exits)", f"{e['accuracy_primary']:.4f} / {e['accuracy_exits']:.4f}"],
                    ["accuracy_drop_pt", e["accuracy_drop_pt"]],
                    ["compute_saved (per-sample FLOPs)", e["compute_saved"]],
                    ["compute_saved (FLOPs measured on the calls)", e["compute_saved_measured"]],
                    ["oracle_compute_saved (the limit)", e["oracle_compute_saved"]],
                    ["wall ms per sample, batch 1 (primary / exits)", f"{e['wall_b1_primary_ms']:.3f} / {e['wall_b1_exits_ms']:.3f}"],
                    ["wall_speedup_b1", e["wall_speedup_b1"]],
                    ["wall ms, batch 256 (primary / exits)", f"{e['wall_b256_primary_ms']:.3f} / {e['wall_b256_exits_ms']:.3f}"],
                    ["wall_speedup_b256", e["wall_speedup_b256"]],
                    ["served_by", e["served_by"]],
                ],
                ["figure", "value"],
            )
            lines += ["", f"Goal {e['goal']}: **{_fmt(e['goal_met'])}**.", ""]
            if e.get("alpha_sweep"):
                lines += ["Trade-off along the exits' alpha (gates calibrated on the calibration split, read on test):", ""]
                lines += _table([[r["alpha_exits"], r["compute_saved"], r["accuracy_drop_pt"]] for r in e["alpha_sweep"]],
                                ["alpha exits", "compute_saved", "accuracy_drop_pt"])
                lines += [""]
        else:
            lines += [_fmt(e), ""]
    if "compile" in results:
        c = results["compile"]
        lines += ["## torch.compile (compile=\"auto\" at warm-up)", ""]
        if "per_module" in c:
            lines += _table(
                [[k, v.get("eager_ms"), v.get("compiled_ms"), v.get("choice"), v.get("error", "")] for k, v in c["per_module"].items()],
                ["module", "eager ms", "compiled ms", "choice", "error"],
            )
            lines += ["", f"Batch {c['batch_size']}: whole model eager {c['model_eager_ms']:.3f} ms, auto "
                      f"{c['model_auto_ms']:.3f} ms (speedup {c['speedup_auto']:.3f}); warm-up {c['warm_up_s']:.1f} s.", ""]
        else:
            lines += [_fmt(c), ""]
    if "onnxruntime" in results:
        r = results["onnxruntime"]
        lines += ["## onnxruntime (against the PyTorch runtime, eager)", ""]
        if "torch_ms" in r:
            t = r["torch_ms"]
            rows = [["torch eager (runtime)", t["b1"], t["b64"], 1.0, 1.0, "(reference)"]]
            for name, label in [("onnx_where", "combined graph, where"), ("onnx_cond", "combined graph, cond"),
                                ("ort_backend", "bundle, backend=\"onnxruntime\"")]:
                if name in r:
                    row = r[name]
                    spread = row["ratio_spread"]
                    rows.append([label, row["ms"]["b1"], row["ms"]["b64"],
                                 f"{row['ratio']['b1']:.3g} ({spread['b1'][0]:.3g}-{spread['b1'][1]:.3g})",
                                 f"{row['ratio']['b64']:.3g} ({spread['b64'][0]:.3g}-{spread['b64'][1]:.3g})",
                                 row["decisions_identical"]])
            lines += _table(rows, ["engine", "b1 ms", "b64 ms", "ratio b1 (spread)", "ratio b64 (spread)",
                                   "decisions identical"])
            lines += ["", f"{r['threads']} thread(s) on both sides; median of {r['repeats']} calls after 3 warm-up "
                      f"calls, medians over {r['rounds']} rounds (spread: min-max of the rounds). Ratio = onnxruntime "
                      "time / torch time (below 1: onnxruntime is faster). The deadline is lifted on both sides so "
                      "every call does the full work; decisions (prediction and served_by, batch 1 and 64) "
                      f"identical everywhere: **{_fmt(r['decisions_identical'])}**.", ""]
        else:
            lines += [_fmt(r), ""]
    for name, value in results.items():
        if name in ("machine", "config", "overhead", "deadline", "early_exit", "compile", "onnxruntime"):
            continue
        lines += [f"## {name}", ""]
        lines += _table([[k, v] for k, v in value.items()], ["figure", "value"]) if isinstance(value, dict) else [_fmt(value)]
        lines += [""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------- entry


def run_benchmark(cfg: Any, system: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the configured sections; write ``benchmark.json`` and ``BENCHMARKS.md`` into ``cfg.out_dir``.

    Args:
        cfg: the composed ``configs/benchmark.yaml`` (or any mapping with the same keys).
        system: an already trained ``{"primary", "student", "gates", "splits"}`` (tests); by default it
            is trained (or loaded from ``cfg.bundle``) when a section first needs it.

    Returns:
        ``(results, objects)``: the JSON-able results and ``{"out_dir", "system"}``.
    """
    out_dir = Path(_get(cfg, "out_dir", "outputs/benchmark"))
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = _get(cfg, "num_threads", None)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        machine = describe_machine()
        ctx = BenchmarkContext(cfg=_get(cfg, "benchmark", {}), machine=machine, out_dir=out_dir,
                               system_factory=lambda: _train_system(cfg))
        if system is not None:
            ctx._system = system
        results: dict[str, Any] = {"machine": machine}
        for name in list(_get(ctx.cfg, "sections", list(SECTIONS))):
            t0 = time.perf_counter()
            log.info("benchmark section %s", name)
            results[name] = SECTIONS[name](ctx) if name in SECTIONS else _external_section(name, ctx)
            log.info("section %s done in %.1f s", name, time.perf_counter() - t0)
        machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    finally:
        torch.set_num_threads(old_threads)
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=2, default=_json_default))
    write_markdown(results, out_dir / "BENCHMARKS.md")
    return results, {"out_dir": out_dir, "system": ctx._system}


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Tensor):
        return obj.tolist()
    return str(obj)
