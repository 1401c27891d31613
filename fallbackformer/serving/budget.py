"""Per-request budgets for concurrent callers of one :class:`~fallbackformer.FallbackModel`.

The runtime reads the policy once, at the start of a call, and hands it down to admission, hedging
and the events. Assigning a per-request policy to ``model.policy`` from several server threads would
race: one request's budget would leak into another's call. :class:`RequestBudgets` instead gives a
call its own policy on its own thread (``FallbackModel.policy_override``): no lock on the request
path; every other reader (``stats()``, ``set_rollback`` from another thread) sees the shared policy.

>>> budgets = RequestBudgets(model)              # doctest: +SKIP
>>> with budgets.apply(5.0):                     # doctest: +SKIP
...     out = model(x)                           # this call only: budget min(5.0, policy.budget_ms)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.policy import Policy

_CACHE_SIZE = 256


class RequestBudgets:
    """Give each call its own budget, capped by the model's policy budget, without races.

    Args:
        model: the model to serve. Behaviour is unchanged for calls made outside :meth:`apply`.
    """

    def __init__(self, model: FallbackModel) -> None:
        if not isinstance(model, FallbackModel):
            raise TypeError(f"RequestBudgets needs a fallbackformer.FallbackModel; got {type(model).__name__}")
        self.model = model
        self._cache: dict[Any, Policy] = {}

    @property
    def base(self) -> Policy:
        """The shared policy (what calls without an override use)."""
        return self.model.runtime.base_policy

    def effective_ms(self, budget_ms: float | None) -> float:
        """The budget a call gets: ``min(budget_ms, policy.budget_ms)``; the policy's when ``None``.

        Raises:
            ValueError: for a budget that is not a finite number > 0 (the message names it).
        """
        base = self.base.budget_ms
        if budget_ms is None:
            return base
        if isinstance(budget_ms, bool) or not isinstance(budget_ms, (int, float)) or not math.isfinite(budget_ms) \
                or budget_ms <= 0:
            raise ValueError(f"budget_ms must be a finite number > 0 (milliseconds); got {budget_ms!r}")
        return min(float(budget_ms), base)

    def policy_for(self, budget_ms: float | None) -> Policy:
        """The policy object for a call with this budget (cached per base policy and budget)."""
        base = self.base
        ms = self.effective_ms(budget_ms)
        if ms == base.budget_ms:
            return base
        cache = self._cache
        if cache.get("base") is not base or len(cache) > _CACHE_SIZE:
            cache = self._cache = {"base": base}  # a new base policy (or a full cache): start over
        policy = cache.get(ms)
        if policy is None:  # (two threads may both build one: harmless, they are equal)
            policy = cache[ms] = dataclasses.replace(base, budget_ms=ms)
        return policy

    @contextlib.contextmanager
    def apply(self, budget_ms: float | None) -> Iterator[Policy]:
        """Within the block, calls of the model *on this thread* use ``policy_for(budget_ms)``.

        Yields:
            The policy in force (its ``budget_ms`` is the effective budget).
        """
        policy = self.policy_for(budget_ms)
        with self.model.policy_override(None if policy is self.base else policy):
            yield policy
