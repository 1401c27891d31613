"""The response cache rung: exact matches only, the primary path's confident answers only, bounded,
expiring on the injected clock, emptied by another bundle, safe under threads."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from fallbackformer.rungs.cache import CacheConfig, ResponseCache, input_keys
from fallbackformer.runtime.clock import FakeClock


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (n, 1, 8, 8), generator=g).float()  # raw digits-like images


def _serve(cache: ResponseCache, x: torch.Tensor, conf: float = 0.999, served: str = "primary", offset: int = 0) -> int:
    n = x.shape[0]
    return cache.store(x, (torch.arange(n) + offset) % 10, torch.full((n,), conf), [served] * n,
                       logits=torch.arange(n * 10, dtype=torch.float32).reshape(n, 10))


def test_identical_inputs_hit_and_near_duplicates_miss():
    cache = ResponseCache(max_entries=100, ttl_ms=1000.0, min_confidence=0.9, clock=FakeClock())
    x = _batch(4)
    assert _serve(cache, x) == 4
    same = x.clone()  # another tensor, the same bytes
    hit = cache.lookup(same)
    assert hit.hit.all() and hit.prediction.tolist() == [0, 1, 2, 3]
    assert hit.confidence.tolist() == pytest.approx([0.999] * 4)
    assert torch.equal(hit.logits, torch.arange(40, dtype=torch.float32).reshape(4, 10))
    near = x.clone()
    near[1, 0, 3, 3] += 1e-6
    near[2, 0, 0, 0] = -0.0 if x[2, 0, 0, 0] == 0 else x[2, 0, 0, 0] + 1e-6  # also -0.0 against 0.0: other bytes
    assert not torch.equal(near[1], x[1]) and not torch.equal(near[2].view(torch.int32), x[2].view(torch.int32))
    got = cache.lookup(near)
    assert got.hit.tolist() == [True, False, False, True]
    assert got.prediction.tolist() == [0, -1, -1, 3] and math.isnan(got.confidence[1])
    assert torch.isnan(got.logits[1]).all()
    # dtype and shape are part of the key: the same values in float64 or another layout miss
    assert not cache.lookup(x.double()).hit.any()
    assert not cache.lookup(x.reshape(4, 64)).hit.any()
    assert cache.stats()["hits"] == 6 and cache.stats()["misses"] == 10


def test_only_the_primary_paths_confident_answers_are_stored():
    cache = ResponseCache(min_confidence=0.95, clock=FakeClock())
    x = _batch(6, seed=1)
    stored = cache.store(x, torch.zeros(6, dtype=torch.long),
                         torch.tensor([0.99, 0.94, 0.99, 0.99, float("nan"), 0.96]),
                         ["primary", "primary", "student", "default", "exit_2", "exit_1"])
    assert stored == 2 and len(cache) == 2
    assert cache.lookup(x).hit.tolist() == [True, False, False, False, False, True]
    with pytest.raises(ValueError, match="one prediction, confidence and served_by per row"):
        cache.store(x, torch.zeros(5, dtype=torch.long), torch.ones(6), ["primary"] * 6)


def test_bounded_least_recently_used_first():
    cache = ResponseCache(max_entries=3, ttl_ms=math.inf, min_confidence=0.0, clock=FakeClock())
    x = _batch(5, seed=2)
    _serve(cache, x[:3])
    assert cache.lookup(x[:1]).hit.all()  # row 0 is now the most recently used
    _serve(cache, x[3:5])  # two more: rows 1 and 2 go
    assert len(cache) == 3 and cache.stats()["evicted"] == 2
    assert cache.lookup(x).hit.tolist() == [True, False, False, True, True]
    _serve(cache, _batch(50, seed=3))
    assert len(cache) == 3


def test_entries_expire_after_the_ttl_on_the_injected_clock():
    clock = FakeClock()
    cache = ResponseCache(ttl_ms=100.0, min_confidence=0.0, clock=clock)
    x = _batch(2, seed=4)
    _serve(cache, x[:1])
    clock.advance(60.0)
    _serve(cache, x[1:])
    clock.advance(39.999)
    assert cache.lookup(x).hit.tolist() == [True, True]
    clock.advance(0.001)  # row 0 is exactly 100 ms old
    assert cache.lookup(x).hit.tolist() == [False, True]
    clock.advance(60.0)
    assert cache.lookup(x).hit.tolist() == [False, False]
    assert cache.stats()["expired"] == 2 and len(cache) == 0


def test_another_bundle_empties_it_and_its_keys_never_match():
    cache = ResponseCache(min_confidence=0.0, clock=FakeClock(), bundle_id="sha256:aaa")
    x = _batch(3, seed=5)
    _serve(cache, x)
    cache.bind("sha256:aaa")  # the same bundle reloaded: kept
    assert len(cache) == 3
    cache.bind("sha256:bbb")
    assert len(cache) == 0 and not cache.lookup(x).hit.any() and cache.bundle_id == "sha256:bbb"
    assert input_keys(x, "sha256:aaa") != input_keys(x, "sha256:bbb")
    assert input_keys(x, "a") == input_keys(x.clone(), "a") and len(set(input_keys(x, "a"))) == 3


def test_config_round_trips_and_bad_values_are_named():
    config = CacheConfig(max_entries=10, ttl_ms=math.inf, min_confidence=0.97)
    assert CacheConfig.from_dict(config.to_dict()) == config and config.to_dict()["ttl_ms"] == "inf"
    assert ResponseCache.from_config(config).config == config
    for bad, match in (({"max_entries": 0}, "max_entries=0"), ({"ttl_ms": 0.0}, "ttl_ms=0.0"),
                       ({"min_confidence": 1.5}, "min_confidence=1.5")):
        with pytest.raises(ValueError, match=match):
            CacheConfig(**bad)
    with pytest.raises(ValueError, match="unknown cache fields \\['size'\\]"):
        CacheConfig.from_dict({"size": 3})
    with pytest.raises(ValueError, match="keys a batch"):
        input_keys(torch.tensor(1.0))


def test_threads_storing_and_reading_at_once_keep_it_bounded_and_consistent():
    cache = ResponseCache(max_entries=64, ttl_ms=math.inf, min_confidence=0.0, clock=FakeClock())
    batches = [_batch(16, seed=10 + i) for i in range(8)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                _serve(cache, batches[i], offset=i)
                got = cache.lookup(batches[i])
                # a hit is always this batch's own answer, never another thread's
                assert (got.prediction[got.hit] == ((torch.arange(16) + i) % 10)[got.hit]).all()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(cache) <= 64
    s = cache.stats()
    assert s["stored"] == 8 * 20 * 16 and s["hits"] + s["misses"] == 8 * 20 * 16
