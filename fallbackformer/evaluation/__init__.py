"""fallbackformer.evaluation: metrics, shift evaluation, reports (HTML/Markdown/JSON + plots).

Submodules (imported on use; matplotlib and torchmetrics load only when needed):

* :mod:`~fallbackformer.evaluation.metrics`: accuracy, selective risk, coverage, AURC, AUROC, ECE, mCE.
* :mod:`~fallbackformer.evaluation.plots`: reliability diagrams, risk-coverage curves, shift figures.
* :mod:`~fallbackformer.evaluation.shift_eval`: :func:`evaluate` a FallbackModel on many sets; its parts:
  ``set_eval`` (one set), ``guarantee_eval`` (router or gates, certified scope), ``shift_summary``
  (across sets: the silent-error headline and verdict), ``cost_eval`` (FLOPs, budget sweep),
  ``containers`` (:class:`Evaluation`, the JSON sanitizer).
* :mod:`~fallbackformer.evaluation.report`: :func:`write_report` (report.json / .md / .html), leading with
  silent errors; ``report_tables`` and ``report_figures`` build its parts.
* :mod:`~fallbackformer.evaluation.pipeline`: :func:`evaluate_and_report`, :func:`run_evaluation`.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "evaluate": "fallbackformer.evaluation.shift_eval",
    "Evaluation": "fallbackformer.evaluation.shift_eval",
    "summarize": "fallbackformer.evaluation.shift_eval",
    "write_report": "fallbackformer.evaluation.report",
    "evaluate_and_report": "fallbackformer.evaluation.pipeline",
    "run_evaluation": "fallbackformer.evaluation.pipeline",
    "headline_metrics": "fallbackformer.evaluation.pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fallbackformer.evaluation' has no attribute {name!r}")
