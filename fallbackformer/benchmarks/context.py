"""What every section gets: its config, the machine, and the system under test (built on first use).

The system is ``{"primary", "student", "gates", "splits", "input_spec", "router"}`` (and a bundle's
ladder rungs after the student, ``"fallbacks"``): loaded from a bundle (``cfg.bundle``) or trained
with the run pipeline's functions on the configured datamodule.
Its input spec comes from the bundle, else from ``cfg.input_spec``, else from the training split
(shape and observed value range). Its router comes from the bundle when it has one, else it is
fitted and certified on the datamodule's splits exactly as the training pipeline does
(:func:`fallbackformer.training.router_step.fit_router`, config ``cfg.router``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fallbackformer.benchmarks.common import get
from fallbackformer.common.paths import STUDENT
from fallbackformer.runtime.validation import InputSpec

__all__ = ["BenchmarkContext", "build_system", "fit_system_router", "input_spec_of"]


@dataclass
class BenchmarkContext:
    """A section's view of the run.

    Attributes:
        cfg: the ``benchmark`` node of the config (one sub-node per section).
        machine: :func:`~fallbackformer.benchmarks.common.describe_machine`.
        out_dir: where ``benchmark.json`` and ``BENCHMARKS.md`` go.
        root: the whole config (data, router, shift, input_spec...).
        system_factory: builds the system on first use.
    """

    cfg: Any
    machine: dict[str, Any]
    out_dir: Path
    root: Any = None
    system_factory: Callable[[], dict[str, Any]] | None = None
    _system: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def system(self) -> dict[str, Any]:
        """The system under test (see the module docstring), built or loaded on first use."""
        if self._system is None:
            if self.system_factory is None:
                raise RuntimeError("this benchmark run has no system; give bundle=PATH or let it train")
            self._system = self.system_factory()
        return self._system

    @property
    def built_system(self) -> dict[str, Any] | None:
        """The system if a section has built or loaded it, else ``None`` (builds nothing)."""
        return self._system

    @property
    def input_spec(self) -> InputSpec:
        """The system's input spec (``cfg.input_spec`` first, so that no system is built for it)."""
        node = get(self.root, "input_spec", None)
        if node:
            return _spec_from_node(node)
        system = self.system
        if system.get("input_spec") is None:
            system["input_spec"] = input_spec_of(system["splits"]["train"][0])
        return system["input_spec"]

    @property
    def router(self) -> Any:
        """The system's router: the bundle's, else fitted and certified on the splits (once)."""
        system = self.system
        if system.get("router") is None:
            system["router"], system["router_report"] = fit_system_router(self.root, system)
        return system["router"]

    def section(self, name: str) -> Any:
        """The config node of section ``name`` (empty when absent)."""
        return get(self.cfg, name, {})


def _spec_from_node(node: Any) -> InputSpec:
    if isinstance(node, InputSpec):
        return node
    vr = get(node, "value_range", None)
    return InputSpec(shape=tuple(int(s) for s in get(node, "shape")), dtype=str(get(node, "dtype", "float32")),
                     value_range=(float(vr[0]), float(vr[1])) if vr is not None else None,
                     description=str(get(node, "description", "")))


def input_spec_of(x_train: torch.Tensor) -> InputSpec:
    """An input spec read off the training inputs: their per-sample shape and observed value range."""
    return InputSpec(shape=tuple(x_train.shape[1:]), dtype=str(x_train.dtype).removeprefix("torch."),
                     value_range=(float(x_train.min()), float(x_train.max())),
                     description="read off the training split (shape, observed range)")


def _datamodule(cfg: Any) -> Any:
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    return datamodule


def build_system(cfg: Any) -> dict[str, Any]:
    """Load ``cfg.bundle`` (splits from ``cfg.data``), or train the system with the pipeline's functions."""
    import lightning as L

    L.seed_everything(int(get(cfg, "seed", 0)), workers=True)
    datamodule = _datamodule(cfg)
    bundle = get(cfg, "bundle", None)
    if bundle:
        import fallbackformer as ff

        model = ff.load(bundle)
        # the gates of the exits and the student (what a trained system has); a ladder's rung gates
        # travel with its rungs in "fallbacks"
        paths = model.primary.exit_names + [STUDENT]
        return {"primary": model.primary, "student": model.student,
                "gates": [model.gates[n] for n in paths], "splits": datamodule.splits,
                "input_spec": model.input_spec, "router": getattr(model, "router", None),
                "fallbacks": model.fallbacks, "source": f"bundle {bundle}"}
    from fallbackformer.training.calibration import calibrate_gates
    from fallbackformer.training.pipeline import distill_student, train_primary

    work = Path(cfg.out_dir) / "checkpoints"
    primary, _ = train_primary(cfg, datamodule, work)
    student, _ = distill_student(cfg, datamodule, primary, work)
    x_cal, y_cal = datamodule.splits["calibration"]
    primary.eval()
    student.eval()
    with torch.no_grad():  # (not inference mode: temperature fitting differentiates the logits' scale)
        exit_logits, student_logits = primary(x_cal), student(x_cal)
    gates, _ = calibrate_gates(exit_logits, student_logits, y_cal, cfg.gate)
    return {"primary": primary.eval(), "student": student.eval(), "gates": gates, "splits": datamodule.splits,
            "input_spec": None, "router": None, "source": "trained by this run"}


def fit_system_router(cfg: Any, system: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Fit and certify a router on the system's splits (``cfg.router``; corruptions ``cfg.shift.names``)."""
    from fallbackformer.training.router_step import RouterConfig, fit_router

    node = get(cfg, "router", {}) or {}
    items = dict(node.items()) if hasattr(node, "items") else {}
    config = RouterConfig(**{k: (list(v) if hasattr(v, "__iter__") and not isinstance(v, str) else v)
                             for k, v in items.items() if k != "_target_"})
    from hydra.utils import instantiate

    node = get(cfg, "shift")
    if node is not None:  # the corruptions come from the configured suite
        suite = instantiate(node)
    else:  # none configured: the digits suite that ships with the package
        from fallbackformer.data.shift import ShiftSuite

        suite = ShiftSuite()
    primary, student = system["primary"], system["student"]
    num_classes = int(get(cfg, "num_classes", 0)) or int(primary(system["splits"]["test"][0][:1])[-1].shape[1])
    router, report = fit_router(primary, student, system["splits"], config, suite, num_classes)
    return router, {**report, "fitted_by": "the benchmark (the system had no router)"}
