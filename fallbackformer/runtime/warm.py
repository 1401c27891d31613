"""Warm start: the first call of a freshly loaded model keeps the budget."""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING, Any

import torch

from fallbackformer.runtime.units import timed_pass
from fallbackformer.runtime.validation import InputSpec

if TYPE_CHECKING:
    from fallbackformer.runtime.runtime import Runtime

__all__ = ["freeze_heap", "spec_example", "warm_start"]


def warm_start(rt: Runtime, max_s: float = 0.25) -> dict[str, Any]:
    """Make the first call keep the budget: start the workers and run the model on a spec example.

    Starts the primary's and the student's hedging workers (``hedge="always"``) and, with an input
    spec and ``compile="off"`` (never compiles), runs every segment on a batch of one made from
    the spec (its range's midpoint) until ``max_s`` real seconds are spent (lazy initialisation,
    allocator and caches); one pass also runs on each worker. The profile and the counters are
    untouched (a bundle's priors stay priors: ``warm_up(x)`` measures). ``ff.load`` calls it.

    Args:
        max_s: real seconds it may take (a pass under way finishes first).

    Returns:
        ``{"passes": n, "seconds": s, "workers": started, "skipped": why or ""}``.
    """
    t_end = time.monotonic() + max_s
    policy = rt.policy
    spec = rt.input_spec
    skipped = "" if spec is not None else "no input_spec"
    if not skipped and policy.compile != "off":
        skipped = f"compile={policy.compile!r} (warm_start never compiles: call warm_up(x))"
    x = None if skipped else spec_example(spec)
    passes, started = 0, 0
    with torch.inference_mode():
        if policy.hedge == "always":
            device = x.device if x is not None else torch.device("cpu")
            work = (lambda: None) if x is None else (lambda: timed_pass(rt.steps, x, rt.clock, None))
            for role in ("primary", "student"):
                ticket = rt.hedger(policy, device, role).submit(work)
                if ticket is not None:  # (real time: the worker's first pass, bounded)
                    started += ticket.done.wait(max(0.0, t_end - time.monotonic()))
        while x is not None and (passes == 0 or time.monotonic() < t_end):
            timed_pass(rt.steps, x, rt.clock, None)
            passes += 1
    spent = max_s - (t_end - time.monotonic())
    return {"passes": passes, "seconds": spent, "workers": started, "skipped": skipped}


def spec_example(spec: InputSpec) -> torch.Tensor:
    """One valid raw sample ``[1, *shape]`` of the spec: its value range's midpoint (zeros without one)."""
    value = 0.0 if spec.value_range is None else 0.5 * (spec.value_range[0] + spec.value_range[1])
    return torch.full((1, *spec.shape), value, dtype=getattr(torch, spec.dtype))


def freeze_heap() -> dict[str, Any]:
    """Collect once, then move every object alive now out of the cyclic collector's reach (``gc.freeze``).

    A full collection walks every container object of the process, and no thread runs meanwhile:
    with torch imported that is about 200,000 objects, 100 to 500 ms on the 2-core dev machine, so
    no budget survives one, and the objects that calls in flight leave behind trigger one every few
    thousand calls. Frozen, the start-up heap (modules, the model, its workers) is never walked
    again; the collector only sees what is allocated later. Call it once in a long-lived serving
    process, after loading and warming up (``scripts/serve.py`` does, ``serve.freeze_gc``). Frozen
    objects are never freed by the cyclic collector (reference counting still frees the rest);
    ``gc.unfreeze()`` undoes it. Not called by ``ff.load``: the collection itself takes that long.

    Returns:
        ``{"frozen": objects now frozen, "seconds": time the collection took}``.
    """
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    return {"frozen": gc.get_freeze_count(), "seconds": time.perf_counter() - t0}
