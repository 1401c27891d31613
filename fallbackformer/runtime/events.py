"""FallbackEvent: the audit record of one fallback, and the sink protocol.

A fallback is an answer not served by the primary's own path (its early exits and final head are that
path): :func:`fallbackformer.common.paths.is_fallback`. Exits and the primary emit no event.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class FallbackEvent:
    """One fallback: an answer served by the student or the safe default (not the primary's own path).

    Attributes:
        request_id: the call's id; ``sample`` is the index in that call's batch.
        time_unix: wall-clock time of the call (seconds since the epoch).
        served_by: who answered.
        reason: why the primary's path did not answer (one of ``fallbackformer.REASONS``).
        budget_ms: the policy's budget.
        elapsed_ms: time from the call's start to its answer.
        stage_ms: measured time of each primary stage that ran.
        confidence: the calibrated score of the serving path (None for the default).
        model_hashes: digests of the models (set by a loaded bundle), for the audit trail.
        detail: a short machine-readable detail (an exception's type, say); never the reason.
        governance: the online risk controller's state when the call was answered (lambda per
            threshold, error rate among labelled answers, labels taken, label-free accuracy); empty
            without a governor.
    """

    request_id: str
    sample: int
    time_unix: float
    served_by: str
    reason: str
    budget_ms: float
    elapsed_ms: float
    stage_ms: list[float] = field(default_factory=list)
    confidence: float | None = None
    model_hashes: dict[str, str] = field(default_factory=dict)
    detail: str = ""
    governance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EventSink(Protocol):
    """Anything that takes events: an audit log, a metrics exporter, a list in a test."""

    def emit(self, event: FallbackEvent) -> None: ...


class ListSink:
    """Keeps events in memory (tests, notebooks); an append, given events on the caller's thread."""

    nonblocking = True  # (an append never blocks: the model skips its dispatcher for it)

    def __init__(self) -> None:
        self.events: list[FallbackEvent] = []

    def emit(self, event: FallbackEvent) -> None:
        self.events.append(event)
