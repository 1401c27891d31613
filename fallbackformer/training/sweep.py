"""The number a hyperparameter sweep optimises: one entry of the main job's ``summary.json``."""

from __future__ import annotations

import math
from typing import Any


def metric_from_summary(summary: dict[str, Any], key: str | None) -> float | None:
    """The value at the dotted path ``key`` of ``summary`` (``"accuracy.system"``), or ``None`` for no key.

    Args:
        summary: what :func:`fallbackformer.training.pipeline.run` returns (and writes as summary.json).
        key: ``cfg.optimized_metric``; ``None`` when the run optimises nothing.

    Returns ``None`` also for an empty summary (what ``run`` returns on DDP ranks other than zero).

    Raises:
        KeyError: the path is not in the summary (the message lists what is there).
        TypeError: the path names a section, not a number.
    """
    if not key or not summary:  # no metric asked for, or a DDP rank other than zero (empty summary)
        return None
    node: Any = summary
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(key.split(".")[:i]) or "the summary"
            there = sorted(node) if isinstance(node, dict) else []
            raise KeyError(f"optimized_metric={key!r}: {where} has no {part!r}; it has {there}")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise TypeError(f"optimized_metric={key!r} is a {type(node).__name__}, not a number; pick a leaf, "
                        "for example accuracy.system")
    value = float(node)
    return value if math.isfinite(value) else float("nan")
