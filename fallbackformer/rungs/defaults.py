"""Typed safe defaults: the last rung of the ladder, the answer when no model's answer can be served.

Each default is a frozen dataclass, stored in a bundle's manifest as data (``to_dict`` / ``from_dict``
through JSON; a user's function by its registered name, never as code), and answers a batch with
:meth:`SafeDefault.answer`: a :class:`DefaultAnswer` of ``prediction`` (a class, or ``-1`` for an
abstention or a set-valued answer), ``confidence`` and ``prediction_set``, a boolean mask over the
classes (the classes the answer leaves possible: one class for a class, all of them for an
abstention, a group for a coarse answer).

* :class:`Abstain`: ``-1``, confidence NaN, every class possible (what ``Policy(default_class=None)`` means).
* :class:`ConstantClass`: class ``c``, confidence NaN (what ``Policy(default_class=c)`` means).
* :class:`Prior`: the most frequent training class, its frequency as the confidence.
* :class:`Coarse`: a group of classes from a hierarchy the user supplies (``{"loop": [0, 6, 8, 9]}``):
  the group with the most probability mass under the best logits available, ``-1`` with the group as
  ``prediction_set`` and its mass as the confidence; rows without finite logits abstain.
* :class:`CallableDefault`: a registered function ``fn(x, logits) -> LongTensor [B]`` (classes or -1),
  looked up by name (:func:`register_default_action`).

>>> Coarse({"loop": [0, 6, 8, 9], "straight": [1, 4, 7]}).answer(torch.tensor([[0.0, 0, 0, 0, 0, 0, 3, 0, 2, 0]])).prediction_set[0].nonzero().flatten().tolist()
[0, 6, 8, 9]
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Abstain",
    "CallableDefault",
    "Coarse",
    "ConstantClass",
    "DEFAULT_KINDS",
    "DefaultAnswer",
    "Prior",
    "SafeDefault",
    "default_from_dict",
    "default_from_policy",
    "list_default_actions",
    "register_default_action",
]


class DefaultAnswer(NamedTuple):
    """What a default answers for a batch: prediction LongTensor [B], confidence FloatTensor [B],
    prediction_set BoolTensor [B, C]."""

    prediction: Tensor
    confidence: Tensor
    prediction_set: Tensor


def _check_logits(logits: Tensor) -> tuple[int, int]:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"a safe default reads logits [B, C] (NaN rows where no path produced any), got {shape}; "
                         "pass torch.full((B, num_classes), float('nan')) when no path produced logits")
    return int(logits.shape[0]), int(logits.shape[1])


def _class_index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what}={value!r} is not a class index; use an int >= 0")
    return int(value)


def _single(pred: Tensor, num_classes: int, confidence: Tensor) -> DefaultAnswer:
    """Answers that are one class (or -1: every class possible)."""
    sets = torch.zeros(pred.shape[0], num_classes, dtype=torch.bool, device=pred.device)
    answered = pred >= 0
    sets[answered, pred[answered]] = True
    sets[~answered] = True
    return DefaultAnswer(pred, confidence, sets)


def _nan(batch: int, device: torch.device) -> Tensor:
    return torch.full((batch,), math.nan, dtype=torch.float32, device=device)


class SafeDefault(ABC):
    """The interface every typed default keeps (see the module docstring)."""

    kind: ClassVar[str] = ""

    def check(self, num_classes: int) -> None:
        """Raise a ``ValueError`` naming the bad value if this default does not fit ``num_classes`` classes."""

    @abstractmethod
    def answer(self, logits: Tensor, x: Tensor | None = None) -> DefaultAnswer:
        """The default's answer for a batch: ``logits [B, C]`` are the best available (NaN rows where none);
        ``x`` is the raw input (read by a :class:`CallableDefault` only)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form a manifest stores; :func:`default_from_dict` reads it back."""
        return {"kind": self.kind}


@dataclass(frozen=True)
class Abstain(SafeDefault):
    """Answer nothing: ``-1``, confidence NaN, every class possible."""

    kind: ClassVar[str] = "abstain"

    def answer(self, logits: Tensor, x: Tensor | None = None) -> DefaultAnswer:
        b, c = _check_logits(logits)
        pred = torch.full((b,), -1, dtype=torch.long, device=logits.device)
        return _single(pred, c, _nan(b, logits.device))


@dataclass(frozen=True)
class ConstantClass(SafeDefault):
    """Always the same class (a domain's safe action), confidence NaN.

    Args:
        class_index: the class.
    """

    class_index: int
    kind: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        _class_index(self.class_index, "ConstantClass.class_index")

    def check(self, num_classes: int) -> None:
        if self.class_index >= num_classes:
            raise ValueError(f"ConstantClass.class_index={self.class_index} is not one of the {num_classes} classes "
                             f"(0..{num_classes - 1}); choose a class the model has")

    def answer(self, logits: Tensor, x: Tensor | None = None) -> DefaultAnswer:
        b, c = _check_logits(logits)
        self.check(c)
        pred = torch.full((b,), self.class_index, dtype=torch.long, device=logits.device)
        return _single(pred, c, _nan(b, logits.device))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "class_index": self.class_index}


@dataclass(frozen=True)
class Prior(SafeDefault):
    """The most frequent training class, with its frequency as the confidence (:meth:`from_labels`).

    Args:
        class_index: the class.
        frequency: its share of the training labels, in (0, 1].
    """

    class_index: int
    frequency: float
    kind: ClassVar[str] = "prior"

    def __post_init__(self) -> None:
        _class_index(self.class_index, "Prior.class_index")
        if not (isinstance(self.frequency, (int, float)) and 0.0 < float(self.frequency) <= 1.0):
            raise ValueError(f"Prior.frequency={self.frequency!r} must lie in (0, 1]; build it with Prior.from_labels")

    @classmethod
    def from_labels(cls, labels: Tensor, num_classes: int) -> "Prior":
        """The prior of integer training labels ``[N]`` (ties: the smallest class)."""
        labels = torch.as_tensor(labels).long().flatten()
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be a non-empty set of class indices in 0..{num_classes - 1}; got "
                             f"{labels.numel()} labels" + (f" in {labels.min().item()}..{labels.max().item()}"
                                                           if labels.numel() else ""))
        counts = torch.bincount(labels, minlength=num_classes)
        top = int(counts.argmax())
        return cls(top, float(counts[top]) / labels.numel())

    def check(self, num_classes: int) -> None:
        ConstantClass(self.class_index).check(num_classes)

    def answer(self, logits: Tensor, x: Tensor | None = None) -> DefaultAnswer:
        b, c = _check_logits(logits)
        self.check(c)
        pred = torch.full((b,), self.class_index, dtype=torch.long, device=logits.device)
        return _single(pred, c, torch.full((b,), float(self.frequency), device=logits.device))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "class_index": self.class_index, "frequency": float(self.frequency)}


@dataclass(frozen=True)
class Coarse(SafeDefault):
    """A coarse, set-valued answer: the group of classes with the most probability mass.

    Args:
        groups: ``{name: classes}``, disjoint and non-empty (classes need not all be covered; the
            mass of uncovered classes counts for no group). Ties go to the first group.
        min_mass: below this mass the row abstains (every class possible) instead.

    ``prediction`` is -1 (an abstention for accuracy; the set is reported on its own), the confidence
    is the group's mass under ``softmax(logits)`` (pass calibrated logits for a calibrated mass).
    """

    groups: Mapping[str, Sequence[int]]
    min_mass: float = 0.0
    kind: ClassVar[str] = "coarse"
    _members: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.groups, Mapping) or not self.groups:
            raise ValueError(f"Coarse.groups={self.groups!r} must be a non-empty {{name: [classes]}} mapping")
        seen: dict[int, str] = {}
        members = []
        for name, classes in self.groups.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Coarse group name {name!r} must be a non-empty string")
            if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, set, frozenset)) or not classes:
                raise ValueError(f"Coarse group {name!r} is empty or not a list of classes ({classes!r}); give it "
                                 "at least one class index")
            group = tuple(sorted({_class_index(c, f"a class of Coarse group {name!r}") for c in classes}))
            for c in group:
                if c in seen:
                    raise ValueError(f"class {c} is in Coarse groups {seen[c]!r} and {name!r}; groups must not overlap")
                seen[c] = name
            members.append(group)
        if not 0.0 <= float(self.min_mass) <= 1.0:
            raise ValueError(f"Coarse.min_mass={self.min_mass!r} must lie in [0, 1]")
        object.__setattr__(self, "groups", {n: list(g) for n, g in zip(self.groups, members)})
        object.__setattr__(self, "_members", tuple(members))

    def __hash__(self) -> int:  # the groups are a dict (JSON's form); hash what they hold
        return hash((tuple(self.groups), self._members, float(self.min_mass)))

    def check(self, num_classes: int) -> None:
        for name, group in zip(self.groups, self._members):
            if group[-1] >= num_classes:
                raise ValueError(f"Coarse group {name!r} names class {group[-1]}, but there are {num_classes} classes "
                                 f"(0..{num_classes - 1}); fix the hierarchy")

    def masks(self, num_classes: int, device: torch.device | None = None) -> Tensor:
        """The groups as a boolean matrix ``[G, C]``."""
        self.check(num_classes)
        m = torch.zeros(len(self._members), num_classes, dtype=torch.bool, device=device)
        for g, group in enumerate(self._members):
            m[g, list(group)] = True
        return m

    def answer(self, logits: Tensor, x: Tensor | None = None) -> DefaultAnswer:
        b, c = _check_logits(logits)
        masks = self.masks(c, logits.device)  # [G, C]
        z = logits.float()
        finite = torch.isfinite(z).all(dim=1)  # [B]
        probs = torch.softmax(torch.where(finite[:, None], z, torch.zeros_like(z)), dim=1)  # [B, C]
        mass = probs @ masks.float().T  # [B, G]
        best_mass, best = mass.max(dim=1)  # first group on ties
        ok = finite & (best_mass >= self.min_mass)
        sets = torch.where(ok[:, None], masks[best], torch.ones_like(masks[best]))  # [B, C]
        confidence = torch.where(ok, best_mass, torch.full_like(best_mass, math.nan))
        return DefaultAnswer(torch.full((b,), -1, dtype=torch.long, device=logits.device), confidence, sets)

    def group_of(self, prediction_set: Tensor) -> list[str | None]:
        """The group name of each row of a ``prediction_set`` (``None`` for a row that is no group)."""
        masks = self.masks(prediction_set.shape[1], prediction_set.device)
        hits = (prediction_set[:, None, :] == masks[None]).all(dim=2)  # [B, G]
        names = list(self.groups)
        return [names[int(h.nonzero()[0])] if h.any() else None for h in hits]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "groups": {n: list(g) for n, g in self.groups.items()},
                "min_mass": float(self.min_mass)}


_ACTIONS: dict[str, Callable[[Tensor | None, Tensor], Tensor]] = {}
_ACTIONS_LOCK = threading.Lock()


def register_default_action(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn(x, logits) -> LongTensor [B]`` (a class per row, or -1) under ``name``.

    A bundle stores the name; register the function before loading the bundle.

    >>> @register_default_action("stop")
    ... def stop(x, logits):
    ...     return torch.zeros(logits.shape[0], dtype=torch.long)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a default action's name must be a non-empty string, got {name!r}")

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if not callable(fn):
            raise TypeError(f"register_default_action({name!r}) decorates a function, got {type(fn).__name__}")
        with _ACTIONS_LOCK:
            if name in _ACTIONS and _ACTIONS[name] is not fn:
                raise ValueError(f"default action {name!r} is already registered by {_ACTIONS[name]!r}; "
                                 "choose another name")
            _ACTIONS[name] = fn
        return fn

    return decorator


def list_default_actions() -> list[str]:
    """The registered default action names, sorted."""
    with _ACTIONS_LOCK:
        return sorted(_ACTIONS)


@dataclass(frozen=True)
class CallableDefault(SafeDefault):
    """A user's default-safe action: the function registered under ``name`` (never stored as code).

    Args:
        name: a name given to :func:`register_default_action`.
    """

    name: str
    kind: ClassVar[str] = "callable"

    def __post_init__(self) -> None:
        self.function()

    def function(self) -> Callable[..., Tensor]:
        """The registered function."""
        with _ACTIONS_LOCK:
            fn = _ACTIONS.get(self.name)
            known = sorted(_ACTIONS)
        if fn is None:
            raise ValueError(f"no default action is registered as {self.name!r} (registered: {known}); register "
                             f"it with @fallbackformer.rungs.register_default_action({self.name!r}) before use")
        return fn

    def answer(self, logits: Tensor, x: Tensor | None = None) -> DefaultAnswer:
        b, c = _check_logits(logits)
        pred = self.function()(x, logits)
        if not isinstance(pred, Tensor) or pred.shape != (b,) or pred.dtype not in (torch.int64, torch.int32):
            got = f"{pred.dtype} {tuple(pred.shape)}" if isinstance(pred, Tensor) else type(pred).__name__
            raise ValueError(f"default action {self.name!r} returned {got}; it must return an integer tensor [B] "
                             f"(B={b}) of classes or -1")
        pred = pred.long().to(logits.device)
        if bool(((pred < -1) | (pred >= c)).any()):
            raise ValueError(f"default action {self.name!r} returned {pred.tolist()}; each value must be a class in "
                             f"0..{c - 1} or -1 (abstain)")
        return _single(pred, c, _nan(b, logits.device))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name}


DEFAULT_KINDS: dict[str, type[SafeDefault]] = {
    cls.kind: cls for cls in (Abstain, ConstantClass, Prior, Coarse, CallableDefault)
}


def default_from_dict(data: Mapping[str, Any]) -> SafeDefault:
    """Rebuild a default from :meth:`SafeDefault.to_dict` (a manifest's JSON), validating it."""
    if not isinstance(data, Mapping) or data.get("kind") not in DEFAULT_KINDS:
        kind = data.get("kind") if isinstance(data, Mapping) else data
        raise ValueError(f"unknown safe default kind {kind!r}; use one of {sorted(DEFAULT_KINDS)}")
    cls = DEFAULT_KINDS[data["kind"]]
    fields = {k: v for k, v in data.items() if k != "kind"}
    allowed = {"abstain": set(), "constant": {"class_index"}, "prior": {"class_index", "frequency"},
               "coarse": {"groups", "min_mass"}, "callable": {"name"}}[cls.kind]
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"safe default {cls.kind!r} has unknown fields {unknown}; it takes {sorted(allowed)}")
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ValueError(f"safe default {cls.kind!r} needs the fields {sorted(allowed)}; got {sorted(fields)} "
                         f"({exc})") from None


def default_from_policy(default_class: int | None) -> SafeDefault:
    """The typed form of today's ``Policy.default_class``: ``None`` abstains, an int is a constant class."""
    return Abstain() if default_class is None else ConstantClass(default_class)
