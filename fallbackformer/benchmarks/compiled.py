"""torch.compile: eager against ``compile="auto"`` per module, as the runtime decides at warm-up."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from fallbackformer.benchmarks.common import get, interleaved, median_ratio
from fallbackformer.benchmarks.context import BenchmarkContext
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.policy import Policy

__all__ = ["bench_compile"]


def bench_compile(ctx: BenchmarkContext) -> dict[str, Any]:
    """Eager against torch.compile per module, as ``compile="auto"`` decides at warm-up."""
    cfg = ctx.section("compile")
    b = int(get(cfg, "batch_size", 1))
    rounds, inner = int(get(cfg, "rounds", 7)), int(get(cfg, "inner", 20))
    system = ctx.system
    primary, student, gates = system["primary"], system["student"], system["gates"]
    x = system["splits"]["test"][0][:b]
    spec = ctx.input_spec

    def make(mode: str) -> FallbackModel:
        return FallbackModel(primary, student, list(gates), Policy(budget_ms=1e4, compile=mode), input_spec=spec).eval()

    eager, auto = make("off"), make("auto")
    t0 = time.perf_counter()
    try:
        auto.warm_up(x, repeats=int(get(cfg, "repeats", 20)), discard=3, batch_sizes=[b])
    except Exception as exc:  # torch.compile unavailable here: say so, do not fail the run
        return {"status": f"compile failed: {type(exc).__name__}: {exc}"[:300]}
    warm_s = time.perf_counter() - t0
    eager.warm_up(x, repeats=5, discard=1, batch_sizes=[b])
    with torch.inference_mode():
        times = interleaved({"eager": lambda: eager(x), "auto": lambda: auto(x)}, rounds, inner)
    return {
        "batch_size": b,
        "per_module": auto.compile_report,
        "compiled_modules": sorted(k for k, v in auto.compile_report.items() if v.get("choice") == "compiled"),
        "warm_up_s": warm_s,
        "model_eager_ms": statistics.median(times["eager"]),
        "model_auto_ms": statistics.median(times["auto"]),
        "speedup_auto": median_ratio(times["eager"], times["auto"]),
    }
