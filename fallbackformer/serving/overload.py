"""Overload: how many requests run the model at once, and the time kept for the way back.

A server on a few cores cannot run every request in flight through the model: their threads would
share the same cores and one interpreter lock with the event loop, and every request would miss its
deadline together (on the 2-core dev machine, 16 clients with 32 inference threads answered the p99
request in over 100 ms under a 50 ms budget). :class:`InflightBound` lets a fixed number of requests
run the model at once (one per core by default); a request that finds them all busy is answered at
once, on the event loop, by the safe default, recorded by the model like any answer
(``FallbackModel.shed``: reason ``deadline_predicted``, the detail names the bound).

A request that does run the model must still be answered when the model returns: the response is
encoded and handed back to the event loop, and on a busy loop (or a starved one: the cores are
shared with everything else) that hop waits its turn. :class:`ReturnAllowance` keeps a high
quantile of recent returns, and the server gives the model only what is left of the budget after it; when even
that leaves the model nothing, the request is shed on the loop at once (an answer that could not
come back in time is not worth computing: the policy's own rule for a predicted miss).

Both are used from the event loop's thread only (no locks).
"""

from __future__ import annotations

from collections import deque

__all__ = ["InflightBound", "ReturnAllowance"]


class InflightBound:
    """At most ``slots`` requests run the model at once.

    Args:
        slots: requests that may run the model at once (>= 1).
    """

    def __init__(self, slots: int) -> None:
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"InflightBound slots must be an int >= 1; got {slots!r}")
        self.slots = slots
        self.busy = 0

    def try_acquire(self) -> bool:
        """Take a slot (``True``), or ``False`` when all are busy."""
        if self.busy >= self.slots:
            return False
        self.busy += 1
        return True

    def release(self) -> None:
        self.busy -= 1

    @property
    def detail(self) -> str:
        """What a shed answer's record says."""
        return f"server busy: {self.slots} requests already running the model"


class ReturnAllowance:
    """Time kept back from each model call's budget for the way back to the client.

    A high quantile of recent returns: from the model's answer, through encoding and the hop back to
    the event loop, to the response handed to the server. Real requests add theirs, and a probe
    measures the bare hop back every few milliseconds (``ModelServer._probe``), so the figure follows
    the loop when no request runs the model (every one was shed), and the server runs the model
    again as soon as its answers could come back in time.

    Args:
        window: recent returns remembered.
        quantile: the quantile kept back (0.99: one model call in a hundred may come back later).
        floor_ms: never less than this.
    """

    def __init__(self, window: int = 512, quantile: float = 0.99, floor_ms: float = 0.5) -> None:
        if window < 1 or not 0.0 < quantile <= 1.0 or not floor_ms >= 0:
            raise ValueError(f"ReturnAllowance needs window >= 1, quantile in (0, 1] and floor_ms >= 0; "
                             f"got {window!r}, {quantile!r}, {floor_ms!r}")
        self.quantile, self.floor_ms = quantile, floor_ms
        self._recent: deque[float] = deque(maxlen=window)
        self._value = floor_ms
        self._stale = 0

    def add(self, ms: float) -> None:
        """One return time, in milliseconds."""
        self._recent.append(ms)
        self._stale += 1
        if ms > self._value or self._stale >= 32:  # a longer one at once, shorter ones in batches
            s = sorted(self._recent)
            self._value = max(self.floor_ms, s[min(len(s) - 1, int(self.quantile * len(s)))])
            self._stale = 0

    @property
    def ms(self) -> float:
        """The time to keep back from a model call for its answer to reach the client."""
        return self._value
