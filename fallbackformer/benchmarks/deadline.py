"""Deadline: latency under injected stalls, fallbackformer against a naive timeout wrapper and no wrapper.

A primary that stalls ``stall_ms`` on some calls serves open-loop requests of one sample: the
fallbackformer model (hedged), a ``concurrent.futures`` timeout wrapper (``naive_timeout``) and the
bare primary (``no_wrapper``): p50/p99/p99.9/max latency and misses (answers after budget + tolerance).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fallbackformer.benchmarks.common import bare, get, latency_summary
from fallbackformer.benchmarks.context import BenchmarkContext
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime.clock import MonotonicClock, ScriptedDelay
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.policy import Policy

__all__ = ["bench_deadline"]


def _stalling(primary: MultiExitNet, stall_ms: float, pattern: list[bool]) -> MultiExitNet:
    """The same primary whose first stage stalls ``stall_ms`` on the calls ``pattern`` marks."""
    script = [stall_ms if s else 0.0 for s in pattern] + [0.0]
    stages = [ScriptedDelay(primary.stages[0], MonotonicClock(), script)] + list(primary.stages[1:])
    heads = {s: primary.head(s) for s in primary.exit_stages}
    return MultiExitNet(stages, heads, input_transform=primary.input_transform).eval()


def bench_deadline(ctx: BenchmarkContext) -> dict[str, Any]:
    """Latency under injected stalls: fallbackformer vs a naive timeout wrapper vs the bare primary."""
    cfg = ctx.section("deadline")
    budget = float(get(cfg, "budget_ms", 20.0))
    calls = int(get(cfg, "calls", 500))
    p_stall = float(get(cfg, "stall_probability", 0.1))
    stall_ms = float(get(cfg, "stall_ms", 10 * budget))
    tolerance = float(get(cfg, "miss_tolerance_ms", 5.0))
    margin = float(get(cfg, "margin_ms", 1.0))
    workers = int(get(cfg, "workers", 2))  # threads for the primary, the same for both wrappers
    interval = float(get(cfg, "interval_ms", 5.0))  # open-loop arrivals
    system = ctx.system
    primary, student, gates = system["primary"], system["student"], system["gates"]
    x_test, y_test = system["splits"]["test"]
    gen = torch.Generator().manual_seed(int(get(cfg, "seed", 0)))
    pattern = (torch.rand(calls, generator=gen) < p_stall).tolist()
    idx = torch.randint(0, len(x_test), (calls,), generator=gen).tolist()
    results: dict[str, Any] = {
        "budget_ms": budget, "calls": calls, "stall_probability": p_stall, "stall_ms": stall_ms,
        "miss_tolerance_ms": tolerance, "miss": f"answer after budget + {tolerance:g} ms", "workers": workers, "interval_ms": interval,
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
            stalled, student, list(gates),
            Policy(budget_ms=budget, margin_ms=margin, hedge="always", hedge_workers=workers),
            input_spec=ctx.input_spec,
        ).eval()
        model.warm_up(x_test[:8], repeats=20, discard=4, batch_sizes=[1])
        stalled.stages[0].calls = 64  # the warm-up consumed its healthy prefix; stalls start now
        lat, acc, behind = serve(lambda x: model(x).prediction)
        stats = model.stats()
        results["fallbackformer"] = {
            **latency_summary(lat, budget, tolerance),
            "accuracy": acc,
            "behind_schedule_ms": behind,
            "default_rate": stats["served_by"].get("default", 0) / calls,
            "served_by": stats["served_by"],
            "reasons": stats["reasons"],
            "hedge": stats.get("hedge"),
        }
        model.close(timeout_s=5.0)

        # naive: primary on a thread pool, student on timeout
        bare_stalled = bare(_stalling(primary, stall_ms, pattern))
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
        results["naive_timeout"] = {**latency_summary(lat, budget, tolerance), "accuracy": acc,
                                    "behind_schedule_ms": behind_naive, "timeouts": timeouts}

        # no wrapper: the stalled primary, called directly
        bare_stalled = bare(_stalling(primary, stall_ms, pattern))
        lat, acc, behind_bare = serve(lambda x: bare_stalled(x).argmax(dim=1))
        results["no_wrapper"] = {**latency_summary(lat, budget, tolerance), "accuracy": acc,
                                 "behind_schedule_ms": behind_bare}
    return results
