"""fallbackformer: models that answer on time.

The public API (see docs/architecture.md). Importing the package loads torch and the light inference modules
only; lightning, hydra, onnx and matplotlib are imported by the functions that need them.

>>> import fallbackformer as ff
>>> model = ff.load("checkpoints/digits")      # doctest: +SKIP
>>> out = model(images)                         # doctest: +SKIP
>>> out.prediction, out.served_by, out.reason   # doctest: +SKIP
"""

from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.models.registry import create_model, list_models, register_model
from fallbackformer.runtime.events import FallbackEvent
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.output import FallbackOutput
from fallbackformer.runtime.policy import Policy
from fallbackformer.runtime.reasons import REASONS
from fallbackformer.runtime.validation import InputSpec, InvalidInputError

__version__ = "0.1.0"


def save(model: FallbackModel, path, **kwargs):
    """Save ``model`` as a bundle directory (see :func:`fallbackformer.export.bundle.save`)."""
    from fallbackformer.export.bundle import save as _save

    return _save(model, path, **kwargs)


def load(path, backend: str = "torch", **kwargs) -> FallbackModel:
    """Load and verify a bundle (see :func:`fallbackformer.export.bundle.load`)."""
    from fallbackformer.export.bundle import load as _load

    return _load(path, backend=backend, **kwargs)


def distill(primary: MultiExitNet, student, train_loader, val_loader=None, **kwargs):
    """Distill ``student`` from ``primary`` with Lightning inside (see :func:`fallbackformer.training.api.distill`)."""
    from fallbackformer.training.api import distill as _distill

    return _distill(primary, student, train_loader, val_loader, **kwargs)


def calibrate(primary: MultiExitNet, student, calib_loader, alpha=0.05, delta: float = 0.1, **kwargs):
    """Calibrate every gate, each with its guarantee (see :func:`fallbackformer.training.api.calibrate`)."""
    from fallbackformer.training.api import calibrate as _calibrate

    return _calibrate(primary, student, calib_loader, alpha=alpha, delta=delta, **kwargs)


def govern(model: FallbackModel, **kwargs):
    """Attach feedback, online risk control and the monitors (see :func:`fallbackformer.governance.governor.govern`)."""
    from fallbackformer.governance.governor import govern as _govern

    return _govern(model, **kwargs)


def export_onnx(model: FallbackModel, path, **kwargs):
    """Export the combined model to ONNX (see :func:`fallbackformer.export.onnx_export.export_onnx`)."""
    from fallbackformer.export.onnx_export import export_onnx as _export_onnx

    return _export_onnx(model, path, **kwargs)


def export_triton(model: FallbackModel, path, name: str = "model", **kwargs):
    """Write a Triton model repository (see :func:`fallbackformer.export.triton.export_triton`)."""
    from fallbackformer.export.triton import export_triton as _export_triton

    return _export_triton(model, path, name=name, **kwargs)


__all__ = [
    "REASONS",
    "ConfidenceGate",
    "FallbackEvent",
    "FallbackModel",
    "FallbackOutput",
    "InputSpec",
    "InvalidInputError",
    "MultiExitNet",
    "Policy",
    "calibrate",
    "create_model",
    "distill",
    "export_onnx",
    "export_triton",
    "govern",
    "list_models",
    "load",
    "register_model",
    "save",
    "__version__",
]
