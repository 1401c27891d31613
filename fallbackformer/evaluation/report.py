"""Write an :class:`~fallbackformer.evaluation.shift_eval.Evaluation` as report.json, report.md and a
self-contained report.html (every figure embedded as a base64 PNG; no external files, scripts or fonts).

>>> paths = write_report(evaluation, "outputs/eval")     # doctest: +SKIP
>>> paths["html"]                                         # doctest: +SKIP
PosixPath('outputs/eval/report.html')
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fallbackformer.evaluation import plots as P
from fallbackformer.evaluation.shift_eval import CLEAN, Evaluation

__all__ = ["write_report", "make_figures", "report_json", "render_markdown", "render_html"]

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------------
# formatting helpers


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _mflops(x: Any) -> str:
    return "–" if x is None else f"{x / 1e6:.2f}"


def _clean_json(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else (str(obj) if math.isinf(obj) else obj)
    if isinstance(obj, Mapping):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean_json(obj.tolist())
    return obj


def report_json(evaluation: Evaluation, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document: one entry per set (``clean``, ``<corruption>/<severity>``), ``summary``, ``meta``."""
    doc = evaluation.to_json()
    if extra:
        doc["meta"] = {**doc["meta"], **dict(extra)}
    return _clean_json(doc)


def _served_mix(entry: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in entry["served_by"].items() if v)


def _reasons(entry: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in entry["reasons"].items()) or "–"


# --------------------------------------------------------------------------------------------------
# figures


def _pool(evaluation: Evaluation, keys: Sequence[str], path: str) -> tuple[torch.Tensor, ...]:
    arrs = [evaluation.arrays[k][path] for k in keys if path in evaluation.arrays.get(k, {})]
    return tuple(torch.cat([getattr(a, f) for a in arrs]) for f in ("confidence", "probability", "correct", "accepted"))


def make_figures(evaluation: Evaluation) -> dict[str, Any]:
    """Every report figure: ``{key: (caption, Figure)}`` in display order."""
    figs: dict[str, Any] = {}
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
            "Fallback rate (answers by the student or the safe default) against severity, per corruption "
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


# --------------------------------------------------------------------------------------------------
# tables (shared by Markdown and HTML): lists of rows, first row = header


def _per_set_rows(ev: Evaluation) -> list[list[str]]:
    exits = [p for p in ev.paths if p.startswith("exit_")]
    head = ["set", "held out", *exits, "primary", "student", "system", "oracle exit", "oracle router",
            "fallback", "served_by", "reasons", "sel. risk (system)", "alpha", "coverage", "ECE sys", "AURC sys",
            "MFLOPs", "p50 ms", "p99 ms", "guarantee broken"]
    rows = [head]
    for k, e in ev.per_set.items():
        a = e["accuracy"]
        r = e["selective_risk"]["system"]
        rows.append([
            k, "yes" if e.get("held_out") else "", *[_f(a.get(p)) for p in exits], _f(a.get("primary")),
            _f(a.get("student")), _f(a.get("system")), _f(a.get("oracle_exit")), _f(a.get("oracle_router")),
            _pct(e["fallback_rate"]), _served_mix(e), _reasons(e), _f(r["risk"]), _f(r["alpha"]),
            _pct(e["coverage"]["system"]), _f(e["ece"].get("system")), _f(e["aurc"].get("system"), 4),
            _mflops(e["flops"]["mean"]), _f(e["latency_ms"]["p50"], 3), _f(e["latency_ms"]["p99"], 3),
            ", ".join(e["guarantee_broken"]) or "",
        ])
    return rows


def _metric_rows(ev: Evaluation, metric: str, digits: int = 3) -> list[list[str]]:
    cols = [*ev.paths, "system"]
    rows = [["set", *cols]]
    for k, e in ev.per_set.items():
        rows.append([k, *[_f(e[metric].get(p), digits) for p in cols]])
    return rows


def _risk_rows(ev: Evaluation, key: str) -> list[list[str]]:
    e = ev.per_set[key]
    rows = [["path", "kind", "method", "risk", "errors / denominator", "alpha", "delta", "CP lower", "CP upper",
             "exceeds alpha", "broken (lower > alpha)"]]
    for p, r in e["selective_risk"].items():
        rows.append([p, r.get("kind", ""), _f(r.get("method")), _f(r["risk"], 4), f"{r['errors']} / {r['denominator']}",
                     _f(r["alpha"]), _f(r["delta"]), _f(r["lower"], 4), _f(r["upper"], 4),
                     "YES" if r["violated"] else "", "BROKEN" if r["significant"] else ""])
    return rows


def _summary_rows(ev: Evaluation) -> list[list[str]]:
    s = ev.summary
    cols = list(s.get("mce", {}))
    rows = [["metric", *cols]]
    for label, block in (("all shift sets", s), ("tunable corruptions", s.get("tuning", {})),
                         ("held-out corruptions", s.get("held_out", {}))):
        if not block.get("mce"):
            continue
        rows.append([f"mCE, {label}", *[_f(block["mce"].get(c)) for c in cols]])
        rows.append([f"mCE / mCE({s.get('baseline_path')}), {label}", *[_f(block["mce_normalised"].get(c)) for c in cols]])
        rows.append([f"relative drop from clean, {label}", *[_pct(block["relative_drop"].get(c)) for c in cols]])
    return rows


def _ce_rows(ev: Evaluation) -> list[list[str]]:
    ce = ev.summary.get("corruption_errors", {})
    if not ce:
        return []
    cols = list(ce)
    names = list(next(iter(ce.values())))
    rows = [["corruption", "held out", *cols]]
    for n in names:
        rows.append([n, "yes" if n in ev.held_out else "", *[_f(ce[c].get(n)) for c in cols]])
    return rows


def _slice_rows(ev: Evaluation, key: str) -> list[list[str]]:
    pc = ev.per_set[key]["slices"]["per_class"]
    rows = [["class", "n", "accuracy (system)", "accuracy (primary)", "fallback rate"]]
    for c, v in pc.items():
        rows.append([c, str(v["n"]), _f(v["accuracy"]), _f(v["accuracy_primary"]), _pct(v["fallback_rate"])])
    return rows


def _disparity_rows(ev: Evaluation) -> list[list[str]]:
    rows = [["set", "accuracy gap", "worst class (acc)", "best class (acc)", "fallback gap", "worst class (fallback)"]]
    for k, e in ev.per_set.items():
        d = e["slices"]["max_disparity"]
        a, f = d.get("accuracy", {}), d.get("fallback_rate", {})
        rows.append([k, _f(a.get("gap")), f"{a.get('worst_class')} ({_f(a.get('worst'))})",
                     f"{a.get('best_class')} ({_f(a.get('best'))})", _pct(f.get("gap")),
                     f"{f.get('worst_class')} ({_pct(f.get('worst'))})"])
    return rows


def _drift_rows(ev: Evaluation) -> list[list[str]]:
    drift = ev.drift or {}
    rows = [["set", "held out", "detected after (requests)", "alert: accuracy", "alert: coverage",
             "student: accuracy", "student: coverage", "better after detection"]]
    for k, e in drift.get("sets", {}).items():
        a, st = e["after"]["alert"], e["after"]["student"]
        better = ""
        if a["accuracy"] is not None and st["accuracy"] is not None:
            better = "student" if st["accuracy"] > a["accuracy"] else ("alert" if a["accuracy"] > st["accuracy"] else "tie")
        rows.append([k, "yes" if e["held_out"] else "", _f(e["detected_after"]) if e["detected_after"] else "never",
                     _f(a["accuracy"]), _pct(a["coverage"]), _f(st["accuracy"]), _pct(st["coverage"]), better])
    return rows


def _drift_line(ev: Evaluation) -> str | None:
    drift = ev.drift
    if not drift:
        return None
    if "skipped" in drift:
        return f"Calibration drift study skipped: {drift['skipped']}."
    c, sm = drift["config"], drift["summary"]
    clean = drift.get("clean")
    alarm = ("" if clean is None else
             f"a clean stream of {clean['requests']} requests raised "
             + ("a FALSE ALARM" if clean["false_alarm"] else "no false alarm") + "; ")
    acc = sm["mean_accuracy_after"]
    better = sm["student_better"]
    return (
        f"Calibration drift (check on gate {c['gate']}, window {c['window']}, level {c['level']} over "
        f"{c['horizon']} requests): {alarm}streams of {c['requests']} requests from each severity-{c['severity']} "
        f"set raised it on {sm['detected']} of {sm['n_sets']} sets, after a median of "
        f"{_f(sm['median_detected_after'])} requests. After detection the mean accuracy is "
        f"{_f(acc.get('alert'))} with on_drift=alert and {_f(acc.get('student'))} with on_drift=student "
        f"(better on {len(better)} sets: {', '.join(better) or 'none'}); on_drift=default abstains."
    )


def _gate_rows(ev: Evaluation) -> list[list[str]]:
    rows = [["path", "method", "alpha", "delta", "threshold", "temperature", "score", "FLOPs when it serves", "FLOPs alone"]]
    for p, g in ev.gates.items():
        rows.append([p, _f(g.get("method")), _f(g.get("alpha")), _f(g.get("delta")), _f(g.get("threshold"), 4),
                     _f(g.get("temperature"), 3), _f(g.get("score")),
                     _f(ev.flops["cascade"].get(p, ev.flops["fallback"] if p == "student" else None)),
                     _f(ev.flops["alone"].get(p))])
    return rows


def _oracle_rows(ev: Evaluation, key: str) -> list[list[str]]:
    e = ev.per_set[key]
    rows = [["oracle exit: cheapest correct exit", "fraction"]]
    for k, v in e["oracle_exit_distribution"].items():
        rows.append([k, _pct(v)])
    rows.append(["mean MFLOPs of the oracle exit", _mflops(e["flops"]["oracle_exit"])])
    rows.append(["mean MFLOPs of the system", _mflops(e["flops"]["mean"])])
    rows.append(["accuracy oracle exit / oracle router / system",
                 f"{_f(e['accuracy']['oracle_exit'])} / {_f(e['accuracy']['oracle_router'])} / {_f(e['accuracy']['system'])}"])
    return rows


# --------------------------------------------------------------------------------------------------
# Markdown


def _md_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    out = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in esc[0]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(out)


def _headline(ev: Evaluation) -> list[str]:
    s = ev.summary
    lines = []
    broken = s.get("guarantee_broken_sets", {})
    if broken:
        listed = list(broken.items())[:8]
        more = f"; ... and {len(broken) - len(listed)} more (see the per-set table)" if len(broken) > len(listed) else ""
        clean_note = " INCLUDING THE CLEAN SET" if CLEAN in broken else ""
        lines.append(
            f"Guarantee BROKEN (one-sided Clopper-Pearson lower bound above alpha) on {len(broken)} of "
            f"{len(ev.per_set)} sets{clean_note}: " + "; ".join(f"{k} ({', '.join(v)})" for k, v in listed) + more
        )
    else:
        lines.append("No set shows a significant guarantee violation (Clopper-Pearson lower bound above alpha).")
    d = s.get("largest_accuracy_disparity")
    if d and d["gap"] <= 0:
        lines.append("No per-class accuracy disparity on any set.")
    elif d:
        lines.append(
            f"Largest per-class accuracy disparity: set {d['set']}, class {d['worst_class']} "
            f"{_f(d['worst'])} vs class {d['best_class']} {_f(d['best'])} (gap {_f(d['gap'])})."
        )
    d = s.get("largest_fallback_disparity")
    if d and d["gap"] <= 0:
        lines.append("No per-class fallback-rate disparity on any set (equal fallback rates in every class).")
    elif d:
        lines.append(
            f"Largest per-class fallback-rate disparity: set {d['set']}, class {d['worst_class']} "
            f"{_pct(d['worst'])} vs class {d['best_class']} {_pct(d['best'])}."
        )
    if s.get("mce"):
        lines.append(
            f"mCE system {_f(s['mce'].get('system'))} (primary {_f(s['mce'].get('primary'))}); relative drop from "
            f"clean: system {_pct(s['relative_drop'].get('system'))}, primary {_pct(s['relative_drop'].get('primary'))}."
        )
    if s.get("worst_set"):
        lines.append(f"Worst set: {s['worst_set']['set']} (system accuracy {_f(s['worst_set']['accuracy_system'])}).")
    return lines


def render_markdown(ev: Evaluation, title: str, figure_files: Mapping[str, str] | None = None,
                    extra: Mapping[str, Any] | None = None) -> str:
    """report.md: the headline, every table, and links to the PNGs (if written)."""
    base = CLEAN if CLEAN in ev.per_set else next(iter(ev.per_set))
    parts = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}."]
    if extra:
        parts += ["", *[f"- **{k}**: {v}" for k, v in extra.items() if not isinstance(v, (dict, list))]]
    parts += ["", "## Headline", "", *[f"- {l}" for l in _headline(ev)]]
    parts += ["", "## Paths and gates", "", _md_table(_gate_rows(ev))]
    parts += ["", "## Across severities", "", _md_table(_summary_rows(ev)), "", "Corruption errors (mean over severities):", "",
              _md_table(_ce_rows(ev))]
    drift_line = _drift_line(ev)
    if drift_line:
        parts += ["", "## Calibration drift", "", drift_line]
        if ev.drift and ev.drift.get("sets"):
            parts += ["", _md_table(_drift_rows(ev))]
    parts += ["", "## Per set", "", _md_table(_per_set_rows(ev))]
    parts += ["", f"## Selective risk against alpha ({base})", "", _md_table(_risk_rows(ev, base))]
    parts += ["", "## ECE per path", "", _md_table(_metric_rows(ev, "ece"))]
    parts += ["", "## AURC per path", "", _md_table(_metric_rows(ev, "aurc", 4))]
    parts += ["", "## Coverage per path (gate alone)", "", _md_table(_metric_rows(ev, "coverage"))]
    parts += ["", f"## Slices ({base})", "", _md_table(_slice_rows(ev, base)), "", "Largest disparity per set:", "",
              _md_table(_disparity_rows(ev))]
    parts += ["", f"## References ({base})", "", _md_table(_oracle_rows(ev, base))]
    if figure_files:
        parts += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in figure_files.items()]
    parts += ["", "## Definitions", "", _DEFINITIONS_MD]
    return "\n".join(parts) + "\n"


_DEFINITIONS_MD = """\
- *fallback rate*: answers served by the student or the safe default.
- *selective risk* `system`: errors among non-default answers, against the loosest gate alpha; per path: the
  gate applied alone on that path's logits (selective risk for ltt_binom/ltt_hb/empirical, joint risk for crc).
  *exceeds alpha*: the point estimate is above alpha; *broken*: the one-sided Clopper-Pearson lower bound at
  level delta is above alpha.
- *coverage*: `system`: non-default answers; per path: what the gate accepts alone.
- *ECE*: 15 equal-width bins on the calibrated max softmax (torchmetrics). *AURC*: mean selective risk over
  all coverages, ranked by the gate score, ties in expectation.
- *mCE*: mean over corruptions of the error averaged over severities; normalised: divided by the same for the
  baseline path. *relative drop*: (clean accuracy - mean shifted accuracy) / clean accuracy.
- *oracle exit*: cheapest correct exit; *oracle router*: primary or student, whichever is right.
- *calibration drift*: `detected after`: requests of the shift stream up to the call that raised
  `calibration_drift`; `accuracy` / `coverage` after detection: on the later requests of the same stream, with
  `on_drift=alert` (answers as before) or `on_drift=student` (the student answers; where its gate rejects, the
  default); an abstaining default counts as wrong and as not covered.
- *MFLOPs*: FlopCounterMode per path, combined with the served_by mix (student and default answers
  count the whole primary plus the student). *p50/p99*: single-sample calls on the model's clock.
"""


# --------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1800px}
h1{margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px 0;font-size:12px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafafa}
tr.broken td{background:#fde2e2 !important} tr.exceeded td{background:#fff4e0}
tr.heldout td:first-child{font-style:italic}
.callout{padding:10px 14px;margin:8px 0;border-radius:6px;border:1px solid}
.bad{background:#fde2e2;border-color:#e0a0a0} .good{background:#e6f4ea;border-color:#9ccaa8}
.hl{background:#fff3a0;border-color:#e0c84a}
td.hl{background:#fff3a0 !important;font-weight:bold}
.figs{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;border:1px solid #ddd;padding:6px;background:#fff;max-width:660px}
figure img{max-width:100%;display:block} figcaption{font-size:12px;color:#444;margin-top:4px}
.scroll{overflow-x:auto} .meta{color:#666;font-size:12px}
"""


def _md_inline(text: str) -> str:
    """Escape, then render Markdown's *emphasis* and `code` (the only inline marks the report uses)."""
    out = html.escape(text)
    out = re.sub(r"\*([^*]+)\*", r"<i>\1</i>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _html_table(rows: list[list[str]], row_classes: Sequence[str] | None = None,
                cell_classes: Mapping[tuple[int, int], str] | None = None) -> str:
    if not rows:
        return ""
    out = ['<div class="scroll"><table><thead><tr>']
    out += [f"<th>{html.escape(c)}</th>" for c in rows[0]]
    out.append("</tr></thead><tbody>")
    for i, r in enumerate(rows[1:]):
        cls = row_classes[i] if row_classes and i < len(row_classes) else ""
        out.append(f'<tr class="{cls}">' if cls else "<tr>")
        for j, c in enumerate(r):
            cc = (cell_classes or {}).get((i, j))
            out.append(f'<td class="{cc}">{html.escape(c)}</td>' if cc else f"<td>{html.escape(c)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def render_html(ev: Evaluation, title: str, figures: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """A self-contained HTML page (inline CSS, base64 PNGs).

    Args:
        ev: the evaluation.
        title: page title.
        figures: ``{key: (caption, Figure or PNG bytes)}`` (:func:`make_figures`).
        extra: facts shown at the top.
    """
    base = CLEAN if CLEAN in ev.per_set else next(iter(ev.per_set))
    s = ev.summary
    h: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}; {len(ev.per_set)} sets; paths "
        f"{html.escape(', '.join(ev.paths))}; held-out corruptions (never used for tuning): "
        f"{html.escape(', '.join(ev.held_out) or 'none')}.</p>",
    ]
    if extra:
        h.append("<p class='meta'>" + "<br>".join(
            f"<b>{html.escape(str(k))}</b>: {html.escape(str(v))}" for k, v in extra.items() if not isinstance(v, (dict, list))
        ) + "</p>")
    # headline call-outs
    broken = s.get("guarantee_broken_sets", {})
    lines = _headline(ev)
    h.append(f"<div class='callout {'bad' if broken else 'good'}'><b>Guarantees.</b> {html.escape(lines[0])}</div>")
    for line in lines[1:]:
        cls = "hl" if "disparity" in line else "good"
        h.append(f"<div class='callout {cls}'>{html.escape(line)}</div>")

    h.append("<h2>Paths and gates</h2>" + _html_table(_gate_rows(ev)))
    h.append("<h2>Across severities</h2>" + _html_table(_summary_rows(ev)))
    ce = _ce_rows(ev)
    if ce:
        h.append("<p>Corruption errors (mean over severities):</p>" + _html_table(ce))

    drift_line = _drift_line(ev)
    if drift_line:
        h.append("<h2>Calibration drift</h2><p>" + html.escape(drift_line) + "</p>")
        if ev.drift and ev.drift.get("sets"):
            dr_rows = _drift_rows(ev)
            h.append(_html_table(dr_rows, ["heldout" if r[1] else "" for r in dr_rows[1:]]))

    # figures
    h.append("<h2>Figures</h2><div class='figs'>")
    for key, (caption, fig) in figures.items():
        png = fig if isinstance(fig, bytes) else P.figure_to_png(fig)
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        h.append(f"<figure id='fig-{html.escape(key)}'><img alt='{html.escape(key)}' src='{src}'>"
                 f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    h.append("</div>")

    # per-set table with flags
    rows = _per_set_rows(ev)
    classes = []
    for k, e in ev.per_set.items():
        c = "broken" if e["guarantee_broken"] else ("exceeded" if e["guarantee_exceeded"] else "")
        if e.get("held_out"):
            c += " heldout"
        classes.append(c.strip())
    h.append("<h2>Per set</h2><p>Rows in red: a guarantee is broken (Clopper-Pearson lower bound above alpha) "
             "for the listed paths; orange: a risk exceeds alpha but not significantly. Italic: held-out "
             "corruption.</p>" + _html_table(rows, classes))
    h.append(f"<h2>Selective risk against alpha ({html.escape(base)})</h2>")
    rr = _risk_rows(ev, base)
    h.append(_html_table(rr, ["broken" if r[-1] else ("exceeded" if r[-2] else "") for r in rr[1:]]))
    if broken:
        h.append("<p>Sets with a broken guarantee and the paths concerned:</p>" + _html_table(
            [["set", "paths"], *[[k, ", ".join(v)] for k, v in broken.items()]], ["broken"] * len(broken)))
    for metric, label, d in (("ece", "ECE per path (15 bins)", 3), ("aurc", "AURC per path", 4),
                             ("coverage", "Coverage per path (gate alone; system: non-default answers)", 3)):
        h.append(f"<h2>{label}</h2>" + _html_table(_metric_rows(ev, metric, d)))

    # slices, disparity highlighted
    h.append(f"<h2>Slices: per class ({html.escape(base)})</h2>")
    sl = _slice_rows(ev, base)
    disp = ev.per_set[base]["slices"]["max_disparity"]
    cells = {}
    for i, r in enumerate(sl[1:]):
        if disp.get("accuracy") and r[0] in (disp["accuracy"]["worst_class"], disp["accuracy"]["best_class"]) and disp["accuracy"]["gap"] > 0:
            cells[(i, 2)] = "hl"
        if disp.get("fallback_rate") and r[0] in (disp["fallback_rate"]["worst_class"], disp["fallback_rate"]["best_class"]) and disp["fallback_rate"]["gap"] > 0:
            cells[(i, 4)] = "hl"
    h.append(_html_table(sl, cell_classes=cells))
    dr = _disparity_rows(ev)
    worst = (s.get("largest_accuracy_disparity") or {}).get("set")
    h.append("<p>Largest per-class disparity in every set (the largest overall highlighted):</p>")
    h.append(_html_table(dr, ["hl" if r[0] == worst else "" for r in dr[1:]],
                         {(i, 1): "hl" for i, r in enumerate(dr[1:]) if r[0] == worst}))
    h.append(f"<h2>References ({html.escape(base)})</h2>" + _html_table(_oracle_rows(ev, base)))
    h.append("<h2>Definitions</h2><ul>" + "".join(
        f"<li>{_md_inline(l[2:])}</li>" for l in _DEFINITIONS_MD.replace("\n  ", " ").splitlines() if l.startswith("- ")
    ) + "</ul>")
    h.append("</body></html>")
    return "\n".join(h)


# --------------------------------------------------------------------------------------------------
# entry point


def write_report(
    evaluation: Evaluation,
    out_dir: PathLike,
    title: str = "fallbackformer evaluation report",
    extra: Mapping[str, Any] | None = None,
    save_pngs: bool = True,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` (and ``figures/*.png``) into ``out_dir``.

    Args:
        evaluation: the result of :func:`fallbackformer.evaluation.shift_eval.evaluate`.
        out_dir: the directory (created).
        title: the report title.
        extra: facts shown at the top and stored under ``meta`` in report.json (bundle path, manifest
            summary, ...); scalar values are displayed.
        save_pngs: also write every figure as a PNG under ``out_dir/figures`` (report.md links them).

    Returns:
        ``{"json": path, "md": path, "html": path}`` (plus ``"figures"`` when written).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {k: (cap, P.figure_to_png(fig)) for k, (cap, fig) in make_figures(evaluation).items()}  # render once
    paths: dict[str, Path] = {}
    files: dict[str, str] = {}
    if save_pngs:
        fig_dir = out / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        for key, (_, png) in figures.items():
            (fig_dir / f"{key}.png").write_bytes(png)
            files[key] = f"figures/{key}.png"
        paths["figures"] = fig_dir
    doc = report_json(evaluation, extra)
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(doc, indent=1, allow_nan=False))
    paths["md"] = out / "report.md"
    paths["md"].write_text(render_markdown(evaluation, title, files, extra))
    paths["html"] = out / "report.html"
    paths["html"].write_text(render_html(evaluation, title, figures, extra))
    return paths
