"""A response cache rung: recent confident answers of the primary's path, for identical inputs only.

It is a fallback rung, not a front cache: the runtime consults it only when the primary's path
cannot answer (a deadline, an error, an open breaker), and serves a hit as ``served_by="cache"``.

* Exact match: the key is a BLAKE2b hash of the raw input row's bytes, its dtype and its shape (and the
  bundle's identity), so an input that differs in any bit (``-0.0`` from ``0.0`` included) misses.
* Only answers the primary's path gave (``"primary"`` or an early exit ``"exit_<i>"``) with
  confidence at least ``min_confidence`` are stored.
* Bounded: at most ``max_entries``, the least recently used evicted first; each entry lives
  ``ttl_ms`` on the injected clock's monotonic time (:class:`~fallbackformer.runtime.clock.Clock`).
* Bound to one bundle: :meth:`ResponseCache.bind` with another bundle's digest empties it.
* Thread-safe: one lock around every read and write.

>>> from fallbackformer.runtime.clock import FakeClock
>>> cache = ResponseCache(max_entries=2, ttl_ms=1000.0, min_confidence=0.9, clock=FakeClock())
>>> x = torch.zeros(1, 3)
>>> cache.store(x, torch.tensor([4]), torch.tensor([0.95]), ["primary"])
1
>>> cache.lookup(x).prediction.tolist()
[4]
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fallbackformer.common.jsonsafe import json_float, parse_json_float
from fallbackformer.common.paths import is_primary_path
from fallbackformer.runtime.clock import Clock, MonotonicClock

__all__ = ["CacheConfig", "CacheLookup", "ResponseCache", "input_keys"]

NS_PER_MS = 1_000_000


def input_keys(x: Tensor, bundle_id: str = "") -> list[bytes]:
    """One BLAKE2b digest per row of ``x [B, ...]``: the row's raw bytes, dtype, shape and ``bundle_id``."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"the cache keys a batch [B, ...]; got {type(x).__name__}"
                         + (f" of shape {tuple(x.shape)}" if isinstance(x, Tensor) else ""))
    rows = x.detach().cpu().contiguous().reshape(x.shape[0], -1)  # [B, D]
    raw = rows.view(torch.uint8).numpy() if rows.numel() else None  # [B, D * itemsize], the exact bytes
    prefix = f"{bundle_id}\0{x.dtype}\0{tuple(x.shape[1:])}\0".encode()
    keys = []
    for i in range(x.shape[0]):
        h = hashlib.blake2b(prefix, digest_size=16)
        if raw is not None:
            h.update(raw[i].tobytes())
        keys.append(h.digest())
    return keys


@dataclass(frozen=True)
class CacheConfig:
    """What a bundle's manifest stores about the cache rung.

    Attributes:
        max_entries: the most answers kept (least recently used evicted first).
        ttl_ms: how long an answer is kept, in milliseconds of the runtime's clock (``inf``: until evicted).
        min_confidence: the smallest confidence of the primary's path that is stored.
    """

    max_entries: int = 4096
    ttl_ms: float = 60_000.0
    min_confidence: float = 0.99

    def __post_init__(self) -> None:
        if isinstance(self.max_entries, bool) or not isinstance(self.max_entries, int) or self.max_entries < 1:
            raise ValueError(f"CacheConfig.max_entries={self.max_entries!r} must be an int >= 1")
        if not (isinstance(self.ttl_ms, (int, float)) and self.ttl_ms > 0):
            raise ValueError(f"CacheConfig.ttl_ms={self.ttl_ms!r} must be > 0 (inf: no expiry)")
        if not (isinstance(self.min_confidence, (int, float)) and 0.0 <= self.min_confidence <= 1.0):
            raise ValueError(f"CacheConfig.min_confidence={self.min_confidence!r} must lie in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return {"max_entries": self.max_entries, "ttl_ms": json_float(self.ttl_ms),
                "min_confidence": float(self.min_confidence)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheConfig":
        unknown = sorted(set(data) - {"max_entries", "ttl_ms", "min_confidence"})
        if unknown:
            raise ValueError(f"unknown cache fields {unknown}; known: ['max_entries', 'min_confidence', 'ttl_ms']")
        data = dict(data)
        if "ttl_ms" in data:
            data["ttl_ms"] = parse_json_float(data["ttl_ms"])
        return cls(**data)


class CacheLookup(NamedTuple):
    """A batch's lookup: ``hit`` BoolTensor [B]; ``prediction`` LongTensor [B] (-1 on a miss);
    ``confidence`` FloatTensor [B] (NaN on a miss); ``logits`` FloatTensor [B, C] (NaN rows on a
    miss; ``[B, 0]`` when no hit stored logits)."""

    hit: Tensor
    prediction: Tensor
    confidence: Tensor
    logits: Tensor


@dataclass
class _Entry:
    prediction: int
    confidence: float
    logits: Tensor | None
    expires_ns: float


class ResponseCache:
    """An exact-match, bounded, expiring cache of the primary's confident answers (see the module docstring).

    Args:
        max_entries: see :class:`CacheConfig`.
        ttl_ms: see :class:`CacheConfig`.
        min_confidence: see :class:`CacheConfig`.
        clock: the time source (a :class:`~fallbackformer.runtime.clock.Clock`; real monotonic time by default).
        bundle_id: the identity (digest) of the bundle whose answers are cached.
    """

    def __init__(self, max_entries: int = 4096, ttl_ms: float = 60_000.0, min_confidence: float = 0.99,
                 clock: Clock | None = None, bundle_id: str = "") -> None:
        self.config = CacheConfig(max_entries, float(ttl_ms), float(min_confidence))
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self._ttl_ns = math.inf if math.isinf(ttl_ms) else float(ttl_ms) * NS_PER_MS
        self._bundle_id = str(bundle_id)
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "stored": 0, "evicted": 0, "expired": 0, "cleared": 0}

    @classmethod
    def from_config(cls, config: CacheConfig, clock: Clock | None = None, bundle_id: str = "") -> "ResponseCache":
        return cls(config.max_entries, config.ttl_ms, config.min_confidence, clock, bundle_id)

    @property
    def bundle_id(self) -> str:
        return self._bundle_id

    def bind(self, bundle_id: str) -> None:
        """Serve answers of bundle ``bundle_id`` from now on; another bundle's answers are dropped."""
        with self._lock:
            if str(bundle_id) != self._bundle_id:
                self._clear_locked()
                self._bundle_id = str(bundle_id)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._clear_locked()

    def _clear_locked(self) -> None:
        if self._entries:
            self._counts["cleared"] += len(self._entries)
        self._entries.clear()

    def store(self, x: Tensor, prediction: Tensor, confidence: Tensor, served_by: Sequence[str],
              logits: Tensor | None = None) -> int:
        """Keep the rows of a served batch that the primary's path answered confidently enough.

        Args:
            x: the raw input ``[B, ...]`` exactly as served.
            prediction: LongTensor [B].
            confidence: FloatTensor [B], the serving path's calibrated confidence.
            served_by: per row, who served it (only ``"primary"`` and ``"exit_<i>"`` rows are kept).
            logits: optional ``[B, C]`` logits of the serving path, kept with the answer.

        Returns:
            The number of rows stored.
        """
        b = x.shape[0] if isinstance(x, Tensor) and x.dim() else -1
        if prediction.shape != (b,) or confidence.shape != (b,) or len(served_by) != b or (
                logits is not None and (logits.dim() != 2 or logits.shape[0] != b)):
            raise ValueError(f"store() needs one prediction, confidence and served_by per row of x (B={b}); got "
                             f"{tuple(prediction.shape)}, {tuple(confidence.shape)}, {len(served_by)}"
                             + (f", logits {tuple(logits.shape)}" if logits is not None else ""))
        conf = confidence.detach().float().cpu()
        keep = [i for i in range(b) if is_primary_path(served_by[i]) and bool(torch.isfinite(conf[i]))
                and float(conf[i]) >= self.config.min_confidence]
        if not keep:
            return 0
        keys = input_keys(x[keep], self._bundle_id)
        pred = prediction.detach().cpu()
        rows = logits.detach().float().cpu() if logits is not None else None
        with self._lock:
            now = self.clock.now_ns()
            for key, i in zip(keys, keep):
                entry = _Entry(int(pred[i]), float(conf[i]), None if rows is None else rows[i].clone(),
                               now + self._ttl_ns)
                self._entries[key] = entry
                self._entries.move_to_end(key)
                self._counts["stored"] += 1
            while len(self._entries) > self.config.max_entries:
                self._entries.popitem(last=False)
                self._counts["evicted"] += 1
        return len(keep)

    def lookup(self, x: Tensor) -> CacheLookup:
        """The cached answer of each row of ``x [B, ...]`` that is stored and not expired."""
        keys = input_keys(x, self._bundle_id)
        found: list[_Entry | None] = []
        with self._lock:
            now = self.clock.now_ns()
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and now >= entry.expires_ns:
                    del self._entries[key]
                    self._counts["expired"] += 1
                    entry = None
                if entry is None:
                    self._counts["misses"] += 1
                else:
                    self._entries.move_to_end(key)
                    self._counts["hits"] += 1
                found.append(entry)
        return _as_lookup(found, x.device)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        """Counts since construction: hits, misses, stored, evicted, expired, cleared, and ``size``."""
        with self._lock:
            return {**self._counts, "size": len(self._entries)}

    def __repr__(self) -> str:
        c = self.config
        return (f"ResponseCache(max_entries={c.max_entries}, ttl_ms={c.ttl_ms}, min_confidence={c.min_confidence}, "
                f"size={len(self)})")


def _as_lookup(found: list[_Entry | None], device: torch.device) -> CacheLookup:
    hit = torch.tensor([e is not None for e in found], dtype=torch.bool)
    prediction = torch.tensor([-1 if e is None else e.prediction for e in found], dtype=torch.long)
    confidence = torch.tensor([math.nan if e is None else e.confidence for e in found], dtype=torch.float32)
    widths = {e.logits.shape[0] for e in found if e is not None and e.logits is not None}
    width = widths.pop() if len(widths) == 1 else 0
    logits = torch.full((len(found), width), math.nan)
    for i, e in enumerate(found):
        if e is not None and e.logits is not None and e.logits.shape[0] == width:
            logits[i] = e.logits
    return CacheLookup(hit.to(device), prediction.to(device), confidence.to(device), logits.to(device))
