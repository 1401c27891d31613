"""Figures for evaluation reports (matplotlib, no pyplot: no global state, no display needed).

Every function returns a :class:`matplotlib.figure.Figure` rendered by the Agg canvas; pass ``path``
to also write a PNG. :func:`figure_to_base64` turns a figure into the string a self-contained HTML
report embeds.

>>> import torch
>>> fig = reliability_diagram(torch.rand(100), torch.rand(100) < 0.7, "exit_1")
>>> png = figure_to_png(fig)
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from fallbackformer.common.paths import DEFAULT, PRIMARY, STUDENT, exit_index
from fallbackformer.evaluation import metrics as M

__all__ = [
    "reliability_diagram",
    "risk_coverage_curve",
    "risk_coverage_curves",
    "accuracy_vs_severity",
    "fallback_rate_vs_severity",
    "accuracy_vs_budget",
    "exit_distribution",
    "figure_to_png",
    "figure_to_base64",
    "save_figure",
]

PathLike = str | os.PathLike[str]

# one colour per path, stable across figures
_PATH_COLOURS = {
    "primary": "#1f77b4",
    "student": "#ff7f0e",
    "system": "#2ca02c",
    "default": "#7f7f7f",
    "oracle_exit": "#9467bd",
    "oracle_router": "#8c564b",
}
_EXIT_CYCLE = ["#17becf", "#bcbd22", "#e377c2", "#aec7e8", "#98df8a", "#c5b0d5"]


def _colour(name: str, i: int = 0) -> str:
    if name in _PATH_COLOURS:
        return _PATH_COLOURS[name]
    k = exit_index(name)
    if k is not None:
        return _EXIT_CYCLE[(k - 1) % len(_EXIT_CYCLE)]
    return _EXIT_CYCLE[i % len(_EXIT_CYCLE)]


def _path_order(name: str) -> tuple[int, int, str]:
    """Sort key of path names: ``exit_1 .. exit_N`` by number (any N), then primary, student, default."""
    k = exit_index(name)
    if k is not None:
        return (0, k, name)
    rest = [PRIMARY, STUDENT, DEFAULT]
    return (1, rest.index(name) if name in rest else len(rest), name)


def _new_figure(width: float = 6.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig: Figure, path: PathLike) -> None:
    """Write ``fig`` as a PNG (parent directories are created)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, format="png")


def figure_to_png(fig: Figure) -> bytes:
    """The PNG bytes of ``fig``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def figure_to_base64(fig: Figure) -> str:
    """``data:image/png;base64,...`` for an ``<img src=...>`` in a self-contained HTML file."""
    return "data:image/png;base64," + base64.b64encode(figure_to_png(fig)).decode("ascii")


def reliability_diagram(
    confidence: Tensor,
    correct: Tensor,
    title: str = "",
    n_bins: int = M.ECE_BINS,
    path: PathLike | None = None,
) -> Figure:
    """Accuracy against confidence in equal-width bins, with the gap to the diagonal and a histogram.

    Args:
        confidence: calibrated probability of the predicted class ``[N]`` in ``[0, 1]``.
        correct: ``[N]`` bool.
        title: figure title (e.g. the path and the set).
        n_bins: bins (15, as in the ECE).
        path: if given, also write a PNG there.
    """
    bins = M.calibration_bins(confidence, correct, n_bins)
    n = int(bins["count"].sum())
    ece = M.ece(confidence, correct, n_bins) if n else math.nan
    fig = _new_figure(5.0, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centre = ((bins["lower"] + bins["upper"]) / 2).numpy()
    width = float(bins["upper"][0] - bins["lower"][0])
    filled = bins["count"] > 0
    acc = torch.nan_to_num(bins["accuracy"]).numpy()
    conf = torch.nan_to_num(bins["confidence"]).numpy()
    top.bar(centre[filled], acc[filled], width=width, edgecolor="black", color="#1f77b4", label="accuracy")
    gap_lo = [min(a, c) for a, c in zip(acc[filled], conf[filled])]
    gap_h = [abs(a - c) for a, c in zip(acc[filled], conf[filled])]
    top.bar(centre[filled], gap_h, bottom=gap_lo, width=width, facecolor=(0.84, 0.15, 0.16, 0.25),
            edgecolor="#d62728", linewidth=0.8, hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}  (ECE {ece:.3f}, n={n})" if title else f"ECE {ece:.3f}, n={n}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centre, bins["count"].numpy(), width=width, color="#7f7f7f", edgecolor="black")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")
    return _finish(fig, path)


def risk_coverage_curve(
    confidence: Tensor,
    correct: Tensor,
    title: str = "",
    alpha: float | None = None,
    operating_point: tuple[float, float] | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Selective risk against coverage (accept the most confident first), with AURC in the legend.

    Args:
        confidence: ``[N]`` score, higher = more likely correct (any scale).
        correct: ``[N]`` bool.
        title: figure title.
        alpha: the target risk of a gate; drawn as a horizontal line.
        operating_point: ``(coverage, risk)`` where the gate (or the system) operates, marked on the curve.
        path: if given, also write a PNG there.
    """
    fig = _new_figure(5.5, 4.0)
    ax = fig.subplots()
    cov, risk, _ = M.risk_coverage_curve(confidence, correct)
    if len(cov):
        area = M.aurc(confidence, correct)
        cov_p = torch.cat([torch.zeros(1, dtype=cov.dtype), cov]).numpy()
        risk_p = torch.cat([risk[:1], risk]).numpy()
        ax.step(cov_p, risk_p, where="post", color="#1f77b4", label=f"risk (AURC {area:.4f})")
        ok = torch.as_tensor(correct).reshape(-1).bool()
        opt_cov = torch.linspace(0, 1, 201, dtype=torch.float64)
        acc = ok.double().mean()
        opt_risk = ((opt_cov - acc).clamp_min(0) / opt_cov.clamp_min(1e-12)).numpy()
        ax.plot(opt_cov.numpy(), opt_risk, ":", color="#7f7f7f", label=f"optimal (AURC {M.aurc_optimal(ok):.4f})")
    if alpha is not None:
        ax.axhline(alpha, color="#d62728", linestyle="--", linewidth=1, label=f"alpha = {alpha:g}")
    if operating_point is not None:
        ax.plot([operating_point[0]], [operating_point[1]], "o", color="#d62728", label="operating point")
    ax.set_xlim(0, 1)
    top = float(risk.max()) if len(cov) else 0.0
    ax.set_ylim(0, max(top, alpha or 0.0, 0.02) * 1.1)
    ax.set_xlabel("coverage")
    ax.set_ylabel("selective risk")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def risk_coverage_curves(
    curves: Mapping[str, tuple[Tensor, Tensor]],
    title: str = "",
    alpha: float | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Several risk-coverage curves on one axes (for example clean, pooled tunable, pooled held-out).

    Args:
        curves: ``{label: (confidence [N], correct [N])}``; the AURC goes in each label.
        title: figure title.
        alpha: a target risk, drawn as a horizontal line.
        path: if given, also write a PNG there.
    """
    fig = _new_figure(6.0, 4.2)
    ax = fig.subplots()
    top = 0.0
    styles = ["-", "--", "-.", ":"]
    for i, (label, (confidence, correct)) in enumerate(curves.items()):
        cov, risk, _ = M.risk_coverage_curve(confidence, correct)
        if not len(cov):
            continue
        cov_p = torch.cat([torch.zeros(1, dtype=cov.dtype), cov]).numpy()
        risk_p = torch.cat([risk[:1], risk]).numpy()
        ax.step(cov_p, risk_p, styles[i % len(styles)], where="post", color=_EXIT_CYCLE[i % len(_EXIT_CYCLE)]
                if i else "#1f77b4", label=f"{label} (n {len(correct)}, AURC {M.aurc(confidence, correct):.4f})")
        top = max(top, float(risk.max()))
    if alpha is not None:
        ax.axhline(alpha, color="#d62728", linestyle="--", linewidth=1, label=f"alpha = {alpha:g}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(top, alpha or 0.0, 0.02) * 1.1)
    ax.set_xlabel("coverage")
    ax.set_ylabel("selective risk")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def _series_plot(
    series: Mapping[str, Mapping[float, float]],
    xlabel: str,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None,
    xticklabels: Mapping[float, str] | None = None,
) -> Figure:
    fig = _new_figure(6.5 if len(series) <= 8 else 8.0, 4.0)
    ax = fig.subplots()
    for i, (name, points) in enumerate(series.items()):
        xs = sorted(points)
        ys = [points[x] for x in xs]
        style = "-o" if name not in ("oracle_exit", "oracle_router") else "--"
        bold = name in ("system", "mean")
        colour = "black" if name == "mean" else _colour(name, i)
        ax.plot(xs, ys, style, color=colour, label=name, linewidth=2.4 if bold else 1.2,
                markersize=5 if bold else 3, zorder=3 if bold else 2)
    if xticklabels:
        ax.set_xticks(list(xticklabels), list(xticklabels.values()))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        if len(series) > 8:
            ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", ncols=1 if len(series) <= 22 else 2)
        else:
            ax.legend(fontsize=8, ncols=2)
    return fig


def accuracy_vs_severity(
    series: Mapping[str, Mapping[int, float]],
    title: str = "Accuracy vs severity (mean over corruptions)",
    path: PathLike | None = None,
) -> Figure:
    """Accuracy per path against severity; severity 0 is the clean set.

    Args:
        series: ``{path: {severity: accuracy}}`` (e.g. ``"primary"``, ``"exit_1"``, ``"student"``, ``"system"``).
        title: figure title.
        path: if given, also write a PNG there.
    """
    sev = sorted({s for pts in series.values() for s in pts})
    labels = {s: ("clean" if s == 0 else str(s)) for s in sev}
    fig = _series_plot(series, "severity", "accuracy", title, (0, 1.02), labels)
    return _finish(fig, path)


def fallback_rate_vs_severity(
    series: Mapping[str, Mapping[int, float]],
    title: str = "Fallback rate vs severity",
    path: PathLike | None = None,
) -> Figure:
    """Fallback rate against severity, one line per series (e.g. per corruption, or ``"mean"``).

    Args:
        series: ``{label: {severity: rate}}``; severity 0 is the clean set.
        title: figure title.
        path: if given, also write a PNG there.
    """
    sev = sorted({s for pts in series.values() for s in pts})
    labels = {s: ("clean" if s == 0 else str(s)) for s in sev}
    fig = _series_plot(series, "severity", "fallback rate (not served by primary or an exit)", title, (0, 1.02), labels)
    return _finish(fig, path)


def accuracy_vs_budget(
    budgets_ms: Sequence[float],
    accuracy: Mapping[str, Sequence[float]],
    fallback_rate: Mapping[str, Sequence[float]] | None = None,
    title: str = "Accuracy vs latency budget",
    policy_budget_ms: float | None = None,
    path: PathLike | None = None,
) -> Figure:
    """System accuracy (and fallback rate) against the latency budget.

    Args:
        budgets_ms: the swept budgets.
        accuracy: ``{label: [accuracy per budget]}`` (e.g. per set).
        fallback_rate: optional ``{label: [rate per budget]}``, drawn dashed on a second axis.
        title: figure title.
        policy_budget_ms: the model's configured budget, drawn as a vertical line.
        path: if given, also write a PNG there.
    """
    fig = _new_figure(8.5, 4.2)
    ax = fig.subplots()
    xs = list(budgets_ms)
    for i, (name, ys) in enumerate(accuracy.items()):
        ax.plot(xs, list(ys), "-o", color=_colour(name, i), label=f"accuracy: {name}", markersize=3)
    if policy_budget_ms is not None:
        ax.axvline(policy_budget_ms, color="black", linestyle=":", linewidth=1, label=f"policy budget {policy_budget_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency budget (ms)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    if fallback_rate:
        ax2 = ax.twinx()
        for i, (name, ys) in enumerate(fallback_rate.items()):
            ax2.plot(xs, list(ys), "--", color=_colour(name, i), alpha=0.7, label=f"fallback: {name}")
        ax2.set_ylabel("fallback rate")
        ax2.set_ylim(0, 1.02)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=7, bbox_to_anchor=(1.12 if fallback_rate else 1.01, 1), loc="upper left")
    ax.set_title(title)
    return _finish(fig, path)


def exit_distribution(
    counts: Mapping[str, Mapping[str, float]],
    title: str = "Who served the answers",
    path: PathLike | None = None,
) -> Figure:
    """Stacked bars of the ``served_by`` mix per set (fractions).

    Args:
        counts: ``{set name: {served_by: count or fraction}}``; each bar is normalised to 1.
        title: figure title.
        path: if given, also write a PNG there.
    """
    sets = list(counts)
    paths = sorted({p for c in counts.values() for p in c}, key=_path_order)
    fig = _new_figure(max(6.0, 0.35 * len(sets) + 2.5), 4.2)
    ax = fig.subplots()
    bottom = [0.0] * len(sets)
    for i, p in enumerate(paths):
        fr = []
        for s in sets:
            total = sum(counts[s].values()) or 1.0
            fr.append(counts[s].get(p, 0.0) / total)
        ax.bar(range(len(sets)), fr, bottom=bottom, color=_colour(p, i), label=p, edgecolor="white", linewidth=0.5)
        bottom = [b + f for b, f in zip(bottom, fr)]
    ax.set_xticks(range(len(sets)), sets, rotation=70 if len(sets) > 6 else 0, fontsize=7, ha="right" if len(sets) > 6 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of answers")
    ax.set_title(title)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    return _finish(fig, path)


def drift_policy_accuracy(
    accuracy: Mapping[str, Mapping[str, float | None]],
    title: str = "After calibration drift is detected: accuracy per drift policy",
    path: PathLike | None = None,
) -> Figure:
    """Grouped bars: per shift set, the accuracy each drift policy serves after detection.

    Args:
        accuracy: ``{policy: {set name: accuracy or None}}`` (None: drift never detected there).
        title: figure title.
        path: if given, also write a PNG there.
    """
    policies = list(accuracy)
    sets = list(next(iter(accuracy.values()))) if policies else []
    fig = _new_figure(max(6.0, 0.45 * len(sets) + 2.5), 4.2)
    ax = fig.subplots()
    width = 0.8 / max(1, len(policies))
    colours = {"alert": _colour("primary"), "student": _colour("student"), "default": _colour("default")}
    for i, p in enumerate(policies):
        xs = [k + (i - (len(policies) - 1) / 2) * width for k in range(len(sets))]
        ys = [accuracy[p].get(s) or 0.0 for s in sets]
        ax.bar(xs, ys, width=width, color=colours.get(p, _colour(p, i)), label=f"on_drift={p}")
    ax.set_xticks(range(len(sets)), sets, rotation=70 if len(sets) > 6 else 0, fontsize=7,
                  ha="right" if len(sets) > 6 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy after detection (default = wrong)")
    ax.set_title(title)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    return _finish(fig, path)
