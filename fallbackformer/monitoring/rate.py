"""FallbackRateMonitor: notices when the fallback rate creeps past what was signed off.

"Fallbacks should be rare and intentional": a rate that rises silently masks a deeper problem. The
monitor is an event sink; it keeps the served_by of the last ``window`` answers and raises an alert
when the share of fallbacks (:func:`~fallbackformer.common.paths.is_fallback`: answers not served by
the primary's own path) exceeds ``max_rate`` (the bundle's
acceptable degradation). An alert can pull the rollback switch, if the owner asked for that.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from fallbackformer.common.paths import PRIMARY, is_fallback
from fallbackformer.runtime.events import FallbackEvent


@dataclass
class RateAlert:
    """One alert: the rate over the window, the limit, and the answers it was computed on."""

    rate: float
    max_rate: float
    window: int
    answers: int


class FallbackRateMonitor:
    """Rolling fallback rate over the last ``window`` answers, with an alert past ``max_rate``.

    Feed it every answer with :meth:`observe` (``served_by`` lists of outputs), or attach it as a sink
    and call :meth:`observe_answers` for answers served by the primary, which emit no event.

    Args:
        max_rate: the highest acceptable share of fallbacks (student + default).
        window: answers in the rolling window.
        min_answers: answers needed before any alert (no alert on a handful of samples).
        on_alert: called with each :class:`RateAlert` (page someone, pull the rollback switch).
    """

    def __init__(self, max_rate: float, window: int = 1000, min_answers: int = 200,
                 on_alert: Callable[[RateAlert], None] | None = None) -> None:
        if not 0.0 <= max_rate <= 1.0:
            raise ValueError(f"max_rate must be in [0, 1]; got {max_rate!r}")
        if window < 1 or not 1 <= min_answers <= window:
            raise ValueError(f"need window >= 1 and 1 <= min_answers <= window; got {window}, {min_answers}")
        self.max_rate, self.window, self.min_answers = max_rate, window, min_answers
        self.on_alert = on_alert
        self._recent: deque[bool] = deque(maxlen=window)
        self._fallbacks = 0
        self._lock = threading.Lock()
        self.alerts: list[RateAlert] = []
        self._alerting = False

    @property
    def rate(self) -> float:
        """Fallback share over the current window (0 when empty)."""
        with self._lock:
            return self._fallbacks / len(self._recent) if self._recent else 0.0

    def observe(self, served_by: list[str]) -> RateAlert | None:
        """Count a batch of answers; return the alert if this batch crossed ``max_rate``."""
        with self._lock:
            for who in served_by:
                if len(self._recent) == self._recent.maxlen and self._recent[0]:
                    self._fallbacks -= 1
                fallback = is_fallback(who)
                self._recent.append(fallback)
                self._fallbacks += fallback
            n = len(self._recent)
            rate = self._fallbacks / n if n else 0.0
            over = n >= self.min_answers and rate > self.max_rate
            alert = None
            if over and not self._alerting:  # alert once per excursion, not on every answer
                alert = RateAlert(rate, self.max_rate, self.window, n)
                self.alerts.append(alert)
            self._alerting = over
        if alert is not None and self.on_alert is not None:
            self.on_alert(alert)
        return alert

    def emit(self, event: FallbackEvent) -> None:
        """Sink interface: an event is one fallback (an answer not served by the primary's own path)."""
        self.observe([event.served_by])

    def observe_answers(self, count: int, served_by: str = PRIMARY) -> None:
        """Count ``count`` answers that produced no event (served by the primary's own path)."""
        self.observe([served_by] * count)
