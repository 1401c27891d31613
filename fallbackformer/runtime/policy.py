"""Policy: the reliability contract a FallbackModel serves under."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

INVALID_INPUT_ACTIONS = ("raise", "default")


@dataclass
class Policy:
    """What the runtime promises and how it degrades.

    Attributes:
        budget_ms: the latency budget of one call.
        default_class: the safe default's class, or ``None`` for the default to abstain (-1).
        on_invalid_input: ``"raise"`` a clear error, or serve the safe ``"default"`` with reason
            ``invalid_input`` for the bad samples only.
        margin_ms: safety margin kept free for the fallback path when checking the deadline.
    """

    budget_ms: float = 50.0
    default_class: int | None = None
    on_invalid_input: str = "raise"
    margin_ms: float = 0.5

    def __post_init__(self) -> None:
        if not self.budget_ms > 0:
            raise ValueError(f"Policy.budget_ms must be > 0; got {self.budget_ms!r}")
        if self.margin_ms < 0:
            raise ValueError(f"Policy.margin_ms must be >= 0; got {self.margin_ms!r}")
        if self.on_invalid_input not in INVALID_INPUT_ACTIONS:
            raise ValueError(
                f"Policy.on_invalid_input={self.on_invalid_input!r}; use one of {INVALID_INPUT_ACTIONS}"
            )
        if self.default_class is not None and (not isinstance(self.default_class, int) or self.default_class < 0):
            raise ValueError(
                f"Policy.default_class={self.default_class!r}; use a class index >= 0, or None to abstain"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Policy":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Policy fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)
