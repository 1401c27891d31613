"""Per-request budgets without races, and the server built from configs/serve.yaml."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fallbackformer.serving import RequestBudgets, ServeSettings, build_server
from tests.unit.serving.conftest import BUNDLE, Sink, tiny_model

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "serve.yaml"


def test_concurrent_calls_each_get_their_own_budget():
    sink = Sink()
    model = tiny_model(sinks=[sink], budget_ms=1000.0)
    model.gates["primary"].threshold.fill_(float("inf"))  # the primary never answers: a fallback event a sample
    budgets = RequestBudgets(model)
    asked: dict[str, float] = {}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def caller(k: int) -> None:
        mine = 10.0 * (k + 1) if k < 7 else None  # the last thread sets no budget: the policy's
        start.wait()
        for _ in range(25):
            with budgets.apply(mine) as policy:
                out = model(torch.ones(2, 4))
            assert policy.budget_ms == (mine or 1000.0)
            with lock:
                asked[out.request_id] = mine or 1000.0

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert model.flush_events(30.0)  # a plain sink is served by the event dispatcher, off the callers' time
    assert len(asked) == 8 * 25 and len(sink.events) == 2 * 8 * 25
    assert all(e.budget_ms == asked[e.request_id] for e in sink.events)
    assert model.policy.budget_ms == 1000.0  # the shared policy never moved


def test_budget_is_capped_by_the_policy_and_checked():
    model = tiny_model(budget_ms=50.0)
    budgets = RequestBudgets(model)
    assert budgets.effective_ms(5.0) == 5.0 and budgets.effective_ms(500.0) == 50.0
    assert budgets.effective_ms(None) == 50.0
    with budgets.apply(500.0) as policy:
        assert policy is model.policy and policy.budget_ms == 50.0
    for bad in (0, -1.0, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="budget_ms must be a finite number > 0"):
            budgets.effective_ms(bad)
    assert RequestBudgets(model).model is model  # installing twice is harmless


def test_a_new_policy_is_still_the_base_for_calls_without_a_budget():
    model = tiny_model(budget_ms=50.0)
    budgets = RequestBudgets(model)
    with budgets.apply(20.0):
        assert model.policy.budget_ms == 20.0
    model.set_rollback(True)  # replaces model.policy: the new object becomes the shared base
    assert budgets.base.rollback and model.policy.rollback
    with budgets.apply(20.0) as policy:
        assert policy.rollback and policy.budget_ms == 20.0
    out = model(torch.ones(1, 4))
    assert out.reason == ["breaker_open"]


def test_server_from_serve_yaml():
    cfg = OmegaConf.load(CONFIG)
    del cfg["hydra"]
    cfg.bundle = str(BUNDLE)
    cfg.budget_ms = 20.0
    cfg.serve.workers = 3
    server = build_server(cfg)
    assert server.name == "digits" and isinstance(server.settings, ServeSettings)
    assert server.settings.workers == 3 and server.model.policy.budget_ms == 20.0
    cfg.serve.bogus = 1
    with pytest.raises(ValueError, match="unknown serve settings \\['bogus'\\]"):
        build_server(cfg)
    cfg.bundle = "???"
    with pytest.raises(ValueError, match="bundle=checkpoints/digits"):
        build_server(cfg)
