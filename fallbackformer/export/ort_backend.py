"""The onnxruntime backend: each stage, head, the input transform and the student as its own session.

``load(path, backend="onnxruntime")`` builds a :class:`MultiExitNet` whose modules are
:class:`OrtModule` wrappers (torch tensors in and out, dynamic batch) and drives it with the same
:class:`FallbackModel` runtime: deadlines between stages, per-sample exits with batch compaction,
fallback to the student, events and counters all work with onnxruntime as the engine. The gates
stay in torch (a handful of elementwise ops on ``[B, C]`` logits).

The per-module graphs are written at save time (``ff.save(model, path, onnx=True)``) into
``<bundle>/onnx/`` and hashed in the manifest like every other file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor, nn

from fallbackformer.export.onnx_export import example_input as _example_input
from fallbackformer.export.onnx_export import export_module_onnx, ort_session
from fallbackformer.models.multi_exit import MultiExitNet

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.fallback_model import FallbackModel

ONNX_DIR = "onnx"


class OrtModule(nn.Module):
    """An onnxruntime session as a module: ``forward(x [B, ...]) -> Tensor [B, ...]``.

    The output is a CPU tensor moved to the input's device.

    Args:
        path: the ``.onnx`` file (one input, one output, dynamic batch axis).
        name: a label for ``repr`` and errors.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice). Idle threads do
            not spin: the backend's sessions take turns, and spinning pools would steal each
            other's cores.
    """

    def __init__(self, path: str | Path, name: str = "", threads: int | None = None) -> None:
        super().__init__()
        self.path = str(path)
        self.name = name or Path(path).stem
        self.session = ort_session(path, threads=threads, spinning=False)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"{self.path} has {len(inputs)} inputs and {len(outputs)} outputs; an OrtModule "
                "wraps a one-input, one-output graph (export_stage_graphs writes those)"
            )
        self.input_name = inputs[0].name

    def forward(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, path={self.path!r}"


def export_stage_graphs(
    model: "FallbackModel", folder: str | Path, *, example_input: Tensor | None = None
) -> dict[str, Any]:
    """Write one ONNX graph per input transform, stage, head and the student into ``folder/onnx``.

    Args:
        model: the model (its modules are put in eval mode).
        folder: the bundle folder being written.
        example_input: a raw batch (batch >= 2) for tracing; default from the input spec.

    Returns:
        The manifest's ``onnx`` entry: relative paths of the graphs.
    """
    folder = Path(folder)
    x = example_input if example_input is not None else _example_input(model)
    primary, student = model.primary.eval(), model.student.eval()
    entry: dict[str, Any] = {"input_transform": None, "stages": [], "heads": {}, "student": None}

    def write(module: nn.Module, example: Tensor, name: str) -> str:
        rel = f"{ONNX_DIR}/{name}.onnx"
        export_module_onnx(
            module, example, folder / rel, input_names=["x"], output_names=["y"], optimize=False
        )
        return rel

    with torch.no_grad():
        h = x
        if not isinstance(primary.input_transform, nn.Identity):
            entry["input_transform"] = write(primary.input_transform, x, "input_transform")
            h = primary.input_transform(x)
        for i, stage in enumerate(primary.stages):
            entry["stages"].append(write(stage, h, f"stage_{i}"))
            h = stage(h)
            if i in primary.exit_stages:
                entry["heads"][str(i)] = write(primary.head(i), h, f"head_{i}")
        entry["student"] = write(student, x, "student")
    return entry


def load_ort_modules(
    path: str | Path, manifest: Mapping[str, Any], *, threads: int | None = None
) -> tuple[MultiExitNet, nn.Module]:
    """The primary and the student of a verified bundle, as onnxruntime-backed modules.

    Args:
        path: the bundle folder (already verified).
        manifest: its manifest.
        threads: intra-op threads of each session (default: onnxruntime's choice).

    Raises:
        BundleError: when the bundle was saved without ONNX graphs.
    """
    from fallbackformer.export.bundle import BundleError

    path = Path(path)
    entry = manifest.get("onnx")
    if not entry or not entry.get("stages"):
        raise BundleError(
            f"bundle {path} has no per-stage ONNX graphs, so backend='onnxruntime' cannot run it; "
            "re-save it with ff.save(model, path, onnx=True), or load it with backend='torch'"
        )
    transform = (
        OrtModule(path / entry["input_transform"], "input_transform", threads)
        if entry.get("input_transform")
        else nn.Identity()
    )
    stages = [OrtModule(path / rel, f"stage_{i}", threads) for i, rel in enumerate(entry["stages"])]
    heads = {int(k): OrtModule(path / rel, f"head_{k}", threads) for k, rel in entry["heads"].items()}
    primary = MultiExitNet(stages, heads, input_transform=transform)
    student = OrtModule(path / entry["student"], "student", threads)
    return primary.eval(), student.eval()
