"""Shared helpers of the benchmark sections: config access, the machine, interleaved timing, FLOPs."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime.clock import median_ms
from fallbackformer.runtime.latency import nearest_rank
from fallbackformer.runtime.validation import InputSpec

__all__ = [
    "accept_all",
    "bare",
    "describe_machine",
    "flops",
    "get",
    "interleaved",
    "latency_summary",
    "median_ratio",
    "never",
    "random_input",
    "ratio_quartiles",
    "tile",
]


def get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for a mapping, DictConfig or object; ``default`` when absent or ``None``."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or ``None`` off Unix."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


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
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "load_average": load_average(),
    }


def latency_summary(ms: list[float], budget_ms: float, tolerance_ms: float) -> dict[str, Any]:
    """p50, p99, p99.9, max and the misses (latency above ``budget_ms + tolerance_ms``) of ``ms``."""
    s = sorted(ms)
    return {
        "calls": len(s),
        "p50_ms": nearest_rank(s, 0.5),
        "p99_ms": nearest_rank(s, 0.99),
        "p999_ms": nearest_rank(s, 0.999),
        "max_ms": s[-1],
        "misses": sum(v > budget_ms + tolerance_ms for v in s),
    }


def interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, inner: int) -> dict[str, list[float]]:
    """Per round and contender, the median ms of ``inner`` calls; the order alternates each round."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(median_ms(fns[name], inner))
    return out


def median_ratio(num: list[float], den: list[float]) -> float:
    """The median of the per-round ratios ``num / den``."""
    return statistics.median(a / b for a, b in zip(num, den))


def median_added_us(num: list[float], den: list[float]) -> float:
    """The median of the per-round differences ``num - den``, in microseconds."""
    return 1e3 * statistics.median(a - b for a, b in zip(num, den))


def ratio_quartiles(num: list[float], den: list[float]) -> list[float]:
    """The 25th and 75th percentiles of the per-round ratios: the spread a reader should expect."""
    ratios = sorted(a / b for a, b in zip(num, den))
    return [nearest_rank(ratios, 0.25), nearest_rank(ratios, 0.75)]


def bare(primary: MultiExitNet) -> Callable[[Tensor], Tensor]:
    """The primary as one would serve it without fallbackformer: its stages and final head."""
    last = primary.exit_stages[-1]

    def run(x: Tensor) -> Tensor:
        h = primary.input_transform(x)
        for stage in primary.stages:
            h = stage(h)
        return primary.head(last)(h)

    return run


def flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (``torch.utils.flop_counter``)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def accept_all() -> ConfidenceGate:
    """A gate that accepts every finite answer."""
    return ConfidenceGate(temperature=1.0, threshold=-math.inf)


def never() -> ConfidenceGate:
    """A gate that accepts nothing (an early exit with it is skipped: its head is not computed)."""
    return ConfidenceGate(temperature=1.0, threshold=math.inf)


def tile(x: Tensor, n: int) -> Tensor:
    """``x`` cut or repeated to ``n`` samples."""
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n]


def random_input(spec: InputSpec, batch: int, seed: int = 0) -> Tensor:
    """``batch`` random inputs of ``spec``'s shape, uniform over its value range (``[0, 1]`` without one)."""
    lo, hi = spec.value_range if spec.value_range is not None else (0.0, 1.0)
    gen = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(batch, *spec.shape, generator=gen, dtype=getattr(torch, spec.dtype))
