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
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fallbackformer.evaluation import plots as P
from fallbackformer.common.jsonsafe import json_safe
from fallbackformer.evaluation.containers import CLEAN, Evaluation
from fallbackformer.evaluation.governance_report import governance_section
from fallbackformer.evaluation.report_figures import HEADLINE_FIGURE, make_figures
from fallbackformer.evaluation.report_tables import (
    ce_rows,
    disparity_rows,
    drift_line,
    drift_rows,
    failure_detection_rows,
    gate_rows,
    guarantee_lines,
    headline_rows,
    html_table,
    md_table,
    metric_rows,
    oracle_rows,
    per_set_rows,
    risk_rows,
    silent_error_rows,
    slice_rows,
    summary_rows,
    verdict_text,
)

__all__ = ["write_report", "make_figures", "report_json", "render_markdown", "render_html"]

PathLike = str | os.PathLike[str]


def report_json(evaluation: Evaluation, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document: one entry per set (``clean``, ``<corruption>/<severity>``), ``summary``, ``meta``."""
    doc = evaluation.to_json()
    if extra:
        doc["meta"] = {**doc["meta"], **dict(extra)}
    return json_safe(doc)


def render_markdown(ev: Evaluation, title: str, figure_files: Mapping[str, str] | None = None,
                    extra: Mapping[str, Any] | None = None) -> str:
    """report.md: the headline, every table, and links to the PNGs (if written)."""
    base = CLEAN if CLEAN in ev.per_set else next(iter(ev.per_set))
    parts = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}."]
    if extra:
        parts += ["", *[f"- **{k}**: {v}" for k, v in extra.items() if not isinstance(v, (dict, list))]]
    level, sentence = verdict_text(ev)
    parts += ["", "## Silent errors under shift", "", f"**{level.upper()}**: {sentence}", "",
              md_table(headline_rows(ev)), "", _certificate_line(ev)]
    if figure_files and HEADLINE_FIGURE in figure_files:
        parts += ["", f"![{HEADLINE_FIGURE}]({figure_files[HEADLINE_FIGURE]})"]
    parts += ["", "Per set, worst silent error first:", "", md_table(silent_error_rows(ev))]
    parts += ["", "## Headline", "", *[f"- {l}" for l in guarantee_lines(ev)]]
    parts += ["", "## Paths and gates", "", md_table(gate_rows(ev))]
    parts += ["", "## Across severities", "", md_table(summary_rows(ev)), "", "Corruption errors (mean over severities):", "",
              md_table(ce_rows(ev))]
    drift = drift_line(ev)
    if drift:
        parts += ["", "## Calibration drift", "", drift]
        if ev.drift and ev.drift.get("sets"):
            parts += ["", md_table(drift_rows(ev))]
    parts += ["", "## Per set", "", md_table(per_set_rows(ev))]
    parts += ["", f"## Selective risk against alpha ({base})", "", md_table(risk_rows(ev, base))]
    parts += ["", "## ECE per path", "", md_table(metric_rows(ev, "ece"))]
    parts += ["", "## Failure detection (correct vs wrong, by confidence)", "", md_table(failure_detection_rows(ev))]
    parts += ["", "## AURC per path", "", md_table(metric_rows(ev, "aurc", 4))]
    parts += ["", "## Coverage per path (gate alone)", "", md_table(metric_rows(ev, "coverage"))]
    parts += ["", f"## Slices ({base})", "", md_table(slice_rows(ev, base)), "", "Largest disparity per set:", "",
              md_table(disparity_rows(ev))]
    parts += ["", f"## References ({base})", "", md_table(oracle_rows(ev, base))]
    parts += governance_section(extra)  # monitors and online risk control (issue 14), when passed
    if figure_files:
        parts += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in figure_files.items()]
    parts += ["", "## Definitions", "", _DEFINITIONS_MD]
    return "\n".join(parts) + "\n"


def _certificate_line(ev: Evaluation) -> str:
    c = ev.certificate or {}
    if c.get("by") == "router":
        cov = c.get("covers") or {}
        return (
            f"The system's answers carry the router's guarantee (selective risk <= {c.get('alpha')} with probability "
            f"1 - {c.get('delta')}; satisfied at calibration: {c.get('satisfied')}), certified on a mixture: clean weight "
            f"{cov.get('clean_weight')}, corruptions {', '.join(map(str, cov.get('corruptions', []))) or 'none'}, severities "
            f"{', '.join(map(str, cov.get('severities', []))) or 'none'}"
            + (f", draw {cov['draw']}" if cov.get("draw") else "") + ". Only the router's check counts for "
            "\"guarantee held\"; the per-path gates are reported below but do not serve. Held-out corruptions lie "
            "outside the mixture: the guarantee says nothing there."
        )
    return ("No router: each path's gate carries its own guarantee (its own alpha), certified on clean calibration "
            "data; a set's guarantee holds when no gate's check breaches on it. Every shift set lies outside what "
            "the gates certified: there the figures are facts, not broken promises.")


_DEFINITIONS_MD = """\
- *answered*: `prediction >= 0`, whoever gave it (a safe default that answers a class counts). *silent error*:
  answered and wrong, as a share of requests; *useful*: answered and right. Headline figures are means over
  the shift sets (all, tunable corruptions, held-out corruptions).
- *best single*: per set the better accuracy of the primary alone and the student alone, averaged over the
  shift sets. *guarantee held*: share of sets on which no counted check breaches (one-sided Clopper-Pearson
  lower bound above alpha); with a router only the router's check (the system's selective risk) counts,
  without one each gate's own check. Green only when silent error <= 10%, useful >= best single - 3 points,
  and the guarantee held on >= 90% of tunable and >= 75% of held-out sets.
- *failure detection*: AUROC of the confidence for telling correct from wrong answers (0.5 is chance), and
  AURC; per path by the gate's `confidence(logits)`, for the system by the served confidence (unanswered last).
- *fallback rate*: answers not served by the primary's own path (its exits included): the student's and the safe default's.
- *selective risk* `system`: errors among answered, against the router's alpha (or the loosest gate alpha); per path: the
  gate applied alone on that path's logits (selective risk for ltt_binom/ltt_hb/empirical, joint risk for crc).
  *exceeds alpha*: the point estimate is above alpha; *broken*: the one-sided Clopper-Pearson lower bound at
  level delta is above alpha.
- *coverage*: `system`: answered requests; per path: what the gate accepts alone.
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
.hl{background:#fff3a0;border-color:#e0c84a} .amber{background:#fff0d6;border-color:#e0b060}
.red{background:#fde2e2;border-color:#c0392b;border-width:2px} .green{background:#e6f4ea;border-color:#9ccaa8}
.lead{border:2px solid #888;padding:8px 14px;margin:12px 0;border-radius:8px}
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


def _figure_html(key: str, caption: str, fig: Any) -> str:
    png = fig if isinstance(fig, bytes) else P.figure_to_png(fig)
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f"<figure id='fig-{html.escape(key)}'><img alt='{html.escape(key)}' src='{src}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


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
    # the lead: silent errors under shift
    level, sentence = verdict_text(ev)
    h.append("<div class='lead'><h2 style='margin-top:4px'>Silent errors under shift</h2>")
    h.append(f"<div class='callout {level}'><b>{level.upper()}.</b> {html.escape(sentence)}</div>")
    h.append(html_table(headline_rows(ev)) + f"<p>{html.escape(_certificate_line(ev))}</p>")
    if HEADLINE_FIGURE in figures:
        h.append("<div class='figs'>" + _figure_html(HEADLINE_FIGURE, *figures[HEADLINE_FIGURE]) + "</div>")
    se_rows = silent_error_rows(ev)
    h.append("<p>Per set, worst silent error first (red: the guarantee's check breached; italic: held-out):</p>")
    h.append(html_table(se_rows, [("broken" if r[7] == "NO" else "") + (" heldout" if r[1] else "") for r in se_rows[1:]]))
    h.append("</div>")
    # guarantee call-outs
    broken = s.get("guarantee_broken_sets", {})
    lines = guarantee_lines(ev)
    h.append(f"<div class='callout {'bad' if broken else 'good'}'><b>Guarantees.</b> {html.escape(lines[0])}</div>")
    for line in lines[1:]:
        cls = "hl" if "disparity" in line else "good"
        h.append(f"<div class='callout {cls}'>{html.escape(line)}</div>")

    h.append("<h2>Paths and gates</h2>" + html_table(gate_rows(ev)))
    h.append("<h2>Across severities</h2>" + html_table(summary_rows(ev)))
    ce = ce_rows(ev)
    if ce:
        h.append("<p>Corruption errors (mean over severities):</p>" + html_table(ce))

    drift = drift_line(ev)
    if drift:
        h.append("<h2>Calibration drift</h2><p>" + html.escape(drift) + "</p>")
        if ev.drift and ev.drift.get("sets"):
            dr_rows = drift_rows(ev)
            h.append(html_table(dr_rows, ["heldout" if r[1] else "" for r in dr_rows[1:]]))

    # figures
    h.append("<h2>Figures</h2><div class='figs'>")
    for key, (caption, fig) in figures.items():
        if key != HEADLINE_FIGURE:
            h.append(_figure_html(key, caption, fig))
    h.append("</div>")

    # per-set table with flags
    rows = per_set_rows(ev)
    classes = []
    for k, e in ev.per_set.items():
        c = "broken" if e["guarantee_broken"] else ("exceeded" if e["guarantee_exceeded"] else "")
        if e.get("held_out"):
            c += " heldout"
        classes.append(c.strip())
    h.append("<h2>Per set</h2><p>Rows in red: a guarantee is broken (Clopper-Pearson lower bound above alpha) "
             "for the listed paths; orange: a risk exceeds alpha but not significantly. Italic: held-out "
             "corruption.</p>" + html_table(rows, classes))
    h.append(f"<h2>Selective risk against alpha ({html.escape(base)})</h2>")
    rr = risk_rows(ev, base)
    h.append(html_table(rr, ["broken" if r[-1] else ("exceeded" if r[-2] else "") for r in rr[1:]]))
    if broken:
        h.append("<p>Sets with a broken guarantee and the paths concerned:</p>" + html_table(
            [["set", "paths"], *[[k, ", ".join(v)] for k, v in broken.items()]], ["broken"] * len(broken)))
    fd = failure_detection_rows(ev)
    if fd:
        h.append("<h2>Failure detection (correct vs wrong, by confidence)</h2><p>AUROC 0.5 is chance; per path by "
                 "the gate's confidence, the system by the served confidence; tunable and held-out are means over "
                 "their shift sets.</p>" + html_table(fd))
    for metric, label, d in (("ece", "ECE per path (15 bins)", 3), ("aurc", "AURC per path", 4),
                             ("coverage", "Coverage per path (gate alone; system: answered)", 3)):
        h.append(f"<h2>{label}</h2>" + html_table(metric_rows(ev, metric, d)))

    # slices, disparity highlighted
    h.append(f"<h2>Slices: per class ({html.escape(base)})</h2>")
    sl = slice_rows(ev, base)
    disp = ev.per_set[base]["slices"]["max_disparity"]
    cells = {}
    for i, r in enumerate(sl[1:]):
        if disp.get("accuracy") and r[0] in (disp["accuracy"]["worst_class"], disp["accuracy"]["best_class"]) and disp["accuracy"]["gap"] > 0:
            cells[(i, 2)] = "hl"
        if disp.get("fallback_rate") and r[0] in (disp["fallback_rate"]["worst_class"], disp["fallback_rate"]["best_class"]) and disp["fallback_rate"]["gap"] > 0:
            cells[(i, 4)] = "hl"
    h.append(html_table(sl, cell_classes=cells))
    dr = disparity_rows(ev)
    worst = (s.get("largest_accuracy_disparity") or {}).get("set")
    h.append("<p>Largest per-class disparity in every set (the largest overall highlighted):</p>")
    h.append(html_table(dr, ["hl" if r[0] == worst else "" for r in dr[1:]],
                         {(i, 1): "hl" for i, r in enumerate(dr[1:]) if r[0] == worst}))
    h.append(f"<h2>References ({html.escape(base)})</h2>" + html_table(oracle_rows(ev, base)))
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
