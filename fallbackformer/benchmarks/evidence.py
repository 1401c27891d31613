"""Evidence cost (issue 10): the routed model against the gated model, side by side, batch 1 and 64.

The gated model decides at each exit from that exit's calibrated confidence; the routed model runs
the student first, then at each exit computes the head, the feature-space score (Mahalanobis) and the
router's scorer. Both run on the primary's path: the early exits are live (every head computed) but
unable to answer (a gate threshold and a router exit floor above any probability), and the inputs are
test samples both models serve from the primary's final head. The same comparison between the plain
PyTorch peers (:mod:`fallbackformer.benchmarks.peers`) says what the evidence costs without the runtime.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch

from fallbackformer.benchmarks.common import get, interleaved, median_added_us, median_ratio, ratio_quartiles, tile
from fallbackformer.benchmarks.context import BenchmarkContext
from fallbackformer.benchmarks.peers import GatedPeer, RoutedPeer
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.policy import Policy

__all__ = ["bench_evidence"]

#: above any probability: a live exit that can never answer
_UNREACHABLE = 2.0


def bench_evidence(ctx: BenchmarkContext) -> dict[str, Any]:
    """Gated against routed on the primary's path: ratios and microseconds added, batch 1 and 64."""
    cfg = ctx.section("evidence")
    rounds, inner = int(get(cfg, "rounds", 15)), int(get(cfg, "inner", 40))
    budget_ms = float(get(cfg, "budget_ms", 1e4))
    system, router = ctx.system, copy.deepcopy(ctx.router)
    primary, student, spec = system["primary"], system["student"], ctx.input_spec
    router.exit_floor = _UNREACHABLE  # (an attribute of this copy only: every exit is computed, none answers)
    gates = [copy.deepcopy(g) for g in system["gates"]]
    for g in gates[: primary.num_exits - 1]:
        g.threshold.fill_(_UNREACHABLE)
    gated = FallbackModel(primary, student, gates, Policy(budget_ms=budget_ms), input_spec=spec).eval()
    routed = FallbackModel(primary, student, gates, Policy(budget_ms=budget_ms), input_spec=spec, router=router).eval()
    gated_peer, routed_peer = GatedPeer(primary, student, gates, spec), RoutedPeer(primary, student, router, spec)
    x_test = system["splits"]["test"][0]
    pool = _on_primary_path(gated, routed, x_test)
    lowered = pool.shape[0] == 0  # an uncertified router (threshold +inf) accepts nothing: time its path anyway
    if lowered:
        router.threshold.fill_(0.0)
        pool = _on_primary_path(gated, routed, x_test)
    if pool.shape[0] == 0:
        return {"status": "no test sample is served by the primary under both the gates and the router"}
    for model in (gated, routed):
        model.warm_up(tile(pool, 64), repeats=10, discard=2)
    out: dict[str, Any] = {"rounds": rounds, "inner": inner, "samples_on_primary_path": int(pool.shape[0]),
                           "heads": primary.num_exits, "router_threshold_lowered": lowered}
    with torch.inference_mode():
        for b in (1, 64):
            x = tile(pool, b)
            assert routed(x).served_by == ["primary"] * b and gated(x).served_by == ["primary"] * b
            assert torch.equal(routed_peer(x), routed(x).prediction) and torch.equal(gated_peer(x), gated(x).prediction)
            times = interleaved({"gated": lambda: gated(x), "routed": lambda: routed(x),
                                 "gated_peer": lambda: gated_peer(x), "routed_peer": lambda: routed_peer(x)},
                                rounds, inner if b == 1 else max(5, inner // 8))
            for name, t in times.items():
                out[f"{name}_b{b}_ms"] = statistics.median(t)
            out[f"ratio_b{b}"] = median_ratio(times["routed"], times["gated"])
            out[f"ratio_b{b}_iqr"] = ratio_quartiles(times["routed"], times["gated"])
            out[f"added_us_b{b}"] = median_added_us(times["routed"], times["gated"])
            out[f"peer_ratio_b{b}"] = median_ratio(times["routed_peer"], times["gated_peer"])
            out[f"peer_added_us_b{b}"] = median_added_us(times["routed_peer"], times["gated_peer"])
            out[f"ratio_vs_routed_peer_b{b}"] = median_ratio(times["routed"], times["routed_peer"])
    gated.close(timeout_s=5.0)
    routed.close(timeout_s=5.0)
    return out


def _on_primary_path(gated: FallbackModel, routed: FallbackModel, x: torch.Tensor) -> torch.Tensor:
    """The samples of ``x`` that both models serve from the primary's final head."""
    with torch.inference_mode():
        both = [a == "primary" == b for a, b in zip(gated(x).served_by, routed(x).served_by)]
    return x[torch.tensor(both, dtype=torch.bool)]
