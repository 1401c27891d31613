"""Evaluate a bundle (or a model in memory) on the clean test split and the shift suite, then report.

``scripts/evaluate.py`` calls :func:`run_evaluation` with its Hydra config; the main job calls
:func:`evaluate_and_report` with objects it already holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from fallbackformer.common.timing import Stopwatch
from fallbackformer.data.protocol import ShiftSuiteLike
from fallbackformer.evaluation.report import write_report
from fallbackformer.evaluation.shift_eval import CLEAN, Evaluation, evaluate
from fallbackformer.runtime.fallback_model import FallbackModel

__all__ = ["evaluate_and_report", "run_evaluation", "headline_metrics"]

log = logging.getLogger(__name__)


def headline_metrics(evaluation: Evaluation) -> dict[str, Any]:
    """The few numbers a run summary shows: the silent-error headline first, then clean accuracies,
    fallback rate, mCE, relative drop, flags."""
    clean = evaluation.per_set.get(CLEAN) or next(iter(evaluation.per_set.values()))
    s = evaluation.summary
    lead = ("silent_error", "silent_error_tunable", "silent_error_held_out", "useful", "best_single", "oracle_router",
            "guarantee_held_tunable", "guarantee_held_held_out")
    return {
        **{k: s.get(k) for k in lead},
        "verdict": (s.get("verdict") or {}).get("level"),
        "accuracy": clean["accuracy"],
        "fallback_rate": clean["fallback_rate"],
        "served_by": clean["served_by"],
        "ece": clean["ece"],
        "aurc": clean["aurc"],
        "latency_ms": clean["latency_ms"],
        "mean_flops": clean["flops"]["mean"],
        "mce": s.get("mce", {}),
        "relative_drop": s.get("relative_drop", {}),
        "mce_held_out": s.get("held_out", {}).get("mce", {}),
        "guarantee_broken_sets": s.get("guarantee_broken_sets", {}),
        "largest_accuracy_disparity": s.get("largest_accuracy_disparity"),
        "n_sets": len(evaluation.per_set),
    }


def evaluate_and_report(
    model: FallbackModel,
    x_test: Tensor,
    y_test: Tensor,
    suite: ShiftSuiteLike | None,
    out_dir: str | os.PathLike[str],
    *,
    title: str = "fallbackformer evaluation report",
    extra: Mapping[str, Any] | None = None,
    shift_sets: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    save_pngs: bool = True,
    **evaluate_kwargs: Any,
) -> tuple[Evaluation, dict[str, Path]]:
    """Evaluate ``model`` on ``clean`` plus every shift set and write the report into ``out_dir``.

    Args:
        model: the system.
        x_test: the clean test inputs (raw) ``[N, ...]``.
        y_test: labels ``[N]``.
        suite: the shift suite (``instantiate(cfg.shift)``); ``None`` evaluates the clean set only.
        out_dir: where report.json / report.md / report.html go.
        title: report title.
        extra: facts shown at the top of the report and stored under ``meta``.
        shift_sets: already built sets (skips ``suite.build``); ``suite`` still names the held-out ones.
        save_pngs: also write ``figures/*.png``.
        **evaluate_kwargs: passed to :func:`fallbackformer.evaluation.shift_eval.evaluate`.

    Returns:
        ``(evaluation, {"json", "md", "html", ...: path})``.

    >>> ev, paths = evaluate_and_report(model, x, y, instantiate(cfg.shift), out_dir)   # doctest: +SKIP
    """
    watch = Stopwatch()
    sets: dict[str, tuple[Tensor, Tensor]] = {CLEAN: (x_test, y_test)}
    with watch.step("build_sets"):
        if shift_sets is not None:
            sets.update(shift_sets)
        elif suite is not None:
            sets.update(suite.build(x_test, y_test))
    held = list(suite.held_out) if suite is not None else []
    with watch.step("evaluate"):
        evaluation = evaluate(model, sets, held_out=held, **evaluate_kwargs)
    info = {"shift_suite": suite.to_dict() if suite is not None else None, **dict(extra or {})}
    with watch.step("report"):
        paths = write_report(evaluation, out_dir, title=title, extra=info, save_pngs=save_pngs)
    s = evaluation.config["seconds"] = dict(watch.seconds)
    log.info("report written to %s (sets %.1fs, evaluate %.1fs, report %.1fs)", paths["html"], s["build_sets"],
             s["evaluate"], s["report"])
    return evaluation, paths


def _out_dir(cfg: Any) -> Path:
    try:
        value = cfg.get("out_dir")
    except Exception:  # ${hydra:...} outside a Hydra run
        value = None
    if value:
        return Path(value)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path("outputs/evaluate")


def run_evaluation(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``scripts/evaluate.py``: load ``cfg.bundle``, evaluate it on the test split and the shift suite.

    Args:
        cfg: the composed ``configs/evaluate.yaml`` (keys ``bundle``, ``data``, ``split``, ``shift``,
            ``evaluation``, ``report``, ``out_dir``).

    Returns:
        ``(metrics, objects)``: :func:`headline_metrics` plus the report paths, and
        ``{"model", "evaluation", "paths"}``.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import fallbackformer

    if not cfg.get("bundle"):
        raise ValueError("no bundle given; run: python scripts/evaluate.py bundle=PATH/TO/BUNDLE")
    bundle = Path(str(cfg.bundle)).expanduser()
    if not bundle.exists():
        raise FileNotFoundError(f"bundle {str(bundle)!r} does not exist; pass bundle=PATH to a directory written by fallbackformer.save")
    model = fallbackformer.load(bundle)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    split = str(cfg.get("split", "test"))
    if split not in datamodule.splits:
        raise ValueError(f"split {split!r} is not one of {sorted(datamodule.splits)}; the report uses the test split")
    x, y = datamodule.splits[split]
    suite = instantiate(cfg.shift) if cfg.get("shift") is not None else None
    ev_kwargs = OmegaConf.to_container(cfg.evaluation, resolve=True) if cfg.get("evaluation") is not None else {}
    rep = cfg.get("report") or {}
    out_dir = _out_dir(cfg)
    evaluation, paths = evaluate_and_report(
        model, x, y, suite, out_dir,
        title=str(rep.get("title", "fallbackformer evaluation report")),
        extra={"bundle": str(bundle), "split": split, "data_seed": cfg.get("seed")},
        save_pngs=bool(rep.get("save_pngs", True)),
        **ev_kwargs,
    )
    metrics = {**headline_metrics(evaluation), "report": {k: str(v) for k, v in paths.items()}}
    print(f"report: {paths['html']}")
    return metrics, {"model": model, "evaluation": evaluation, "paths": paths}
