"""The closed vocabulary of fallback reasons. Extend it here, deliberately; never with free text."""

from __future__ import annotations

# served_by values besides "exit_<i>": named in fallbackformer.common.paths, re-exported here.
from fallbackformer.common.paths import CACHE, DEFAULT, PRIMARY, STUDENT  # noqa: F401

LOW_CONFIDENCE = "low_confidence"
DEADLINE_PREDICTED = "deadline_predicted"
DEADLINE_EXCEEDED = "deadline_exceeded"
PRIMARY_ERROR = "primary_error"
NONFINITE_OUTPUT = "nonfinite_output"
BREAKER_OPEN = "breaker_open"
INVALID_INPUT = "invalid_input"
CALIBRATION_DRIFT = "calibration_drift"
ROUTER_PREFERRED = "router_preferred"  # the router judged the student more likely right than the primary
RUNG_DISAGREEMENT = "rung_disagreement"  # the agreement veto: no vetoing rung predicted the same class

REASONS: tuple[str, ...] = (
    LOW_CONFIDENCE,
    DEADLINE_PREDICTED,
    DEADLINE_EXCEEDED,
    PRIMARY_ERROR,
    NONFINITE_OUTPUT,
    BREAKER_OPEN,
    INVALID_INPUT,
    CALIBRATION_DRIFT,
    ROUTER_PREFERRED,
    RUNG_DISAGREEMENT,
)

#: the reasons for which the primary's path could not answer at all (the response cache may serve)
PRIMARY_DOWN: frozenset[str] = frozenset({DEADLINE_PREDICTED, DEADLINE_EXCEEDED, PRIMARY_ERROR, BREAKER_OPEN})
