"""The report's figures: ``{key: (caption, Figure)}`` in display order, from an :class:`Evaluation`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fallbackformer.evaluation import plots as P
from fallbackformer.evaluation.containers import CLEAN, Evaluation

__all__ = ["make_figures", "risk_coverage_under_shift", "HEADLINE_FIGURE"]

#: The key of the figure the report shows inside its first (silent-error) block.
HEADLINE_FIGURE = "risk_coverage_under_shift"


def _pool(evaluation: Evaluation, keys: Sequence[str], path: str) -> tuple[torch.Tensor, ...]:
    arrs = [evaluation.arrays[k][path] for k in keys if path in evaluation.arrays.get(k, {})]
    return tuple(torch.cat([getattr(a, f) for a in arrs]) for f in ("confidence", "probability", "correct", "accepted"))


def risk_coverage_under_shift(evaluation: Evaluation) -> tuple[str, Any] | None:
    """The system's risk-coverage curve on clean, on the tunable shift sets pooled and on the held-out
    shift sets pooled (ranked by ``FallbackOutput.confidence``; unanswered requests last).

    Returns:
        ``(caption, Figure)``, or ``None`` when there is no shift set.
    """
    shift = [k for k in evaluation.per_set if k != CLEAN]
    if not shift:
        return None
    groups = {
        "clean": [k for k in evaluation.per_set if k == CLEAN],
        "tunable shift (pooled)": [k for k in shift if not evaluation.per_set[k].get("held_out")],
        "held-out shift (pooled)": [k for k in shift if evaluation.per_set[k].get("held_out")],
    }
    curves = {}
    for label, keys in groups.items():
        if keys:
            conf, _, ok, _ = _pool(evaluation, keys, "system")
            curves[label] = (conf, ok)
    alpha = evaluation.certificate.get("alpha")
    who = "the router's" if evaluation.certificate.get("by") == "router" else "the loosest gate's"
    caption = ("Risk-coverage of the system under shift: accepting the most confident answers first (by the "
               "serving path's confidence; unanswered requests last), the share of wrong answers among those "
               "accepted; at coverage 1 an unanswered request counts as wrong. "
               f"Dashed: {who} alpha.")
    return caption, P.risk_coverage_curves(curves, "system: clean vs shift", alpha=alpha)


def make_figures(evaluation: Evaluation) -> dict[str, Any]:
    """Every report figure: ``{key: (caption, Figure)}`` in display order (the headline figure first)."""
    figs: dict[str, Any] = {}
    headline_fig = risk_coverage_under_shift(evaluation)
    if headline_fig is not None:
        figs[HEADLINE_FIGURE] = headline_fig
    s = evaluation.summary
    paths = evaluation.paths
    shift_keys = [k for k in evaluation.per_set if k != CLEAN]
    base_key = CLEAN if CLEAN in evaluation.per_set else next(iter(evaluation.per_set))

    sev_series = {p: {int(k): v for k, v in pts.items()} for p, pts in s.get("accuracy_by_severity", {}).items() if pts}
    if sev_series:
        figs["accuracy_vs_severity"] = (
            "Accuracy per path against severity (mean over corruptions; severity 0 is the clean set). "
            "Dashed: references (oracle exit, oracle router).",
            P.accuracy_vs_severity(sev_series),
        )
    fb = {"mean": {int(k): v for k, v in s.get("fallback_rate_by_severity", {}).get("mean", {}).items()}}
    for name, pts in s.get("fallback_rate_by_corruption", {}).items():
        fb[name] = {int(k): v for k, v in pts.items()}
    if len(fb["mean"]) > 1:
        figs["fallback_rate_vs_severity"] = (
            "Fallback rate (answers not served by the primary's own path) against severity, per corruption "
            "and the mean.",
            P.fallback_rate_vs_severity({"mean": fb.pop("mean"), **fb}),
        )
    sweep = evaluation.budget_sweep
    if sweep:
        budgets = sweep["budgets_ms"]
        pb = sweep.get("policy_budget_ms")
        in_range = pb is not None and budgets and min(budgets) / 2 <= pb <= max(budgets) * 2
        figs["accuracy_vs_budget"] = (
            "System accuracy (solid) and fallback rate (dashed) against the latency budget, simulated with "
            "the real runtime on a fake clock from the measured single-sample stage times "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in sweep["stage_ms"].items())
            + (f". The configured policy budget ({pb:g} ms) lies beyond the sweep: there the system behaves as at "
               "the largest budget." if pb is not None and not in_range else "."),
            P.accuracy_vs_budget(
                budgets,
                {k: v["accuracy"] for k, v in sweep["sets"].items()},
                {k: v["fallback_rate"] for k, v in sweep["sets"].items()},
                policy_budget_ms=pb if in_range else None,
            ),
        )
    drift = evaluation.drift
    if drift and drift.get("sets"):
        figs["drift_policies"] = (
            (
                "After the runtime signalled calibration_drift on a stream of one shift set (severity "
                f"{drift['config']['severity']}), the accuracy each drift policy serves on the rest of the "
                "stream; an abstaining default counts as wrong, and on_drift=default abstains on everything. "
                "Sets where the drift was never detected have no bars."
            ),
            P.drift_policy_accuracy({p: {k: e["after"][p]["accuracy"] for k, e in drift["sets"].items()}
                                     for p in ("alert", "student")}),
        )
    # exit distribution: by severity (pooled) and by corruption (pooled over severities)
    by_sev: dict[str, dict[str, float]] = {}
    by_cor: dict[str, dict[str, float]] = {}
    for k, e in evaluation.per_set.items():
        label = "clean" if e.get("severity", 0) == 0 else f"severity {e['severity']}"
        for who, c in e["served_by_counts"].items():
            by_sev.setdefault(label, {})[who] = by_sev.get(label, {}).get(who, 0) + c
            if e.get("corruption"):
                by_cor.setdefault(e["corruption"], {})[who] = by_cor.get(e["corruption"], {}).get(who, 0) + c
    figs["exit_distribution_severity"] = (
        "Who served the answers: the served_by mix on the clean set and per severity (all corruptions pooled).",
        P.exit_distribution(dict(sorted(by_sev.items(), key=lambda kv: (kv[0] != "clean", kv[0]))), title="Who served the answers, by severity"),
    )
    if by_cor:
        figs["exit_distribution_corruption"] = (
            "The served_by mix per corruption (all severities pooled). Held-out corruptions: "
            + (", ".join(evaluation.held_out) or "none") + ".",
            P.exit_distribution(by_cor, title="Who served the answers, by corruption"),
        )
    # reliability diagrams and risk-coverage curves per path on the clean set (+ system on shift)
    for p in [*paths, "system"]:
        a = evaluation.arrays[base_key].get(p)
        if a is None:
            continue
        good = torch.isfinite(a.probability)
        if p == "system":
            good &= a.accepted
        figs[f"reliability_{p}"] = (
            f"Reliability diagram, {p}, set '{base_key}' (calibrated max softmax, 15 bins"
            + ("; non-default answers only" if p == "system" else "") + ").",
            P.reliability_diagram(a.probability[good], a.correct[good], f"{p} on {base_key}"),
        )
    if shift_keys:
        conf, prob, ok, acc = _pool(evaluation, shift_keys, "system")
        good = torch.isfinite(prob) & acc
        figs["reliability_system_shift"] = (
            "Reliability diagram of the system's non-default answers on all shift sets pooled.",
            P.reliability_diagram(prob[good], ok[good], "system on all shift sets"),
        )
    for p in [*paths, "system"]:
        a = evaluation.arrays[base_key].get(p)
        if a is None:
            continue
        entry = evaluation.per_set[base_key]
        r = entry["selective_risk"].get(p, {})
        alpha = r.get("alpha")
        op = None
        if entry["coverage"].get(p) is not None and r.get("n_accepted"):
            op = (entry["coverage"][p], r["errors"] / r["n_accepted"])
        figs[f"risk_coverage_{p}"] = (
            f"Risk-coverage curve, {p}, set '{base_key}' (ranked by "
            + ("the serving path's calibrated probability; default answers last" if p == "system" else "the gate's score")
            + "). Dot: where the gate operates; dashed: its alpha.",
            P.risk_coverage_curve(a.confidence, a.correct, f"{p} on {base_key}", alpha=alpha, operating_point=op),
        )
    if shift_keys:
        conf, prob, ok, acc = _pool(evaluation, shift_keys, "system")
        r = [evaluation.per_set[k]["selective_risk"]["system"] for k in shift_keys]
        n_acc = sum(x["n_accepted"] for x in r)
        op = (n_acc / len(ok), sum(x["errors"] for x in r) / n_acc) if n_acc else None
        figs["risk_coverage_system_shift"] = (
            "Risk-coverage curve of the system on all shift sets pooled.",
            P.risk_coverage_curve(conf, ok, "system on all shift sets", alpha=r[0].get("alpha"), operating_point=op),
        )
    return figs
