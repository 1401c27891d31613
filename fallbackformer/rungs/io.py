"""Save and load one fallback rung on its own: weights as safetensors, construction as JSON, no pickle.

Any model built by :func:`~fallbackformer.models.registry.create_model` (the classical rungs, a
reduced-input student) is a rung folder::

    <folder>/rung.json          {"format", "registry_name", "registry_kwargs", "weights", "sha256"}
    <folder>/rung.safetensors   the state dict (weights and buffers)

Loading verifies the weights' SHA-256 on the bytes it deserializes, rebuilds the model through the
registry and loads the tensors strictly (every name and shape must match).

>>> save_rung(fit.module, "rungs/tree")      # doctest: +SKIP
>>> tree = load_rung("rungs/tree")           # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from fallbackformer.common.jsonsafe import dumps

__all__ = ["RUNG_FORMAT", "load_rung", "save_rung"]

RUNG_FORMAT = "fallbackformer-rung/1"
CONFIG_FILE = "rung.json"
WEIGHTS_FILE = "rung.safetensors"


def save_rung(module: nn.Module, folder: str | Path) -> Path:
    """Write ``module`` (built by ``create_model``) to ``folder``; returns the folder.

    Raises:
        ValueError: for a module the registry cannot rebuild, or arguments JSON cannot hold.
    """
    from safetensors.torch import save as save_bytes

    name, kwargs = getattr(module, "registry_name", None), getattr(module, "registry_kwargs", None)
    if name is None or kwargs is None:
        raise ValueError(f"the rung ({type(module).__name__}) was not built by fallbackformer.create_model, so it "
                         "cannot be rebuilt without pickling; build it with create_model('<registered name>', ...)")
    if json.loads(dumps(kwargs)) != kwargs:
        raise ValueError(f"the rung's registry_kwargs {kwargs!r} do not survive JSON; use numbers, strings, lists, dicts")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    blob = save_bytes(state, metadata={"fallbackformer": RUNG_FORMAT})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": RUNG_FORMAT, "registry_name": name, "registry_kwargs": kwargs, "weights": WEIGHTS_FILE,
              "sha256": hashlib.sha256(blob).hexdigest()}
    _write_atomic(folder / WEIGHTS_FILE, blob)
    _write_atomic(folder / CONFIG_FILE, (dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


def load_rung(folder: str | Path) -> nn.Module:
    """Rebuild the rung saved in ``folder`` (in eval mode), verifying its weights' hash.

    Raises:
        ValueError: for a missing or malformed config, a hash mismatch, or tensors that do not fit the
            rebuilt model; the message names the file and the fix.
    """
    from safetensors.torch import load as load_bytes

    from fallbackformer.models.registry import create_model

    folder = Path(folder)
    config = _read_config(folder / CONFIG_FILE)
    blob = (folder / config["weights"]).read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != config["sha256"]:
        raise ValueError(f"{folder / config['weights']} has SHA-256 {digest[:12]}... but {CONFIG_FILE} records "
                         f"{str(config['sha256'])[:12]}...; the files were changed after saving: re-save the rung")
    module = create_model(config["registry_name"], **config["registry_kwargs"])
    try:
        module.load_state_dict(load_bytes(blob), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the tensors in {folder / config['weights']} do not fit {config['registry_name']}"
                         f"(**{config['registry_kwargs']}): {exc}; re-save the rung from the model that made them") from None
    return module.eval()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; save the rung with fallbackformer.rungs.save_rung") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); re-save the rung") from None
    need = {"format": str, "registry_name": str, "registry_kwargs": dict, "weights": str, "sha256": str}
    bad = [k for k, t in need.items() if not isinstance(config, dict) or not isinstance(config.get(k), t)]
    if bad or config["format"] != RUNG_FORMAT:
        raise ValueError(f"{path} is not a {RUNG_FORMAT} config (bad or missing fields {bad or ['format']}); re-save it")
    if Path(config["weights"]).name != config["weights"]:
        raise ValueError(f"{path} names weights {config['weights']!r} outside its folder; re-save the rung")
    return config


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

