"""``torch.export`` of the combined model: one ``ExportedProgram`` saved as a ``.pt2`` archive.

The program is :class:`~fallbackformer.export.graph.CombinedGraph` traced with a dynamic batch axis:
the same raw input, the same four outputs and ``served_by`` codes as the ONNX graph. What it loses
against :class:`~fallbackformer.runtime.fallback_model.FallbackModel` (docs/deploy.md lists it):
the deadline, admission, hedging, the breaker and error recovery, events and counters, string
``served_by``/``reason`` and the invalid-input error (invalid samples get the default). The
``where`` variant also loses batch compaction (every stage runs on the whole batch).

This package only writes ``.pt2`` files. Reading one (``torch.export.load``) unpickles, by torch's
own warning: load only archives you produced, after checking their sha256; to ship a model to
another machine, ship a bundle (``ff.save``) or the ONNX graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fallbackformer.common.jsonsafe import dumps
from fallbackformer.export.graph import OUTPUT_NAMES, CombinedGraph, served_by_codes
from fallbackformer.export.onnx_export import example_input as _example_input

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.fallback_model import FallbackModel


def trace_program(
    model: "FallbackModel", *, variant: str = "where", example_input: Tensor | None = None
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the combined graph, batch axis dynamic.

    Args:
        model: the model (its modules are put in eval mode).
        variant: ``"where"`` or ``"cond"`` (``torch.cond`` stays a higher-order op in the program).
        example_input: a raw batch of >= 2 samples (default: from the input spec).
    """
    model.eval()
    x = example_input if example_input is not None else _example_input(model)
    if x.shape[0] < 2:
        raise ValueError(f"example batch size {x.shape[0]} would fix the batch axis; trace with >= 2")
    graph = CombinedGraph(model, variant, example_input=x).eval()
    with torch.no_grad():
        return torch.export.export(graph, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)


def export_program(
    model: "FallbackModel",
    path: str | Path,
    *,
    variant: str = "where",
    example_input: Tensor | None = None,
) -> Path:
    """Trace the combined model with ``torch.export`` and save it as a ``.pt2`` archive.

    The archive's extra file ``fallbackformer.json`` records the output names, the ``served_by``
    code table and the variant.

    Args:
        model: the model.
        path: the ``.pt2`` file to write.
        variant: ``"where"`` or ``"cond"``.
        example_input: a raw batch of >= 2 samples (default: from the input spec).

    Returns:
        The path written.

    >>> export_program(model, "model.pt2")                              # doctest: +SKIP
    >>> program = torch.export.load("model.pt2")  # unpickles: your own files only  # doctest: +SKIP
    >>> prediction, served_by, confidence, logits = program.module()(x)  # doctest: +SKIP
    """
    program = trace_program(model, variant=variant, example_input=example_input)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "outputs": list(OUTPUT_NAMES),
        "served_by_codes": served_by_codes(model.path_names),
        "variant": variant,
    }
    torch.export.save(program, str(path), extra_files={"fallbackformer.json": dumps(info)})
    return path
