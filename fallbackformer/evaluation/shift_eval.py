"""Evaluate a :class:`FallbackModel` on the clean test split and the shift suite.

:func:`evaluate` runs, per set, every path alone and the whole system (the real ``FallbackModel.forward``,
in batches, with its own policy and clock), then derives the metrics. It returns an :class:`Evaluation`:
a mapping ``set name -> metrics`` (JSON-able), plus a ``summary`` across sets led by the silent-error
headline, the per-path FLOPs, the measured stage latencies, the latency-budget sweep, and the raw
per-sample arrays that the report's figures need.

The parts live by what they own (their docstrings hold the exact definitions):

* :mod:`~fallbackformer.evaluation.set_eval`: one set, every number (silent errors, selective risk,
  failure detection, slices, latency, references).
* :mod:`~fallbackformer.evaluation.guarantee_eval`: which guarantee serves (a router's, or the gates'),
  whether it held on a set, and whether the set lies in the certified distribution.
* :mod:`~fallbackformer.evaluation.shift_summary`: across sets (headline, verdict, mCE, severities).
* :mod:`~fallbackformer.evaluation.cost_eval`: FLOPs, stage latencies, the budget sweep.
* :mod:`~fallbackformer.evaluation.containers`: :class:`Evaluation`, :class:`PathArrays`, the JSON sanitizer.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fallbackformer.evaluation.containers import CLEAN, Evaluation, PathArrays, split_set_key
from fallbackformer.evaluation.cost_eval import budget_sweep, default_budgets, measure_stage_latency, path_flops
from fallbackformer.evaluation.guarantee_eval import serving_certificate, set_guarantee
from fallbackformer.evaluation.set_eval import evaluate_set, gate_info
from fallbackformer.evaluation.shift_summary import summarize
from fallbackformer.runtime.fallback_model import FallbackModel

__all__ = [
    "CLEAN",
    "Evaluation",
    "PathArrays",
    "evaluate",
    "path_flops",
    "measure_stage_latency",
    "budget_sweep",
    "summarize",
    "default_budgets",
]


def evaluate(
    model: FallbackModel,
    sets: Mapping[str, tuple[Tensor, Tensor]],
    *,
    held_out: Iterable[str] | None = None,
    batch_size: int = 16,
    latency_samples: int = 16,
    budgets_ms: Sequence[float] | None = None,
    budget_sets: Sequence[str] | None = None,
    sweep: bool = True,
    sweep_max_samples: int = 300,
    stage_reps: int = 30,
    emit_events: bool = False,
    num_threads: int | None = None,
    progress: bool = True,
    drift: Mapping[str, Any] | None = None,
) -> Evaluation:
    """Evaluate ``model`` on every set.

    Args:
        model: the system (put in eval mode here).
        sets: ``{"clean": (x, y), "<corruption>/<severity>": (x, y), ...}``; raw inputs ``[N, ...]``.
        held_out: corruption names never used for tuning (summarised separately); default
            none (pass the suite's ``held_out``: ``evaluate_and_report`` does).
        batch_size: request size of the system's calls (the budget is per call, so this is the
            serving batch; the paths alone run in batches of at least 512).
        latency_samples: single-sample calls per set for latency p50/p99 (0 to skip).
        budgets_ms: budgets of the sweep; default :func:`default_budgets` from measured stage times.
        budget_sets: sets swept; default ``clean`` plus, per severity, all shift sets of that severity
            pooled (``"severity <s>"``).
        sweep: run the budget sweep at all.
        sweep_max_samples: each swept set is cut to at most this many samples (a fixed, seeded
            subsample) so the sweep stays cheap.
        stage_reps: repetitions per stage for :func:`measure_stage_latency`.
        emit_events: send the evaluation's fallback events to the model's sinks (off by default so
            evaluation traffic never lands in an audit log).
        num_threads: if given, ``torch.set_num_threads`` for the duration of the call (restored after);
            1 is fastest for tiny models on a shared CPU and keeps latency figures free of thread
            contention.
        progress: show a tqdm progress bar.
        drift: settings of the calibration-drift study (keyword arguments of
            :func:`fallbackformer.evaluation.drift_eval.drift_study`: ``severity``, ``requests``,
            ``batch_size``, ``clean_requests``, ``seed``); ``None`` skips it.

    Returns:
        An :class:`Evaluation` (a mapping ``set -> metrics`` with ``summary`` and figures' data).

    >>> ev = evaluate(model, {"clean": (x, y)})          # doctest: +SKIP
    >>> ev["clean"]["accuracy"]["system"], ev.summary     # doctest: +SKIP
    """
    if not sets:
        raise ValueError("no sets to evaluate; pass {'clean': (x_test, y_test), ...}")
    for k, v in sets.items():
        if not (isinstance(v, (tuple, list)) and len(v) == 2 and len(v[0]) == len(v[1])):
            raise ValueError(f"set {k!r} must be a pair (inputs [N, ...], labels [N]) of equal length")
    held = sorted(set(held_out or ()))
    saved_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        evaluation = _evaluate(
            model, sets, held, batch_size, latency_samples, budgets_ms, budget_sets, sweep,
            sweep_max_samples, stage_reps, emit_events, progress,
        )
        if drift is not None:
            from fallbackformer.evaluation.drift_eval import drift_study

            evaluation.drift = drift_study(model, sets, held_out=held, **dict(drift))
            evaluation.config["drift"] = dict(drift)
        return evaluation
    finally:
        torch.set_num_threads(saved_threads)


def _subsample(x: Tensor, y: Tensor, k: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    if len(y) <= k:
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return x[idx], y[idx]


def _evaluate(
    model: FallbackModel,
    sets: Mapping[str, tuple[Tensor, Tensor]],
    held: list[str],
    batch_size: int,
    latency_samples: int,
    budgets_ms: Sequence[float] | None,
    budget_sets: Sequence[str] | None,
    sweep: bool,
    sweep_max_samples: int,
    stage_reps: int,
    emit_events: bool,
    progress: bool,
) -> Evaluation:
    from tqdm.auto import tqdm

    model.eval()
    class_names = list(model.class_names) if model.class_names else []  # slices fall back to the class index
    gates = gate_info(model)
    certificate = serving_certificate(model, gates)
    first = next(iter(sets.values()))[0]
    flops = path_flops(model, first[:1])
    saved_sinks = model.sinks
    if not emit_events:
        model.sinks = []
    per_set: dict[str, dict[str, Any]] = {}
    arrays: dict[str, dict[str, PathArrays]] = {}
    try:
        if latency_samples:
            for _ in range(3):  # warm-up, not measured
                model(first[:1])
        # The decisions are measured with the deadline lifted, so that machine load can never turn into
        # fallbacks in the accuracy figures (deterministic for a bundle); what a budget costs is the
        # budget sweep's job (a fake clock with the measured stage times).
        decider = model.rebuild(policy=dataclasses.replace(model.policy, budget_ms=1e9, hedge="off"),
                                sinks=model.sinks, profile=model.profile)
        for key in tqdm(list(sets), desc="evaluate", disable=not progress, leave=False, mininterval=2.0):
            x, y = sets[key]
            entry, arr = evaluate_set(decider, x, y, batch_size, latency_samples, flops, gates, class_names, certificate)
            parsed = split_set_key(key)
            entry["corruption"] = parsed[0] if parsed else None
            entry["severity"] = parsed[1] if parsed else 0
            entry["held_out"] = bool(parsed and parsed[0] in held)
            entry["guarantee"] = set_guarantee(key, entry["held_out"], entry["selective_risk"], certificate, model.path_names)
            per_set[key] = entry
            arrays[key] = arr
    finally:
        model.sinks = saved_sinks

    stage_ms = measure_stage_latency(model, first[:1], reps=stage_reps) if (sweep or latency_samples) else {}
    sweep_result = None
    if sweep:
        chosen: dict[str, tuple[Tensor, Tensor]] = {}
        if budget_sets is None:
            if CLEAN in sets:
                chosen[CLEAN] = sets[CLEAN]
            sevs = sorted({p[1] for k in sets if (p := split_set_key(k))})
            for s in sevs:
                keys = [k for k in sets if (p := split_set_key(k)) and p[1] == s]
                chosen[f"severity {s}"] = (torch.cat([sets[k][0] for k in keys]), torch.cat([sets[k][1] for k in keys]))
        else:
            chosen = {k: sets[k] for k in budget_sets}
        chosen = {k: _subsample(x, y, sweep_max_samples) for k, (x, y) in chosen.items()}
        margin = float(getattr(model.policy, "margin_ms", 0.0) or 0.0)
        budgets = list(budgets_ms) if budgets_ms is not None else default_budgets(stage_ms, margin)
        sweep_result = budget_sweep(model, chosen, budgets, stage_ms)
        sweep_result["max_samples_per_set"] = sweep_max_samples

    summary = summarize(per_set, held)
    return Evaluation(
        per_set=per_set,
        summary=summary,
        paths=list(model.path_names),
        flops=flops,
        stage_latency_ms=stage_ms,
        budget_sweep=sweep_result,
        arrays=arrays,
        gates=gates,
        certificate=certificate,
        held_out=held,
        config={
            "batch_size": batch_size,
            "latency_samples": latency_samples,
            "policy": model.policy.to_dict(),
            "sets": list(sets),
        },
    )
