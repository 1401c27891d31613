"""Across sets: the silent-error headline, guarantee tallies, failure detection under shift, mCE and
relative drop, per-severity means, flagged sets, and the verdict the report's first callout shows.

Headline definitions (exact; "shift sets" are the ``<corruption>/<severity>`` sets, "tunable" those whose
corruption is not held out):

* ``silent_error`` / ``_tunable`` / ``_held_out``: mean over those sets of the per-set silent error
  (answered and wrong / requests); ``useful`` likewise for answered and right.
* ``best_single``: per set the better accuracy of the primary alone and the student alone, averaged
  over all shift sets; ``oracle_router``: the mean oracle-router accuracy over all shift sets.
* ``guarantee_held_tunable`` / ``guarantee_held_held_out``: the fraction of those sets whose guarantee
  holds (:func:`fallbackformer.evaluation.guarantee_eval.set_guarantee`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fallbackformer.evaluation import metrics as M
from fallbackformer.common.jsonsafe import json_safe
from fallbackformer.evaluation.containers import CLEAN, split_set_key
from fallbackformer.runtime import reasons as R

__all__ = ["summarize", "headline", "failure_detection_summary", "verdict", "GOOD_NEWS"]

#: The callout is green only when every one of these holds.
GOOD_NEWS: dict[str, float] = {
    "silent_error_max": 0.10,
    "useful_below_best_single_max": 0.03,
    "guarantee_held_tunable_min": 0.90,
    "guarantee_held_held_out_min": 0.75,
}


def _nan_none(x: float | None) -> float | None:
    return None if x is None or x != x else x


def _mean(values: Iterable[float | None]) -> float | None:
    v = [float(x) for x in values if x is not None]
    return sum(v) / len(v) if v else None


def _shift_groups(per_set: Mapping[str, Mapping[str, Any]], held_out: Iterable[str]) -> dict[str, list[str]]:
    held = set(held_out)
    shift = [k for k in per_set if split_set_key(k)]
    return {
        "all": shift,
        "tunable": [k for k in shift if split_set_key(k)[0] not in held],  # type: ignore[index]
        "held_out": [k for k in shift if split_set_key(k)[0] in held],  # type: ignore[index]
    }


def headline(per_set: Mapping[str, Mapping[str, Any]], held_out: Iterable[str] = ()) -> dict[str, Any]:
    """The silent-error headline across sets (definitions in the module docstring).

    Args:
        per_set: per-set metrics with ``silent_error``, ``useful``, ``best_single``, ``accuracy`` and
            ``guarantee`` (``{"holds": bool, ...}``).
        held_out: held-out corruption names.

    Returns:
        ``{"silent_error", "silent_error_tunable", "silent_error_held_out", "silent_error_clean",
        "useful", "useful_tunable", "useful_held_out", "useful_clean", "best_single", "oracle_router",
        "guarantee_held_tunable", "guarantee_held_held_out", "guarantee_by", "n_sets": {...}}``;
        a mean over no sets is ``None``.
    """
    g = _shift_groups(per_set, held_out)

    def mean_of(field: str, keys: Sequence[str]) -> float | None:
        return _mean(per_set[k].get(field) for k in keys)

    def held(keys: Sequence[str]) -> float | None:
        return _mean(float(bool(per_set[k]["guarantee"]["holds"])) for k in keys if "guarantee" in per_set[k])

    clean = per_set.get(CLEAN, {})
    by = next((e["guarantee"]["by"] for e in per_set.values() if "guarantee" in e), None)
    return {
        "silent_error": mean_of("silent_error", g["all"]),
        "silent_error_tunable": mean_of("silent_error", g["tunable"]),
        "silent_error_held_out": mean_of("silent_error", g["held_out"]),
        "silent_error_clean": clean.get("silent_error"),
        "useful": mean_of("useful", g["all"]),
        "useful_tunable": mean_of("useful", g["tunable"]),
        "useful_held_out": mean_of("useful", g["held_out"]),
        "useful_clean": clean.get("useful"),
        "best_single": mean_of("best_single", g["all"]),
        "oracle_router": _mean(per_set[k]["accuracy"].get("oracle_router") for k in g["all"]),
        "guarantee_held_tunable": held(g["tunable"]),
        "guarantee_held_held_out": held(g["held_out"]),
        "guarantee_held_clean": float(bool(clean["guarantee"]["holds"])) if "guarantee" in clean else None,
        "guarantee_by": by,
        "n_sets": {k: len(v) for k, v in g.items()},
    }


def failure_detection_summary(
    per_set: Mapping[str, Mapping[str, Any]], held_out: Iterable[str] = ()
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Failure-detection AUROC and AURC per path and for the system: on clean, and averaged over the
    tunable and the held-out shift sets (sets where a number is undefined are left out of its mean).

    Returns:
        ``{"clean" | "tunable" | "held_out": {path or "system": {"auroc", "aurc"}}}``.
    """
    g = _shift_groups(per_set, held_out)
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    if CLEAN in per_set and "failure_detection" in per_set[CLEAN]:
        out["clean"] = {p: dict(v) for p, v in per_set[CLEAN]["failure_detection"].items()}
    for group in ("tunable", "held_out"):
        keys = [k for k in g[group] if "failure_detection" in per_set[k]]
        if not keys:
            continue
        names = list(per_set[keys[0]]["failure_detection"])
        out[group] = {
            p: {m: _mean(per_set[k]["failure_detection"][p][m] for k in keys) for m in ("auroc", "aurc")}
            for p in names
        }
    return out


def verdict(summary: Mapping[str, Any], good: Mapping[str, float] = GOOD_NEWS) -> dict[str, Any]:
    """Whether the headline is good news, and which figures fail, in plain words.

    ``green``: every :data:`GOOD_NEWS` condition holds; ``red``: silent errors above twice the limit,
    useful answers more than 0.10 below the best single model, or the guarantee held on under half of
    the tunable sets; ``amber`` otherwise. A figure that is missing (no such sets) neither passes nor
    fails.

    Returns:
        ``{"level": "green" | "amber" | "red", "failures": [sentence, ...]}``.
    """
    fails: list[str] = []
    red = False
    se, use, best = summary.get("silent_error"), summary.get("useful"), summary.get("best_single")
    ht, hh = summary.get("guarantee_held_tunable"), summary.get("guarantee_held_held_out")
    if se is not None and se > good["silent_error_max"]:
        fails.append(f"The system answers wrongly without warning on {100 * se:.1f}% of shifted requests "
                     f"(the limit is {100 * good['silent_error_max']:.0f}%).")
        red |= se > 2 * good["silent_error_max"]
    if use is not None and best is not None and use < best - good["useful_below_best_single_max"]:
        fails.append(f"It answers correctly on {100 * use:.1f}% of shifted requests, {100 * (best - use):.1f} "
                     f"points below the better single model ({100 * best:.1f}%).")
        red |= use < best - 0.10
    if ht is not None and ht < good["guarantee_held_tunable_min"]:
        fails.append(f"The guarantee held on {100 * ht:.0f}% of the tunable shift sets "
                     f"(at least {100 * good['guarantee_held_tunable_min']:.0f}% wanted).")
        red |= ht < 0.5
    if hh is not None and hh < good["guarantee_held_held_out_min"]:
        fails.append(f"The guarantee held on {100 * hh:.0f}% of the held-out shift sets "
                     f"(at least {100 * good['guarantee_held_held_out_min']:.0f}% wanted).")
    return {"level": "green" if not fails else ("red" if red else "amber"), "failures": fails}


def summarize(
    per_set: Mapping[str, Mapping[str, Any]],
    held_out: Iterable[str] = (),
    baseline_path: str = R.PRIMARY,
) -> dict[str, Any]:
    """Metrics across sets: the silent-error headline first, then mCE and relative drop per path,
    per-severity means, flagged sets.

    Args:
        per_set: :func:`~fallbackformer.evaluation.shift_eval.evaluate`'s per-set metrics (``clean``
            plus ``<corruption>/<severity>`` keys).
        held_out: corruption names never used for tuning; also summarised on their own.
        baseline_path: the path whose errors normalise ``mce_normalised`` (Hendrycks-style).

    Returns:
        ``{**headline(...), "failure_detection": {...}, "verdict": {...}, "mce": {path: mCE},
        "mce_normalised": {...}, "relative_drop": {...}, "corruption_errors": {...},
        "by_severity": {...}, "held_out": {...}, "tuning": {...}, "guarantee_broken_sets": {...}, ...}``.
    """
    held = set(held_out)
    shift_keys = [k for k in per_set if split_set_key(k)]
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
                out["mce_normalised"][p] = _nan_none(M.mean_corruption_error(errs, base))
            except ValueError:
                out["mce_normalised"][p] = None
            if clean is not None and clean["accuracy"].get(p) is not None:
                out["relative_drop"][p] = _nan_none(
                    M.relative_drop(clean["accuracy"][p], [per_set[k]["accuracy"][p] for k in errs])
                )
        fb = [per_set[k]["fallback_rate"] for k in keys if per_set[k]["fallback_rate"] is not None]
        out["mean_fallback_rate"] = sum(fb) / len(fb) if fb else None
        return out

    summary: dict[str, Any] = block(shift_keys)
    summary["baseline_path"] = baseline_path
    summary["tuning"] = block([k for k in shift_keys if split_set_key(k)[0] not in held])  # type: ignore[index]
    summary["held_out"] = block([k for k in shift_keys if split_set_key(k)[0] in held])  # type: ignore[index]
    summary["held_out"]["corruptions"] = sorted({split_set_key(k)[0] for k in shift_keys if split_set_key(k)[0] in held})  # type: ignore[index]

    # per-severity means (severity 0 = clean)
    by_sev: dict[str, dict[int, float]] = {p: {} for p in paths}
    fb_sev: dict[str, dict[int, float]] = {"mean": {}}
    sevs = sorted({split_set_key(k)[1] for k in shift_keys})  # type: ignore[index]
    for p in paths:
        if clean is not None and clean["accuracy"].get(p) is not None:
            by_sev[p][0] = clean["accuracy"][p]
        for s in sevs:
            v = [per_set[k]["accuracy"][p] for k in shift_keys if split_set_key(k)[1] == s and per_set[k]["accuracy"].get(p) is not None]  # type: ignore[index]
            if v:
                by_sev[p][s] = sum(v) / len(v)
    if clean is not None:
        fb_sev["mean"][0] = clean["fallback_rate"]
    for s in sevs:
        v = [per_set[k]["fallback_rate"] for k in shift_keys if split_set_key(k)[1] == s]  # type: ignore[index]
        fb_sev["mean"][s] = sum(v) / len(v)
    per_corruption_fb: dict[str, dict[int, float]] = {}
    for k in shift_keys:
        name, s = split_set_key(k)  # type: ignore[misc]
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
    head = headline(per_set, held)
    head["failure_detection"] = failure_detection_summary(per_set, held)
    head["verdict"] = verdict(head)
    return json_safe({**head, **summary})
