"""A fallback rung as the runtime will hold it: a name (its ``served_by``), a model and its gate.

A ladder is the primary's path, then the rungs in order (students, classical models), then the
response cache, then the typed safe default. Each model rung maps the raw input to logits ``[B, C]``
and answers where its :class:`~fallbackformer.gates.gate.ConfidenceGate` accepts; the names are the
``served_by`` values of the answers, so they are unique and none is a name the runtime already uses.

>>> rung = Rung("tree", tree_module, tree_gate)          # doctest: +SKIP
>>> accepted, confidence, prediction, logits = rung.decide(x)   # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fallbackformer.common.paths import CACHE, DEFAULT, PRIMARY, exit_index
from fallbackformer.gates.gate import ConfidenceGate

__all__ = ["CACHE", "RESERVED_NAMES", "Rung", "RungDecision", "check_ladder"]

RESERVED_NAMES = (PRIMARY, DEFAULT, CACHE)
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class RungDecision(NamedTuple):
    """One rung's answer for a batch: accepted [B] bool, confidence [B], prediction [B] long, logits [B, C]."""

    accepted: Tensor
    confidence: Tensor
    prediction: Tensor
    logits: Tensor


@dataclass(frozen=True, eq=False)
class Rung:
    """A model rung of the ladder.

    Args:
        name: its ``served_by`` name: lower case letters, digits and ``_``, starting with a letter, at
            most 32 characters; not ``primary``, ``default``, ``cache`` nor ``exit_<i>``.
        module: raw input ``[B, ...]`` -> logits ``[B, C]`` (a student, a classical rung), built by
            ``create_model`` so that a bundle can rebuild it.
        gate: its calibrated gate; ``None`` where a router decides for it.
    """

    name: str
    module: nn.Module
    gate: ConfidenceGate | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"rung name {self.name!r} is not a served_by name; use lower case letters, digits and "
                             "'_', starting with a letter, at most 32 characters (e.g. 'tree')")
        if self.name in RESERVED_NAMES or exit_index(self.name) is not None:
            raise ValueError(f"rung name {self.name!r} is taken by the runtime ({', '.join(RESERVED_NAMES)}, "
                             "exit_<i>); name the rung after what it is, e.g. 'tree' or 'linear'")
        if not isinstance(self.module, nn.Module):
            raise TypeError(f"rung {self.name!r} needs an nn.Module mapping the raw input to logits; got "
                            f"{type(self.module).__name__}")
        if self.gate is not None and not isinstance(self.gate, ConfidenceGate):
            raise TypeError(f"rung {self.name!r}'s gate must be a ConfidenceGate or None; got {type(self.gate).__name__}")

    @torch.no_grad()
    def decide(self, x: Tensor) -> RungDecision:
        """The rung's logits on the raw batch ``x`` and its gate's decision (nothing accepted without a gate)."""
        logits = self.module(x)  # [B, C]
        if self.gate is None:
            conf = torch.full((logits.shape[0],), float("nan"), device=logits.device)
            return RungDecision(torch.zeros_like(conf, dtype=torch.bool), conf, logits.argmax(1), logits)
        accepted, conf, pred = self.gate.decide(logits)
        return RungDecision(accepted, conf, pred, logits)

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry: name, the model's registry entry, the gate's config."""
        name, kwargs = getattr(self.module, "registry_name", None), getattr(self.module, "registry_kwargs", None)
        if name is None:
            raise ValueError(f"rung {self.name!r}'s model was not built by create_model; a bundle cannot rebuild it")
        return {"name": self.name, "model": {"registry_name": name, "registry_kwargs": dict(kwargs or {})},
                "gate": None if self.gate is None else self.gate.to_config()}


def check_ladder(rungs: Sequence[Rung]) -> list[str]:
    """Validate a ladder's rungs (each a :class:`Rung`, names unique); returns their names in order."""
    names: list[str] = []
    for i, rung in enumerate(rungs):
        if not isinstance(rung, Rung):
            raise TypeError(f"fallbacks[{i}] is a {type(rung).__name__}; wrap it: Rung('name', module, gate)")
        if rung.name in names:
            raise ValueError(f"two rungs are named {rung.name!r}; each rung's name is its served_by and must be unique")
        names.append(rung.name)
    return names
