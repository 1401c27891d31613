"""Reassess fallback adequacy after a model update: the candidate in shadow against the current bundle.

``python scripts/reassess.py current=checkpoints/digits candidate=DIR`` evaluates both bundles with
the report's own function (:func:`fallbackformer.evaluation.shift_eval.evaluate`) on the same sets
(the clean test split and the shift suite), then holds the candidate to the current bundle's signed-off
``degradation`` block and to the current bundle's measured behaviour:

* **bounds**: every limit of the current ``degradation`` (``max_fallback_rate``, ``max_accuracy_drop_pt``,
  per-slice limits, ...) on the candidate's evaluation (:func:`fallbackformer.export.bounds.check_bounds`);
* **guarantees**: the candidate's guarantee holds on the clean set, and on at least as many sets
  as the current's (``guarantee.holds`` per set);
* **silent errors** (answered and wrong): clean, tunable-shift and held-out-shift means, each at
  most ``max_silent_error_increase_pt`` above the current's;
* **fallback rate**: clean rate at most ``max_fallback_rate_increase_pt`` above the current's;
* **latency**: clean single-sample p99 at most ``latency_ratio`` x the current's + ``latency_slack_ms``;
* **slices**: the clean per-class accuracy and fallback-rate gaps (largest minus smallest) at most
  ``max_slice_gap_increase_pt`` above the current's.

Decisions are compared with the latency budget lifted (``lift_budget``): on a shared machine a
deadline can fall either way from one run to the next, which would make the verdict on the same
bundle depend on the machine's load. Latency is compared on its own (the p99 above), and the
deadline paths are exercised by the drills.

It says one line, ``approve: ...`` or ``refuse: <every failed check>``, and writes ``reassess.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from fallbackformer.common.jsonsafe import dumps
from fallbackformer.common.timing import Stopwatch

__all__ = ["ReassessSettings", "Reassessment", "reassess", "run_reassess_from_config"]


@dataclass
class ReassessSettings:
    """Tolerances of the comparison (points are percentage points) and the evaluation's cost knobs.

    ``lift_budget``: compare decisions with the latency budget lifted (reproducible verdicts).
    """

    max_silent_error_increase_pt: float = 0.5
    max_fallback_rate_increase_pt: float = 2.0
    max_slice_gap_increase_pt: float = 5.0
    latency_ratio: float = 2.0
    latency_slack_ms: float = 0.5
    latency_samples: int = 32
    batch_size: int = 16
    num_threads: int | None = 1
    lift_budget: bool = True


@dataclass
class Reassessment:
    """The verdict, its reasons, and the figures compared."""

    verdict: str
    reasons: list[str]
    current: dict[str, Any]
    candidate: dict[str, Any]
    checks: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def line(self) -> str:
        """The one-line verdict."""
        if self.verdict == "approve":
            return (f"approve: the candidate meets the current bundle's signed-off bounds and matches its guarantees, "
                    f"silent errors, fallback rate, latency and slice gaps ({len(self.checks)} checks)")
        return "refuse: " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line}


def _figures(ev: Any) -> dict[str, Any]:
    """The figures compared, from an :class:`~fallbackformer.evaluation.shift_eval.Evaluation`."""
    from fallbackformer.evaluation.pipeline import headline_metrics

    clean = ev.per_set["clean"]
    s = ev.summary
    disp = (clean.get("slices") or {}).get("max_disparity") or {}
    return {
        "summary": {**headline_metrics(ev), "slices": clean.get("slices") or {}},
        "silent_error": {"clean": clean["silent_error"], "tunable": s.get("silent_error_tunable"),
                         "held_out": s.get("silent_error_held_out")},
        "fallback_rate": clean["fallback_rate"],
        "latency_p99_ms": (clean.get("latency_ms") or {}).get("p99"),
        "guarantee_clean": bool((clean.get("guarantee") or {}).get("holds")),
        "guarantee_sets_held": sum(bool((e.get("guarantee") or {}).get("holds")) for e in ev.per_set.values()),
        "slice_gap": {k: (disp.get(k) or {}).get("gap") for k in ("accuracy", "fallback_rate")},
        "n_sets": len(ev.per_set),
    }


def reassess(current: Any, candidate: Any, sets: Mapping[str, tuple[Tensor, Tensor]],
             degradation: Mapping[str, Any] | None, held_out: list[str] | None = None,
             settings: ReassessSettings | None = None) -> Reassessment:
    """Evaluate both models on ``sets`` and decide whether the candidate may replace the current one.

    Args:
        current: the serving :class:`~fallbackformer.runtime.fallback_model.FallbackModel`.
        candidate: the proposed replacement.
        sets: ``{"clean": (x, y), "<corruption>/<severity>": (x, y), ...}`` (``clean`` required).
        degradation: the current bundle's signed-off ``degradation`` block.
        held_out: corruption names held out (default: the shift module's).
        settings: tolerances.

    Returns:
        A :class:`Reassessment`; ``verdict`` is ``"approve"`` or ``"refuse"``.
    """
    from fallbackformer.evaluation.shift_eval import evaluate
    from fallbackformer.export.bounds import check_bounds

    if "clean" not in sets:
        raise ValueError(f"reassess needs a 'clean' set; got {sorted(sets)}. Pass the test split as sets['clean']")
    st = settings or ReassessSettings()
    watch = Stopwatch()
    kw = dict(held_out=held_out, batch_size=st.batch_size, latency_samples=st.latency_samples, sweep=False,
              stage_reps=5, progress=False, num_threads=st.num_threads)
    if st.lift_budget:  # decisions that depend on the inputs only: the same bundle gets the same figures
        current, candidate = (m.rebuild(policy=dataclasses.replace(m.policy, budget_ms=1e9, hedge="off"))
                              for m in (current, candidate))
    cur, cand = _figures(evaluate(current, sets, **kw)), _figures(evaluate(candidate, sets, **kw))
    reasons: list[str] = []
    checks: dict[str, bool] = {}

    def check(name: str, ok: bool, why: str) -> None:
        checks[name] = ok
        if not ok:
            reasons.append(why)

    breaches = check_bounds(degradation, cand["summary"]) if degradation else []
    check("bounds", not breaches, "signed-off bounds broken: " + " | ".join(b.message for b in breaches))
    check("guarantee_clean", cand["guarantee_clean"] or not cur["guarantee_clean"],
          "the guarantee no longer holds on the clean set (it did for the current bundle)")
    check("guarantee_sets", cand["guarantee_sets_held"] >= cur["guarantee_sets_held"],
          f"the guarantee holds on {cand['guarantee_sets_held']} of {cand['n_sets']} sets, "
          f"the current bundle's on {cur['guarantee_sets_held']}")
    for where, c, base in _paired(cand["silent_error"], cur["silent_error"]):
        check(f"silent_error_{where}", c <= base + st.max_silent_error_increase_pt / 100,
              f"silent errors ({where}) {100 * c:.2f}% vs {100 * base:.2f}% "
              f"(> +{st.max_silent_error_increase_pt} pt)")
    check("fallback_rate", cand["fallback_rate"] <= cur["fallback_rate"] + st.max_fallback_rate_increase_pt / 100,
          f"clean fallback rate {100 * cand['fallback_rate']:.2f}% vs {100 * cur['fallback_rate']:.2f}% "
          f"(> +{st.max_fallback_rate_increase_pt} pt)")
    if cand["latency_p99_ms"] is not None and cur["latency_p99_ms"] is not None:
        limit = st.latency_ratio * cur["latency_p99_ms"] + st.latency_slack_ms
        check("latency", cand["latency_p99_ms"] <= limit,
              f"clean p99 latency {cand['latency_p99_ms']:.3f} ms > {limit:.3f} ms "
              f"({st.latency_ratio} x the current {cur['latency_p99_ms']:.3f} ms + {st.latency_slack_ms} ms)")
    for k, c, base in _paired(cand["slice_gap"], cur["slice_gap"]):
        check(f"slice_gap_{k}", c <= base + st.max_slice_gap_increase_pt / 100,
              f"per-class {k} gap {100 * c:.1f} pt vs {100 * base:.1f} pt (> +{st.max_slice_gap_increase_pt} pt)")
    for f in (cur, cand):
        f.pop("summary")
    return Reassessment("refuse" if reasons else "approve", reasons, cur, cand, checks, watch.elapsed())


def run_reassess_from_config(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``scripts/reassess.py``: load ``cfg.current`` and ``cfg.candidate``, build the sets, decide.

    Returns:
        ``(metrics, objects)``: ``{"verdict", "line", "reasons", "report"}`` and ``{"reassessment"}``.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import fallbackformer as ff

    for key in ("current", "candidate"):
        value = cfg.get(key)
        if not value or not Path(str(value)).expanduser().exists():
            raise FileNotFoundError(f"{key}={value!r} is not a bundle directory; run: python scripts/reassess.py "
                                    "current=checkpoints/digits candidate=PATH/TO/NEW/BUNDLE")
    current = ff.load(Path(str(cfg.current)).expanduser())
    candidate = ff.load(Path(str(cfg.candidate)).expanduser())
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    x, y = datamodule.splits[str(cfg.get("split", "test"))]
    sets: dict[str, tuple[Tensor, Tensor]] = {"clean": (x, y)}
    suite = instantiate(cfg.shift) if cfg.get("shift") is not None else None
    if suite is not None:
        sets.update(suite.build(x, y))
    settings = instantiate(cfg.reassess) if cfg.get("reassess") is not None else ReassessSettings()
    degradation = (current.bundle_manifest or {}).get("degradation")
    result = reassess(current, candidate, sets, degradation, list(suite.held_out) if suite is not None else None, settings)
    out_dir = Path(str(cfg.get("out_dir") or "outputs/reassess"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "reassess.json"
    doc = {**result.to_dict(), "current_bundle": str(cfg.current), "candidate_bundle": str(cfg.candidate),
           "sets": list(sets), "settings": OmegaConf.to_container(cfg.reassess, resolve=True) if cfg.get("reassess") else None}
    report.write_text(dumps(doc, indent=2, where="reassessment") + "\n", encoding="utf-8")
    print(result.line)
    return ({"verdict": result.verdict, "line": result.line, "reasons": result.reasons, "report": str(report)},
            {"reassessment": result})


def _paired(candidate: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``(key, candidate value, current value)`` for every key both measured (``None``: not measured)."""
    return [(k, c, current[k]) for k, c in candidate.items() if c is not None and current.get(k) is not None]
