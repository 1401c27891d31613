"""Intermediate artifacts of the stage scripts (train -> distill -> calibrate -> export).

A stage writes a registered model as ``<name>.safetensors`` (weights only) and ``<name>.json``
(registry name and construction arguments); the next stage rebuilds it through the registry.
Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from fallbackformer.common.jsonsafe import dumps
from fallbackformer.models.registry import create_model


def save_model(model: nn.Module, directory: str | Path, name: str) -> Path:
    """Write ``model`` (built by :func:`create_model`) as ``directory/name.{safetensors,json}``."""
    if not hasattr(model, "registry_name"):
        raise ValueError(
            f"{type(model).__name__} was not built by fallbackformer.create_model, so it cannot be "
            "rebuilt; register a builder with fallbackformer.register_model and build it with create_model"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / f"{name}.safetensors"))
    spec = {"registry_name": model.registry_name, "registry_kwargs": model.registry_kwargs}
    (directory / f"{name}.json").write_text(dumps(spec, indent=2, where=f"{name} registry entry"))
    return directory / f"{name}.safetensors"


def load_model(directory: str | Path, name: str) -> nn.Module:
    """Rebuild a model written by :func:`save_model`, in eval mode."""
    directory = Path(directory)
    spec_path, weights_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    for path, made_by in ((spec_path, "its stage script"), (weights_path, "its stage script")):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run {made_by} first (scripts/train.py or scripts/distill.py)")
    spec = json.loads(spec_path.read_text())
    model = create_model(spec["registry_name"], **spec["registry_kwargs"])
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval()
