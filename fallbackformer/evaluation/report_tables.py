"""The report's tables and sentences, shared by Markdown and HTML: lists of rows (first row = header)
and the formatting of numbers in them."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fallbackformer.common.paths import exit_index
from fallbackformer.evaluation.containers import CLEAN, Evaluation

__all__ = [
    "fmt", "pct", "mflops", "md_table", "html_table", "per_set_rows", "metric_rows", "risk_rows", "summary_rows",
    "ce_rows", "slice_rows", "disparity_rows", "drift_rows", "drift_line", "gate_rows", "oracle_rows",
    "guarantee_lines", "headline_rows", "silent_error_rows", "failure_detection_rows", "verdict_text",
]


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: 3 decimals by default, ints as they are, ``–`` for missing or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def pct(x: Any) -> str:
    """A share as a percentage with one decimal; ``–`` for missing or NaN."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def mflops(x: Any) -> str:
    """FLOPs as MFLOPs with two decimals."""
    return "–" if x is None else f"{x / 1e6:.2f}"


def _served_mix(entry: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in entry["served_by"].items() if v)


def _reasons(entry: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in entry["reasons"].items()) or "–"


# --------------------------------------------------------------------------------------------------
# figures


def per_set_rows(ev: Evaluation) -> list[list[str]]:
    exits = [p for p in ev.paths if exit_index(p) is not None]
    head = ["set", "held out", *exits, "primary", "student", "system", "oracle exit", "oracle router",
            "fallback", "served_by", "reasons", "sel. risk (system)", "alpha", "coverage", "ECE sys", "AURC sys",
            "MFLOPs", "p50 ms", "p99 ms", "guarantee broken"]
    rows = [head]
    for k, e in ev.per_set.items():
        a = e["accuracy"]
        r = e["selective_risk"]["system"]
        rows.append([
            k, "yes" if e.get("held_out") else "", *[fmt(a.get(p)) for p in exits], fmt(a.get("primary")),
            fmt(a.get("student")), fmt(a.get("system")), fmt(a.get("oracle_exit")), fmt(a.get("oracle_router")),
            pct(e["fallback_rate"]), _served_mix(e), _reasons(e), fmt(r["risk"]), fmt(r["alpha"]),
            pct(e["coverage"]["system"]), fmt(e["ece"].get("system")), fmt(e["aurc"].get("system"), 4),
            mflops(e["flops"]["mean"]), fmt(e["latency_ms"]["p50"], 3), fmt(e["latency_ms"]["p99"], 3),
            ", ".join(e["guarantee_broken"]) or "",
        ])
    return rows


def metric_rows(ev: Evaluation, metric: str, digits: int = 3) -> list[list[str]]:
    cols = [*ev.paths, "system"]
    rows = [["set", *cols]]
    for k, e in ev.per_set.items():
        rows.append([k, *[fmt(e[metric].get(p), digits) for p in cols]])
    return rows


def risk_rows(ev: Evaluation, key: str) -> list[list[str]]:
    e = ev.per_set[key]
    rows = [["path", "kind", "method", "risk", "errors / denominator", "alpha", "delta", "CP lower", "CP upper",
             "exceeds alpha", "broken (lower > alpha)"]]
    for p, r in e["selective_risk"].items():
        rows.append([p, r.get("kind", ""), fmt(r.get("method")), fmt(r["risk"], 4), f"{r['errors']} / {r['denominator']}",
                     fmt(r["alpha"]), fmt(r["delta"]), fmt(r["lower"], 4), fmt(r["upper"], 4),
                     "YES" if r["violated"] else "", "BROKEN" if r["significant"] else ""])
    return rows


def summary_rows(ev: Evaluation) -> list[list[str]]:
    s = ev.summary
    cols = list(s.get("mce", {}))
    rows = [["metric", *cols]]
    for label, block in (("all shift sets", s), ("tunable corruptions", s.get("tuning", {})),
                         ("held-out corruptions", s.get("held_out", {}))):
        if not block.get("mce"):
            continue
        rows.append([f"mCE, {label}", *[fmt(block["mce"].get(c)) for c in cols]])
        rows.append([f"mCE / mCE({s.get('baseline_path')}), {label}", *[fmt(block["mce_normalised"].get(c)) for c in cols]])
        rows.append([f"relative drop from clean, {label}", *[pct(block["relative_drop"].get(c)) for c in cols]])
    return rows


def ce_rows(ev: Evaluation) -> list[list[str]]:
    ce = ev.summary.get("corruption_errors", {})
    if not ce:
        return []
    cols = list(ce)
    names = list(next(iter(ce.values())))
    rows = [["corruption", "held out", *cols]]
    for n in names:
        rows.append([n, "yes" if n in ev.held_out else "", *[fmt(ce[c].get(n)) for c in cols]])
    return rows


def slice_rows(ev: Evaluation, key: str) -> list[list[str]]:
    pc = ev.per_set[key]["slices"]["per_class"]
    rows = [["class", "n", "accuracy (system)", "accuracy (primary)", "fallback rate"]]
    for c, v in pc.items():
        rows.append([c, str(v["n"]), fmt(v["accuracy"]), fmt(v["accuracy_primary"]), pct(v["fallback_rate"])])
    return rows


def disparity_rows(ev: Evaluation) -> list[list[str]]:
    rows = [["set", "accuracy gap", "worst class (acc)", "best class (acc)", "fallback gap", "worst class (fallback)"]]
    for k, e in ev.per_set.items():
        d = e["slices"]["max_disparity"]
        a, f = d.get("accuracy", {}), d.get("fallback_rate", {})
        rows.append([k, fmt(a.get("gap")), f"{a.get('worst_class')} ({fmt(a.get('worst'))})",
                     f"{a.get('best_class')} ({fmt(a.get('best'))})", pct(f.get("gap")),
                     f"{f.get('worst_class')} ({pct(f.get('worst'))})"])
    return rows


def drift_rows(ev: Evaluation) -> list[list[str]]:
    drift = ev.drift or {}
    rows = [["set", "held out", "detected after (requests)", "alert: accuracy", "alert: coverage",
             "student: accuracy", "student: coverage", "better after detection"]]
    for k, e in drift.get("sets", {}).items():
        a, st = e["after"]["alert"], e["after"]["student"]
        better = ""
        if a["accuracy"] is not None and st["accuracy"] is not None:
            better = "student" if st["accuracy"] > a["accuracy"] else ("alert" if a["accuracy"] > st["accuracy"] else "tie")
        rows.append([k, "yes" if e["held_out"] else "", fmt(e["detected_after"]) if e["detected_after"] else "never",
                     fmt(a["accuracy"]), pct(a["coverage"]), fmt(st["accuracy"]), pct(st["coverage"]), better])
    return rows


def drift_line(ev: Evaluation) -> str | None:
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
        f"{fmt(sm['median_detected_after'])} requests. After detection the mean accuracy is "
        f"{fmt(acc.get('alert'))} with on_drift=alert and {fmt(acc.get('student'))} with on_drift=student "
        f"(better on {len(better)} sets: {', '.join(better) or 'none'}); on_drift=default abstains."
    )


def gate_rows(ev: Evaluation) -> list[list[str]]:
    rows = [["path", "method", "alpha", "delta", "threshold", "temperature", "score", "FLOPs when it serves", "FLOPs alone"]]
    for p, g in ev.gates.items():
        rows.append([p, fmt(g.get("method")), fmt(g.get("alpha")), fmt(g.get("delta")), fmt(g.get("threshold"), 4),
                     fmt(g.get("temperature"), 3), fmt(g.get("score")),
                     fmt(ev.flops["cascade"].get(p, ev.flops["fallback"] if p == "student" else None)),
                     fmt(ev.flops["alone"].get(p))])
    return rows


def oracle_rows(ev: Evaluation, key: str) -> list[list[str]]:
    e = ev.per_set[key]
    rows = [["oracle exit: cheapest correct exit", "fraction"]]
    for k, v in e["oracle_exit_distribution"].items():
        rows.append([k, pct(v)])
    rows.append(["mean MFLOPs of the oracle exit", mflops(e["flops"]["oracle_exit"])])
    rows.append(["mean MFLOPs of the system", mflops(e["flops"]["mean"])])
    rows.append(["accuracy oracle exit / oracle router / system",
                 f"{fmt(e['accuracy']['oracle_exit'])} / {fmt(e['accuracy']['oracle_router'])} / {fmt(e['accuracy']['system'])}"])
    return rows


def md_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    out = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in esc[0]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(out)


def html_table(rows: list[list[str]], row_classes: Sequence[str] | None = None,
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


def guarantee_lines(ev: Evaluation) -> list[str]:
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
            f"{fmt(d['worst'])} vs class {d['best_class']} {fmt(d['best'])} (gap {fmt(d['gap'])})."
        )
    d = s.get("largest_fallback_disparity")
    if d and d["gap"] <= 0:
        lines.append("No per-class fallback-rate disparity on any set (equal fallback rates in every class).")
    elif d:
        lines.append(
            f"Largest per-class fallback-rate disparity: set {d['set']}, class {d['worst_class']} "
            f"{pct(d['worst'])} vs class {d['best_class']} {pct(d['best'])}."
        )
    if s.get("mce"):
        lines.append(
            f"mCE system {fmt(s['mce'].get('system'))} (primary {fmt(s['mce'].get('primary'))}); relative drop from "
            f"clean: system {pct(s['relative_drop'].get('system'))}, primary {pct(s['relative_drop'].get('primary'))}."
        )
    if s.get("worst_set"):
        lines.append(f"Worst set: {s['worst_set']['set']} (system accuracy {fmt(s['worst_set']['accuracy_system'])}).")
    return lines


# --------------------------------------------------------------------------------------------------
# the silent-error headline (what the report leads with)


def verdict_text(ev: Evaluation) -> tuple[str, str]:
    """``(level, sentence)`` of the first callout: ``green`` only when the news is good."""
    v = ev.summary.get("verdict") or {"level": "amber", "failures": ["No verdict was computed."]}
    s = ev.summary
    if s.get("silent_error") is None:
        return "amber", "No shift set was evaluated: nothing is known about silent errors under shift."
    if v["level"] == "green":
        return "green", (
            f"Good news: under shift the system answers wrongly without warning on {pct(s['silent_error'])} of "
            f"requests, answers correctly on {pct(s['useful'])} (better single model {pct(s['best_single'])}), and "
            f"its guarantee held on {pct(s.get('guarantee_held_tunable'))} of tunable and "
            f"{pct(s.get('guarantee_held_held_out'))} of held-out sets."
        )
    return v["level"], " ".join(v["failures"])


def headline_rows(ev: Evaluation) -> list[list[str]]:
    """The headline figures: silent error (all / tunable / held-out / clean), useful, references,
    guarantee held (tunable / held-out)."""
    s = ev.summary
    cert = ev.certificate or {}
    by = "the router" if cert.get("by") == "router" else "each path's gate"
    return [
        ["figure", "value", "what it means"],
        ["silent error, all shift sets", pct(s.get("silent_error")), "answered and wrong, share of requests (mean over sets)"],
        ["silent error, tunable corruptions", pct(s.get("silent_error_tunable")), "corruptions the system could be tuned on"],
        ["silent error, held-out corruptions", pct(s.get("silent_error_held_out")), "corruptions never used for tuning"],
        ["silent error, clean", pct(s.get("silent_error_clean")), "the clean test split"],
        ["useful, all shift sets", pct(s.get("useful")), "answered and right, share of requests"],
        ["best single model", pct(s.get("best_single")), "per set the better of primary alone and student alone"],
        ["oracle router", pct(s.get("oracle_router")), "primary or student, whichever is right (unreachable)"],
        ["guarantee held, tunable sets", pct(s.get("guarantee_held_tunable")), f"no breach by {by} (CP lower bound <= alpha)"],
        ["guarantee held, held-out sets", pct(s.get("guarantee_held_held_out")), "the guarantee says nothing here; reported as fact"],
    ]


def silent_error_rows(ev: Evaluation) -> list[list[str]]:
    """Per set, sorted by silent error (worst first): silent error, useful, unanswered, references, the
    guarantee's check and whether the set lies where the guarantee was certified."""
    rows = [["set", "held out", "silent error", "useful", "unanswered", "best single", "oracle router",
             "guarantee holds", "breached by", "certified distribution"]]
    keys = sorted(ev.per_set, key=lambda k: (-(ev.per_set[k].get("silent_error") or 0.0), k))
    for k in keys:
        e = ev.per_set[k]
        g = e.get("guarantee", {})
        se, use = e.get("silent_error"), e.get("useful")
        cov = e["coverage"].get("system")
        unanswered = None if cov is None else max(0.0, 1.0 - cov)
        rows.append([k, "yes" if e.get("held_out") else "", pct(se), pct(use), pct(unanswered), pct(e.get("best_single")),
                     pct(e["accuracy"].get("oracle_router")), "yes" if g.get("holds") else "NO",
                     ", ".join(g.get("breached", [])), g.get("scope", "")])
    return rows


def failure_detection_rows(ev: Evaluation) -> list[list[str]]:
    """Failure-detection AUROC and AURC per path and for the system: clean, tunable, held-out."""
    fd = ev.summary.get("failure_detection", {})
    groups = [g for g in ("clean", "tunable", "held_out") if g in fd]
    if not groups:
        return []
    names = list(fd[groups[0]])
    rows = [["path", *[f"AUROC {g}" for g in groups], *[f"AURC {g}" for g in groups]]]
    for p in names:
        rows.append([p, *[fmt(fd[g].get(p, {}).get("auroc")) for g in groups],
                     *[fmt(fd[g].get(p, {}).get("aurc"), 4) for g in groups]])
    return rows
