"""One FallbackModel served from many threads: answers stay per-sample correct, counters consistent."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from torch import nn

import fallbackformer as ff
from fallbackformer.common.paths import is_fallback
from fallbackformer.runtime.events import ListSink
from fallbackformer.runtime.testing import ConstHead, FeatureHead, gate


def _model(**policy) -> ff.FallbackModel:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Identity(), nn.Identity()]
    # make the blocks pass the features through unchanged in sign, so routing is predictable
    with torch.no_grad():
        stages[0][0].weight.copy_(torch.eye(4) * 3)
        stages[0][0].bias.zero_()
    heads = {0: FeatureHead(0, 1), 1: FeatureHead(1, 2), 2: FeatureHead(2, 0)}
    primary = ff.MultiExitNet(stages, heads)
    gates = [gate(0.9), gate(0.9), gate(0.9), gate(0.5)]
    return ff.FallbackModel(primary, ConstHead(1), gates, ff.Policy(budget_ms=5_000.0, **policy)).eval()


def _expected(x: torch.Tensor) -> list[str]:
    out = []
    for row in x:
        out.append("exit_1" if row[0] > 0 else "exit_2" if row[1] > 0 else "primary" if row[2] > 0 else "student")
    return out


# No concurrency limit in the first two (max_concurrency=None): 6 threads on 2 cores would otherwise
# send the calls over the limit to the student, and routing is checked exactly; the third keeps the
# default limit (one call per core walks the primary) and checks that the excess is recorded.
@pytest.mark.parametrize("policy", [{"hedge": "off", "max_concurrency": None},
                                    {"hedge": "always", "hedge_workers": 2, "max_concurrency": None},
                                    {"hedge": "always", "hedge_workers": 2, "max_concurrency": 1}])
def test_concurrent_calls_are_answered_right_and_counted_once(policy: dict) -> None:
    model = _model(**policy)
    sink = ListSink()
    model.sinks.append(sink)
    n_threads, n_calls = 6, 40
    results: list[tuple[list[str], list[str]]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(n_calls):
                x = torch.randn(int(torch.randint(1, 6, (1,), generator=g)), 4, generator=g)
                out = model(x)
                with lock:
                    results.append((out.served_by, out.reason))
                if policy["hedge"] == "off":  # deterministic routing without hedge refusals
                    assert out.served_by == _expected(x)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    served = Counter(s for sb, _ in results for s in sb)
    reasons = Counter(r for _, rs in results for r in rs if r)
    stats = model.stats()
    assert stats["calls"] == n_threads * n_calls == len(results)
    assert stats["answers"] == sum(served.values())
    assert stats["served_by"] == dict(served) and stats["reasons"] == dict(reasons)
    assert len(sink.events) == sum(n for k, n in served.items() if is_fallback(k))  # exits give no event
    ids = [e.request_id for e in sink.events]
    assert all(ids.count(i) <= 5 for i in set(ids))  # request ids are unique per call
    if policy["hedge"] == "always":
        assert set(reasons) <= {"low_confidence", "deadline_predicted"}  # refusals only when workers are busy
        over = stats["concurrency_refused"]  # calls over the limit never reach the primary's workers
        assert stats["hedge"]["submitted"] + stats["hedge"]["refused"] + over == stats["calls"]
        assert over == 0 if policy["max_concurrency"] is None else reasons["deadline_predicted"] >= over
    model.close()
