"""How the decision module's pieces run: eager or compiled, and timed for the latency profile.

A *unit* is one piece the runtime calls on its own (``transform``, ``stage_<i>``, ``head_<i>``,
``student``; :meth:`~fallbackformer.runtime.decisions.Decisions.pieces`). ``Policy.compile="on"``
runs each through ``torch.compile``; ``"auto"`` lets ``warm_up`` time each eager and compiled on its
real input and keep the faster (:func:`choose_compiled`, the decision in ``compile_report``).
:func:`timed_pass` runs every segment once as served (no exit taken) and records its time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import NS_PER_MS, Clock, median_ms
from fallbackformer.runtime.decisions import TRANSFORM_UNIT, Decisions
from fallbackformer.runtime.latency import LatencyProfile
from fallbackformer.runtime.steps import DecisionSteps

__all__ = ["CompileFn", "batch_of", "choose_compiled", "compiled_units", "timed_pass", "torch_compile"]

CompileFn = Callable[[nn.Module], Callable[..., Any]]


def torch_compile(module: nn.Module) -> Callable[..., Any]:
    """``torch.compile`` with dynamic batch sizes (compaction changes them every call)."""
    return torch.compile(module, dynamic=True)


def compiled_units(decisions: Decisions, compile_fn: CompileFn) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Every unit compiled (``compile="on"``): ``(units, compile_report)``."""
    units: dict[str, Any] = {}
    report: dict[str, dict[str, Any]] = {}
    for name, module in decisions.pieces().items():
        units[name] = compile_fn(module)
        report[name] = {"choice": "compiled"}
    return units, report


def choose_compiled(decisions: Decisions, compile_fn: CompileFn, x: torch.Tensor, repeats: int,
                    discard: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``compile="auto"``: time each unit eager and compiled on its real input; keep the faster.

    Returns:
        ``(units, compile_report)``; a module that ``torch.compile`` cannot handle stays eager.
    """
    inputs = _unit_inputs(decisions, x)
    units: dict[str, Any] = {}
    report: dict[str, dict[str, Any]] = {}
    for name, module in decisions.pieces().items():
        inp = inputs[name]
        eager_ms = median_ms(lambda: module(inp), repeats, discard)
        units[name] = module
        try:
            compiled = compile_fn(module)
            compiled_ms = median_ms(lambda: compiled(inp), repeats, discard)
        except Exception as exc:  # a module torch.compile cannot handle stays eager
            report[name] = {"eager_ms": eager_ms, "error": f"{type(exc).__name__}: {exc}"[:200], "choice": "eager"}
            continue
        choice = "compiled" if compiled_ms < eager_ms else "eager"
        units[name] = compiled if choice == "compiled" else module
        report[name] = {"eager_ms": eager_ms, "compiled_ms": compiled_ms, "choice": choice}
    return units, report


def _unit_inputs(decisions: Decisions, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each unit's real input on the raw batch ``x``."""
    primary = decisions.primary
    inputs = {TRANSFORM_UNIT: x, **{name: x for name in decisions.fallback_names}}
    h = primary.input_transform(x)
    for i, stage in enumerate(primary.stages):
        inputs[decisions.stage_names[i]] = h
        h = stage(h)
        if i in decisions.exit_at:
            inputs[f"head_{i}"] = h
    return inputs


def timed_pass(steps: DecisionSteps, x: torch.Tensor, clock: Clock, profile: LatencyProfile | None) -> None:
    """One pass of every segment as served (no exits taken), timed on ``clock``; recorded in ``profile``
    unless it is ``None``. A stage's time includes its live head and gate (and the transform, stage 0)."""
    n = x.shape[0]
    live = steps.live_exits()
    h = x
    for i, name in enumerate(steps.stage_names):
        t0 = clock.now_ns()
        if i == 0:
            h = steps.transform(h)
        h = steps.stages[i](h)
        if live[i]:
            logits = steps.heads[i](h)
            int(steps.gates[steps.exit_at[i]](logits)[0].sum())
        if profile is not None:
            profile.record(name, n, (clock.now_ns() - t0) / NS_PER_MS)
    t0 = clock.now_ns()
    logits = steps.student(x)
    steps.gates[R.STUDENT](logits)
    if profile is not None:
        profile.record(R.STUDENT, n, (clock.now_ns() - t0) / NS_PER_MS)
    for name, rung in steps.rungs.items():
        t0 = clock.now_ns()
        steps.gates[name](rung(x))
        if profile is not None:
            profile.record(name, n, (clock.now_ns() - t0) / NS_PER_MS)


def batch_of(x: torch.Tensor, bs: int) -> torch.Tensor:
    """``x`` cut or tiled to ``bs`` samples."""
    if x.shape[0] >= bs:
        return x[:bs]
    reps = -(-bs // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:bs]
