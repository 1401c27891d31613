"""Evaluate a :class:`FallbackModel` on the clean test split and the shift suite.

:func:`evaluate` runs, per set, every path alone (each exit, the primary, the student: one forward of
the primary gives all exits) and the whole system (the real ``FallbackModel.forward``, in batches, with
its own policy and clock), then derives the metrics of :mod:`fallbackformer.evaluation.metrics`.
It returns an :class:`Evaluation`: a mapping ``set name -> metrics`` (JSON-able), plus a ``summary``
across sets, the per-path FLOPs, the measured stage latencies, the latency-budget sweep, and the raw
per-sample arrays that the report's figures need.

Definitions used here (the report repeats them):

* **fallback rate**: fraction of answers served by the student or the safe default.
* **selective risk** (per set, ``selective_risk``):
  ``system``: error rate of the non-default answers, against the loosest ``alpha`` of the gates;
  ``<path>``: the path's gate applied alone to that path's logits on every sample (exactly what
  ``ConfidenceGate.calibrate`` guaranteed on the calibration split): for ``ltt_binom``, ``ltt_hb``, ``empirical``
  the selective risk (errors among accepted / accepted), for ``crc`` the joint risk (accepted and wrong
  / all). ``violated``: the point estimate exceeds ``alpha``; ``significant``: even the one-sided
  Clopper-Pearson lower bound at level ``delta`` exceeds ``alpha`` (the guarantee is broken on this set
  with confidence ``1 - delta``). Under shift no calibration guarantee is promised; the flags show where
  it fails.
* **coverage**: ``system``: fraction of non-default answers; ``<path>``: fraction its gate accepts alone.
* **ECE** (15 bins) per path on ``softmax(logits / T_gate)``; ``system``: on the non-default answers,
  with the serving path's temperature.
* **AURC** per path with the gate's score as the ranking; ``system``: the calibrated probability of
  the serving path, default answers ranked last.
* **FLOPs** (``torch.utils.flop_counter.FlopCounterMode``, counted once per path on one sample):
  ``exit_k`` costs the input transform, the stages up to its own and heads 1..k; ``primary`` all
  stages and heads; ``student`` and ``default`` answers cost the whole primary plus the student (an upper
  bound: a deadline fallback stopped earlier), except ``breaker_open`` (student only) and
  ``invalid_input`` (nothing). Mean FLOPs per set combine these with the served_by mix.
* **latency**: ``FallbackOutput.latency_ms`` of single-sample calls on ``latency_samples`` samples
  per set (the model's clock), p50 and p99 (nearest rank).
* **oracle exit**: the cheapest exit (exit_1, ..., primary) that is correct, if any; **oracle
  router**: the primary or the student, whichever is correct.
* **accuracy vs budget**: a simulation with the real runtime logic (deadline checks, admission
  control): the stages and the student are wrapped in ``ScriptedDelay`` on a ``FakeClock``, each
  taking its measured single-sample median time per call, the latency profile is seeded with
  ``warm_up``, and ``policy.budget_ms`` is set to each budget (hedging, compilation and the breaker
  off). It answers "what would this bundle do at budget B on a machine with these stage times".
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fallbackformer.evaluation import metrics as M
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import median_ms
from fallbackformer.runtime.fallback_model import FallbackModel

__all__ = [
    "Evaluation",
    "PathArrays",
    "evaluate",
    "path_flops",
    "measure_stage_latency",
    "budget_sweep",
    "summarize",
    "default_budgets",
]

CLEAN = "clean"


# --------------------------------------------------------------------------------------------------
# containers


@dataclass
class PathArrays:
    """Per-sample arrays of one path on one set (kept for figures).

    Attributes:
        confidence: the gate's score ``[N]`` (ranking for AURC / risk-coverage); ``-inf`` if non-finite.
        probability: calibrated max softmax ``[N]`` (reliability diagrams); ``nan`` where undefined.
        correct: ``[N]`` bool.
        accepted: ``[N]`` bool, what the gate accepts alone (``system``: non-default answers).
    """

    confidence: Tensor
    probability: Tensor
    correct: Tensor
    accepted: Tensor


@dataclass
class Evaluation(Mapping[str, dict[str, Any]]):
    """The result of :func:`evaluate`; a read-only mapping ``set name -> metrics``.

    Attributes:
        per_set: ``{"clean" | "<corruption>/<severity>": metrics}`` (JSON-able).
        summary: metrics across sets (:func:`summarize`): ``mce``, ``relative_drop``, ...
        paths: the path names, ``["exit_1", ..., "primary", "student"]``.
        flops: :func:`path_flops` of the model.
        stage_latency_ms: :func:`measure_stage_latency` of the model.
        budget_sweep: :func:`budget_sweep` result (``None`` if not run).
        arrays: ``{set: {path or "system": PathArrays}}``.
        gates: ``{path: {"alpha", "delta", "method", "threshold", "temperature", "score"}}``.
        held_out: corruption names that were never used for tuning.
        config: the evaluation settings.
        drift: the calibration-drift study (:func:`fallbackformer.evaluation.drift_eval.drift_study`),
            ``None`` when not run.
    """

    per_set: dict[str, dict[str, Any]]
    summary: dict[str, Any]
    paths: list[str]
    flops: dict[str, Any]
    stage_latency_ms: dict[str, float]
    budget_sweep: dict[str, Any] | None
    arrays: dict[str, dict[str, PathArrays]] = field(repr=False)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    held_out: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, Any] | None = None

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.per_set[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.per_set)

    def __len__(self) -> int:
        return len(self.per_set)

    def to_json(self) -> dict[str, Any]:
        """The ``report.json`` content: one entry per set, plus ``summary`` and ``meta``."""
        out: dict[str, Any] = dict(self.per_set)
        out["summary"] = self.summary
        if self.drift is not None:
            out["drift"] = self.drift
        out["meta"] = {
            "paths": self.paths,
            "flops": self.flops,
            "stage_latency_ms": self.stage_latency_ms,
            "budget_sweep": self.budget_sweep,
            "gates": self.gates,
            "held_out": self.held_out,
            "config": self.config,
        }
        return out


# --------------------------------------------------------------------------------------------------
# model introspection


def _gate_info(model: FallbackModel) -> dict[str, dict[str, Any]]:
    info = {}
    for name in model.path_names:
        gate = model.gates[name]
        g = dict(gate.guarantee or {})
        info[name] = {
            "alpha": g.get("alpha"),
            "delta": g.get("delta"),
            "method": g.get("method"),
            "threshold": float(gate.threshold),
            "temperature": float(gate.temperature),
            "score": getattr(gate, "score", None),
        }
    return info


@torch.no_grad()
def path_flops(model: FallbackModel, example: Tensor) -> dict[str, Any]:
    """FLOPs of one sample per path, counted once with ``FlopCounterMode``.

    Args:
        model: the system.
        example: one raw input ``[1, ...]`` (or a batch; only the first sample is used).

    Returns:
        ``{"cascade": {exit_k | "primary": FLOPs when that head serves, all earlier heads included},
        "alone": {path: FLOPs of that path run by itself}, "student": FLOPs, "fallback": FLOPs of a
        student answer after the whole primary}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    primary: MultiExitNet = model.primary
    x = example[:1]

    def count(fn: Any, *args: Any) -> tuple[int, Any]:
        with FlopCounterMode(display=False) as fc:
            out = fn(*args)
        return int(fc.get_total_flops()), out

    cum, h = count(primary.input_transform, x)
    heads_cum = 0
    cascade: dict[str, int] = {}
    alone: dict[str, int] = {}
    names = primary.exit_names
    k = 0
    for i, stage in enumerate(primary.stages):
        f, h = count(stage, h)
        cum += f
        if i in primary.exit_stages:
            fh, _ = count(primary.head(i), h)
            heads_cum += fh
            cascade[names[k]] = cum + heads_cum
            alone[names[k]] = cum + fh
            k += 1
    student_f, _ = count(model.student, x)
    alone[R.STUDENT] = student_f
    return {
        "cascade": cascade,
        "alone": alone,
        "student": student_f,
        "fallback": cascade[R.PRIMARY] + student_f,
        "note": "FlopCounterMode counts matmul/conv/bmm FLOPs (2 per multiply-add); elementwise ops and "
        "interpolation are not counted",
    }


def _answer_flops(served_by: Sequence[str], reasons: Sequence[str], flops: Mapping[str, Any]) -> float:
    if not served_by:
        return math.nan
    total = 0.0
    for who, why in zip(served_by, reasons):
        if who in flops["cascade"]:
            total += flops["cascade"][who]
        elif why == R.INVALID_INPUT:
            continue
        elif why == R.BREAKER_OPEN:
            total += flops["student"]
        else:
            total += flops["fallback"]
    return total / len(served_by)


@torch.inference_mode()
def measure_stage_latency(model: FallbackModel, example: Tensor, reps: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median single-sample wall time (ms) of each primary stage (its head included) and the student.

    The input transform is counted in the first stage. Uses ``time.perf_counter_ns`` (real time).

    Returns:
        ``{"stage_0": ms, ..., "student": ms, "total_primary": ms}``.
    """
    primary: MultiExitNet = model.primary
    x = example[:1]
    feats = []
    h = primary.input_transform(x)
    for stage in primary.stages:
        feats.append(h)
        h = stage(h)
    out: dict[str, float] = {}

    def timed(fn: Any) -> float:
        return median_ms(fn, reps, warmup)

    for i, stage in enumerate(primary.stages):
        head = primary.head(i) if i in primary.exit_stages else None
        inp = feats[i]

        def run(stage: nn.Module = stage, head: nn.Module | None = head, inp: Tensor = inp, i: int = i) -> None:
            z = primary.input_transform(x) if i == 0 else inp
            z = stage(z)
            if head is not None:
                head(z)

        out[f"stage_{i}"] = timed(run)
    out[R.STUDENT] = timed(lambda: model.student(x))
    out["total_primary"] = sum(v for k, v in out.items() if k.startswith("stage_"))
    return out


def default_budgets(stage_ms: Mapping[str, float], margin_ms: float = 0.0, n: int = 12) -> list[float]:
    """Log-spaced budgets from half the first stage to twice (primary + student + margin).

    Admission control reserves the student's time and the policy's margin, so the whole primary only
    runs once the budget covers all three.
    """
    lo = max(1e-3, 0.5 * stage_ms["stage_0"])
    hi = max(lo * 4, 2.0 * (stage_ms["total_primary"] + stage_ms[R.STUDENT] + margin_ms))
    return [float(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]


def _sim_policy(model: FallbackModel, budget_ms: float) -> Any:
    """The model's policy at another budget, with the parts that do not belong in a simulation off:
    no hedging threads, no compilation, no circuit breaker (its state would carry between sets)."""
    policy = model.policy
    changes: dict[str, Any] = {"budget_ms": float(budget_ms)}
    for name, value in (("hedge", "off"), ("compile", "off"), ("breaker", None)):
        if hasattr(policy, name):
            changes[name] = value
    return dataclasses.replace(policy, **changes)


def _timed_copy(model: FallbackModel, stage_ms: Mapping[str, float], budget_ms: float) -> FallbackModel:
    """The same weights and gates with stages and student that take ``stage_ms`` on a FakeClock."""
    from fallbackformer.runtime.clock import FakeClock, ScriptedDelay

    clock = FakeClock()
    primary: MultiExitNet = model.primary
    stages = [ScriptedDelay(s, clock, [float(stage_ms[f"stage_{i}"])]) for i, s in enumerate(primary.stages)]
    heads = {s: primary.head(s) for s in primary.exit_stages}
    timed_primary = MultiExitNet(stages, heads, input_transform=primary.input_transform)
    timed_student = ScriptedDelay(model.student, clock, [float(stage_ms[R.STUDENT])])
    return FallbackModel(
        timed_primary,
        timed_student,
        {n: model.gates[n] for n in model.path_names},
        _sim_policy(model, budget_ms),
        input_spec=model.input_spec,
        clock=clock,
        class_names=model.class_names,
    ).eval()


@torch.inference_mode()
def budget_sweep(
    model: FallbackModel,
    sets: Mapping[str, tuple[Tensor, Tensor]],
    budgets_ms: Sequence[float],
    stage_ms: Mapping[str, float],
) -> dict[str, Any]:
    """Accuracy and fallback rate of the system against the latency budget (simulated time).

    Per set, the model is rebuilt around the same weights and gates with stages and a student that
    each take ``stage_ms`` (per call, whatever the batch) on a :class:`FakeClock`; its latency profile
    is seeded with ``warm_up`` (so admission control predicts those times); then for each budget the
    policy's ``budget_ms`` is set (hedging, compilation and the breaker off) and the set is served in
    one call. The model passed in is not modified.

    Returns:
        ``{"budgets_ms": [...], "policy_budget_ms": float, "stage_ms": {...},
        "sets": {name: {"accuracy": [...], "fallback_rate": [...], "deadline_rate": [...]}}}``.
    """
    result: dict[str, Any] = {
        "budgets_ms": [float(b) for b in budgets_ms],
        "policy_budget_ms": float(model.policy.budget_ms),
        "stage_ms": dict(stage_ms),
        "sets": {},
    }
    for name, (x, y) in sets.items():
        r = result["sets"][name] = {"accuracy": [], "fallback_rate": [], "deadline_rate": []}
        if len(y) == 0:
            continue
        timed = _timed_copy(model, stage_ms, max(budgets_ms))
        if hasattr(timed, "warm_up"):
            timed.warm_up(x, repeats=8, discard=0, batch_sizes=[len(y)])
        for b in budgets_ms:
            timed.policy = _sim_policy(model, b)
            if hasattr(timed, "_sync"):
                timed._sync()
            out = timed(x)
            n = len(y)
            fb = sum(s in (R.STUDENT, R.DEFAULT) for s in out.served_by) / n
            dl = sum(r_ in (R.DEADLINE_EXCEEDED, R.DEADLINE_PREDICTED) for r_ in out.reason) / n
            r["accuracy"].append(float((out.prediction.cpu() == y.cpu()).double().mean()))
            r["fallback_rate"].append(fb)
            r["deadline_rate"].append(dl)
    return result


# --------------------------------------------------------------------------------------------------
# per-set evaluation


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _risk_check(errors: int, n: int, denom: int, alpha: float | None, delta: float | None) -> dict[str, Any]:
    """Risk ``errors / denom`` and the guarantee flags (``n`` is the accepted count)."""
    risk = errors / denom if denom else math.nan
    d = 0.1 if delta is None else float(delta)
    out: dict[str, Any] = {
        "risk": risk,
        "errors": errors,
        "n_accepted": n,
        "denominator": denom,
        "alpha": alpha,
        "delta": delta,
        "upper": M.risk_upper_bound(errors, denom, d) if denom else math.nan,
        "lower": M.risk_lower_bound(errors, denom, d) if denom else math.nan,
    }
    out["violated"] = bool(alpha is not None and denom > 0 and risk > alpha)
    out["significant"] = bool(alpha is not None and denom > 0 and out["lower"] > alpha)
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))  # nearest rank
    return float(s[k])


@torch.inference_mode()
def _evaluate_one(
    model: FallbackModel,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    latency_samples: int,
    flops: Mapping[str, Any],
    gate_info: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
) -> tuple[dict[str, Any], dict[str, PathArrays]]:
    paths = list(model.path_names)  # exit_1.., primary, student
    y = y.detach().cpu().long()
    n = len(y)
    # ---- every path alone: one forward of the primary gives all exits
    chunks = [model.primary(xb) + [model.student(xb)] for xb in x.split(max(batch_size, 512))]
    logits = {p: torch.cat([c[i] for c in chunks]).float().cpu() for i, p in enumerate(paths)}  # [N, C] each
    # ---- the system
    outs = [model(xb) for xb in x.split(batch_size)]
    pred = torch.cat([o.prediction.cpu() for o in outs])  # [N]
    served: list[str] = [s for o in outs for s in o.served_by]
    reasons: list[str] = [r for o in outs for r in o.reason]
    sys_logits = torch.cat([o.logits.float().cpu() for o in outs]) if n else torch.zeros(0, 1)

    arrays: dict[str, PathArrays] = {}
    acc: dict[str, float] = {}
    ece: dict[str, float | None] = {}
    aurc: dict[str, float | None] = {}
    cov: dict[str, float | None] = {}
    risk: dict[str, Any] = {}
    correct_by_path: dict[str, Tensor] = {}
    for p in paths:
        lg = logits[p]
        gate = model.gates[p]
        ok = lg.argmax(dim=1) == y
        correct_by_path[p] = ok
        accepted, conf = gate(lg)
        accepted = accepted.cpu()
        conf = conf.detach().double().cpu()
        conf = torch.where(torch.isfinite(conf), conf, torch.full_like(conf, -math.inf))
        prob = torch.softmax(lg.double() / float(gate.temperature), dim=1).max(dim=1).values
        finite = torch.isfinite(prob)
        arrays[p] = PathArrays(conf, prob, ok, accepted)
        acc[p] = M.accuracy(lg.argmax(dim=1), y)
        ece[p] = _nan_to_none(M.ece(prob[finite], ok[finite])) if bool(finite.any()) else None
        aurc[p] = _nan_to_none(M.aurc(conf, ok)) if n else None
        cov[p] = _nan_to_none(M.coverage(accepted))
        info = gate_info[p]
        n_acc = int(accepted.sum())
        errs = int((accepted & ~ok).sum())
        joint = info.get("method") == "crc"
        check = _risk_check(errs, n_acc, n if joint else n_acc, info.get("alpha"), info.get("delta"))
        check["kind"] = "joint (accepted and wrong / all)" if joint else "selective (wrong / accepted)"
        check["method"] = info.get("method")
        risk[p] = check

    # ---- system metrics
    sys_ok = pred == y
    answered = torch.tensor([s != R.DEFAULT for s in served], dtype=torch.bool)
    acc["system"] = float(sys_ok.double().mean()) if n else math.nan
    temps = {p: float(model.gates[p].temperature) for p in paths}
    sys_prob = torch.full((n,), math.nan, dtype=torch.float64)
    for p in paths:
        idx = torch.tensor([i for i, s in enumerate(served) if s == p], dtype=torch.long)
        if idx.numel():
            sys_prob[idx] = torch.softmax(sys_logits[idx].double() / temps[p], dim=1).max(dim=1).values
    sys_rank = torch.where(answered & torch.isfinite(sys_prob), sys_prob, torch.full_like(sys_prob, -math.inf))
    arrays["system"] = PathArrays(sys_rank, sys_prob, sys_ok, answered)
    good = answered & torch.isfinite(sys_prob)
    ece["system"] = _nan_to_none(M.ece(sys_prob[good], sys_ok[good])) if bool(good.any()) else None
    aurc["system"] = _nan_to_none(M.aurc(sys_rank, sys_ok)) if n else None
    cov["system"] = _nan_to_none(M.coverage(answered))
    alphas = [g["alpha"] for g in gate_info.values() if g.get("alpha") is not None]
    deltas = [g["delta"] for g in gate_info.values() if g.get("delta") is not None]
    n_ans = int(answered.sum())
    sys_check = _risk_check(
        int((answered & ~sys_ok).sum()), n_ans, n_ans, max(alphas) if alphas else None, min(deltas) if deltas else None
    )
    sys_check["kind"] = "selective (wrong / non-default answers), against the loosest gate alpha"
    risk = {"system": sys_check, **risk}

    # ---- served_by mix, reasons, accuracy by server
    counts = Counter(served)
    servers = [*paths, R.DEFAULT]
    served_frac = {s: counts.get(s, 0) / n if n else math.nan for s in servers}
    reason_counts = Counter(r for r in reasons if r)
    acc_by_server = {}
    for s in servers:
        idx = [i for i, v in enumerate(served) if v == s]
        acc_by_server[s] = float(sys_ok[idx].double().mean()) if idx else None
    fallback = [s in (R.STUDENT, R.DEFAULT) for s in served]

    # ---- references
    exit_paths = [p for p in paths if p != R.STUDENT]
    exit_ok = torch.stack([correct_by_path[p] for p in exit_paths], dim=1) if n else torch.zeros(0, len(exit_paths), dtype=torch.bool)
    any_exit = exit_ok.any(dim=1)
    first = torch.where(any_exit, exit_ok.double().argmax(dim=1), torch.full((n,), -1, dtype=torch.long))
    oracle_dist = {p: int((first == i).sum()) / n if n else math.nan for i, p in enumerate(exit_paths)}
    oracle_dist["none_correct"] = float((~any_exit).double().mean()) if n else math.nan
    cascade_cost = [flops["cascade"][p] for p in exit_paths]
    oracle_flops = (
        float(sum(cascade_cost[int(i)] if i >= 0 else flops["cascade"][R.PRIMARY] for i in first.tolist()) / n)
        if n
        else math.nan
    )
    acc["oracle_exit"] = float(any_exit.double().mean()) if n else math.nan
    acc["oracle_router"] = float((correct_by_path[R.PRIMARY] | correct_by_path[R.STUDENT]).double().mean()) if n else math.nan

    # ---- slices: per class
    per_class: dict[str, dict[str, Any]] = {}
    fb_t = torch.tensor(fallback, dtype=torch.bool)
    for c in sorted(set(y.tolist())):
        m = y == c
        name = class_names[c] if c < len(class_names) else str(c)
        per_class[name] = {
            "n": int(m.sum()),
            "accuracy": float(sys_ok[m].double().mean()),
            "fallback_rate": float(fb_t[m].double().mean()),
            "accuracy_primary": float(correct_by_path[R.PRIMARY][m].double().mean()),
        }
    disparity = {}
    for key, worst_is_max in (("accuracy", False), ("fallback_rate", True)):
        if per_class:
            vals = {k: v[key] for k, v in per_class.items()}
            hi = max(vals, key=vals.__getitem__)
            lo = min(vals, key=vals.__getitem__)
            disparity[key] = {
                "gap": vals[hi] - vals[lo],
                "worst_class": hi if worst_is_max else lo,
                "best_class": lo if worst_is_max else hi,
                "worst": vals[hi] if worst_is_max else vals[lo],
                "best": vals[lo] if worst_is_max else vals[hi],
            }

    # ---- latency (single-sample calls on the model's own clock)
    lat: list[float] = []
    for i in range(min(latency_samples, n)):
        lat.append(float(model(x[i : i + 1]).latency_ms))

    entry: dict[str, Any] = {
        "n": n,
        "accuracy": {k: _nan_to_none(v) for k, v in acc.items()},
        "accuracy_answered": _nan_to_none(float(sys_ok[answered].double().mean())) if n_ans else None,
        "accuracy_by_server": acc_by_server,
        "fallback_rate": sum(fallback) / n if n else None,
        "served_by": served_frac,
        "served_by_counts": {s: counts.get(s, 0) for s in servers},
        "reasons": {r: c / n for r, c in sorted(reason_counts.items())},
        "reason_counts": dict(sorted(reason_counts.items())),
        "selective_risk": _jsonable(risk),
        "guarantee_broken": sorted(k for k, v in risk.items() if v["significant"]),
        "guarantee_exceeded": sorted(k for k, v in risk.items() if v["violated"]),
        "coverage": cov,
        "ece": ece,
        "aurc": aurc,
        "flops": {
            "mean": _answer_flops(served, reasons, flops) if n else None,
            "primary_alone": flops["alone"][R.PRIMARY],
            "student_alone": flops["alone"][R.STUDENT],
            "oracle_exit": oracle_flops,
        },
        "latency_ms": {
            "p50": _nan_to_none(_percentile(lat, 0.5)),
            "p99": _nan_to_none(_percentile(lat, 0.99)),
            "mean": _nan_to_none(sum(lat) / len(lat)) if lat else None,
            "n_calls": len(lat),
            "batch_size": 1,
        },
        "oracle_exit_distribution": oracle_dist,
        "slices": {"per_class": per_class, "max_disparity": disparity},
    }
    return entry, arrays


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, Mapping):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# across sets


def _split(key: str) -> tuple[str, int] | None:
    name, sep, sev = key.rpartition("/")
    return (name, int(sev)) if sep and sev.isdigit() else None


def summarize(
    per_set: Mapping[str, Mapping[str, Any]],
    held_out: Iterable[str] = (),
    baseline_path: str = R.PRIMARY,
) -> dict[str, Any]:
    """Metrics across sets: mCE and relative drop per path, per-severity means, flagged sets.

    Args:
        per_set: :func:`evaluate`'s per-set metrics (``clean`` plus ``<corruption>/<severity>`` keys).
        held_out: corruption names never used for tuning; also summarised on their own.
        baseline_path: the path whose errors normalise ``mce_normalised`` (Hendrycks-style).

    Returns:
        ``{"mce": {path: mCE}, "mce_normalised": {path: mCE / baseline}, "relative_drop": {path: ...},
        "corruption_errors": {path: {corruption: CE}}, "by_severity": {...}, "held_out": {...},
        "tuning": {...}, "guarantee_broken_sets": [...], ...}``.
    """
    held = set(held_out)
    shift_keys = [k for k in per_set if _split(k)]
    clean = per_set.get(CLEAN)
    paths = list(next(iter(per_set.values()))["accuracy"]) if per_set else []

    def block(keys: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"mce": {}, "mce_normalised": {}, "relative_drop": {}, "corruption_errors": {}}
        if not keys:
            return out
        base = {k: 1 - per_set[k]["accuracy"][baseline_path] for k in keys if per_set[k]["accuracy"].get(baseline_path) is not None}
        for p in paths:
            errs = {k: 1 - per_set[k]["accuracy"][p] for k in keys if per_set[k]["accuracy"].get(p) is not None}
            if not errs:
                continue
            out["corruption_errors"][p] = M.corruption_errors(errs)
            out["mce"][p] = M.mean_corruption_error(errs)
            try:
                out["mce_normalised"][p] = _nan_to_none(M.mean_corruption_error(errs, base))
            except ValueError:
                out["mce_normalised"][p] = None
            if clean is not None and clean["accuracy"].get(p) is not None:
                out["relative_drop"][p] = _nan_to_none(
                    M.relative_drop(clean["accuracy"][p], [per_set[k]["accuracy"][p] for k in errs])
                )
        fb = [per_set[k]["fallback_rate"] for k in keys if per_set[k]["fallback_rate"] is not None]
        out["mean_fallback_rate"] = sum(fb) / len(fb) if fb else None
        return out

    summary: dict[str, Any] = block(shift_keys)
    summary["baseline_path"] = baseline_path
    summary["tuning"] = block([k for k in shift_keys if _split(k)[0] not in held])  # type: ignore[index]
    summary["held_out"] = block([k for k in shift_keys if _split(k)[0] in held])  # type: ignore[index]
    summary["held_out"]["corruptions"] = sorted({_split(k)[0] for k in shift_keys if _split(k)[0] in held})  # type: ignore[index]

    # per-severity means (severity 0 = clean)
    by_sev: dict[str, dict[int, float]] = {p: {} for p in paths}
    fb_sev: dict[str, dict[int, float]] = {"mean": {}}
    sevs = sorted({_split(k)[1] for k in shift_keys})  # type: ignore[index]
    for p in paths:
        if clean is not None and clean["accuracy"].get(p) is not None:
            by_sev[p][0] = clean["accuracy"][p]
        for s in sevs:
            v = [per_set[k]["accuracy"][p] for k in shift_keys if _split(k)[1] == s and per_set[k]["accuracy"].get(p) is not None]  # type: ignore[index]
            if v:
                by_sev[p][s] = sum(v) / len(v)
    if clean is not None:
        fb_sev["mean"][0] = clean["fallback_rate"]
    for s in sevs:
        v = [per_set[k]["fallback_rate"] for k in shift_keys if _split(k)[1] == s]  # type: ignore[index]
        fb_sev["mean"][s] = sum(v) / len(v)
    per_corruption_fb: dict[str, dict[int, float]] = {}
    for k in shift_keys:
        name, s = _split(k)  # type: ignore[misc]
        per_corruption_fb.setdefault(name, {})[s] = per_set[k]["fallback_rate"]
        if clean is not None:
            per_corruption_fb[name][0] = clean["fallback_rate"]
    summary["accuracy_by_severity"] = by_sev
    summary["fallback_rate_by_severity"] = fb_sev
    summary["fallback_rate_by_corruption"] = per_corruption_fb
    summary["guarantee_broken_sets"] = {k: v["guarantee_broken"] for k, v in per_set.items() if v["guarantee_broken"]}
    summary["guarantee_exceeded_sets"] = {k: v["guarantee_exceeded"] for k, v in per_set.items() if v["guarantee_exceeded"]}
    # the largest per-class disparity over all sets
    worst = None
    for k, v in per_set.items():
        d = v["slices"]["max_disparity"].get("accuracy")
        if d and (worst is None or d["gap"] > worst["gap"]):
            worst = {"set": k, **d}
    summary["largest_accuracy_disparity"] = worst
    worst_fb = None
    for k, v in per_set.items():
        d = v["slices"]["max_disparity"].get("fallback_rate")
        if d and (worst_fb is None or d["gap"] > worst_fb["gap"]):
            worst_fb = {"set": k, **d}
    summary["largest_fallback_disparity"] = worst_fb
    if shift_keys:
        lowest = min(shift_keys, key=lambda k: per_set[k]["accuracy"]["system"] if per_set[k]["accuracy"]["system"] is not None else 2.0)
        summary["worst_set"] = {"set": lowest, "accuracy_system": per_set[lowest]["accuracy"]["system"]}
    return _jsonable(summary)


# --------------------------------------------------------------------------------------------------
# entry point


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
            :data:`fallbackformer.data.shift.HELD_OUT`.
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
    from fallbackformer.data.shift import HELD_OUT

    if not sets:
        raise ValueError("no sets to evaluate; pass {'clean': (x_test, y_test), ...}")
    for k, v in sets.items():
        if not (isinstance(v, (tuple, list)) and len(v) == 2 and len(v[0]) == len(v[1])):
            raise ValueError(f"set {k!r} must be a pair (inputs [N, ...], labels [N]) of equal length")
    held = sorted(HELD_OUT if held_out is None else set(held_out))
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
    class_names = list(model.class_names) if model.class_names else [str(i) for i in range(1024)]
    gate_info = _gate_info(model)
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
        for key in tqdm(list(sets), desc="evaluate", disable=not progress, leave=False, mininterval=2.0):
            x, y = sets[key]
            entry, arr = _evaluate_one(model, x, y, batch_size, latency_samples, flops, gate_info, class_names)
            parsed = _split(key)
            entry["corruption"] = parsed[0] if parsed else None
            entry["severity"] = parsed[1] if parsed else 0
            entry["held_out"] = bool(parsed and parsed[0] in held)
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
            sevs = sorted({p[1] for k in sets if (p := _split(k))})
            for s in sevs:
                keys = [k for k in sets if (p := _split(k)) and p[1] == s]
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
        gates=gate_info,
        held_out=held,
        config={
            "batch_size": batch_size,
            "latency_samples": latency_samples,
            "policy": model.policy.to_dict(),
            "sets": list(sets),
        },
    )
