"""Each rung's latency (issue 15): the ladder's paths side by side, b1 and b64, against the primary alone.

Contenders, each alone on the same clean test samples: the primary alone (its stages and final head,
:func:`~fallbackformer.benchmarks.common.bare`: the named peer every ratio is taken against), the
student, each further model rung of the ladder (a forest, a linear model, ...) and a lookup in the
response cache. The model rungs are the system's own when it has a ladder (a bundle saved with one),
else the rungs of the config's ``ladder`` node (``configs/ladder/default.yaml``) are fitted here on the
primary exactly as the ladder step fits them (:func:`~fallbackformer.training.ladder_step.fit_rung`). The cache is a
:class:`~fallbackformer.rungs.ResponseCache` holding the primary's answers on those samples, so every
lookup hits (hashing each row's bytes and one dictionary probe per row: a miss costs the same).
Figures are a rung's cost alone; in the ladder a rung runs only for the samples that reach it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fallbackformer.benchmarks.common import bare, get, interleaved, median_ratio, ratio_quartiles, tile
from fallbackformer.benchmarks.context import BenchmarkContext
from fallbackformer.rungs import ResponseCache
from fallbackformer.runtime import reasons as R

__all__ = ["PEER", "bench_rungs", "fitted_rungs"]

#: the contender every ratio is taken against
PEER = "primary"
CACHE_LOOKUP = "cache_lookup"


def fitted_rungs(specs: Any, primary: nn.Module, student: nn.Module, x_train: Tensor) -> dict[str, nn.Module]:
    """The rungs ``specs`` (``[{name, kind, fit}]``, a ladder config's ``rungs``) fitted on the primary's
    answers on ``x_train``, read through the student's feature transform."""
    from fallbackformer.models.classical import transform_spec_of
    from fallbackformer.training.ladder_step import RungSpec, fit_rung

    transform = transform_spec_of(getattr(student, "input_transform", None))
    specs = [RungSpec(str(get(s, "name")), str(get(s, "kind")), dict(get(s, "fit", {}) or {})) for s in specs]
    return {spec.name: fit_rung(spec, primary, x_train, transform).eval() for spec in specs}


def _cache_of(primary: nn.Module, x: Tensor) -> ResponseCache:
    """A cache holding the primary's answers (prediction, softmax confidence, logits) for every row of ``x``."""
    cache = ResponseCache(max_entries=max(1, x.shape[0]), ttl_ms=math.inf, min_confidence=0.0)
    logits = bare(primary)(x).float()  # [N, C]
    conf, pred = torch.softmax(logits, dim=1).max(dim=1)
    stored = cache.store(x, pred, conf, [R.PRIMARY] * x.shape[0], logits)
    assert stored == x.shape[0], f"the cache kept {stored} of {x.shape[0]} answers"
    return cache


def bench_rungs(ctx: BenchmarkContext) -> dict[str, Any]:
    """Per rung: median ms at b1 and b64 and the ratio to the primary alone (see the module docstring)."""
    cfg = ctx.section("rungs")
    rounds, inner = int(get(cfg, "rounds", 15)), int(get(cfg, "inner", 40))
    system = ctx.system
    primary, student = system["primary"].eval(), system["student"].eval()
    own = {r.name: r.module.eval() for r in system.get("fallbacks") or []}
    specs = get(get(ctx.root, "ladder", {}), "rungs", [])
    rungs = own or fitted_rungs(specs, primary, student, system["splits"]["train"][0])
    pool = system["splits"]["test"][0][:64]
    out: dict[str, Any] = {"peer": PEER, "rounds": rounds, "inner": inner, "rungs": list(rungs),
                           "rungs_from": "the system's ladder" if own else "fitted by the benchmark"}
    rows: dict[str, dict[str, Any]] = {}
    run_primary = bare(primary)
    with torch.inference_mode():
        cache = _cache_of(primary, pool)
        for b in (1, 64):
            x = tile(pool, b)
            fns: dict[str, Callable[[], Any]] = {PEER: lambda: run_primary(x), R.STUDENT: lambda: student(x)}
            fns.update({name: (lambda m=m: m(x)) for name, m in rungs.items()})
            fns[CACHE_LOOKUP] = lambda: cache.lookup(x)
            assert bool(cache.lookup(x).hit.all()), "every lookup of the benchmark hits"
            times = interleaved(fns, rounds, inner if b == 1 else max(5, inner // 8))
            for name, t in times.items():
                row = rows.setdefault(name, {"path": name})
                row[f"b{b}_ms"] = statistics.median(t)
                row[f"ratio_b{b}"] = median_ratio(t, times[PEER])
                row[f"ratio_b{b}_iqr"] = ratio_quartiles(t, times[PEER])
    out["table"] = [{"path": r["path"], "b1 ms": r["b1_ms"], "b64 ms": r["b64_ms"], f"b1 / {PEER}": r["ratio_b1"],
                     f"b64 / {PEER}": r["ratio_b64"]} for r in rows.values()]
    out["per_path"] = rows
    return out
