"""``serve(cfg)``: load a bundle and run the OIP server with uvicorn (``scripts/serve.py``)."""

from __future__ import annotations

import os

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from fallbackformer.serving.app import ModelServer, ServeSettings

log = logging.getLogger("fallbackformer.serving")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def build_server(cfg: Any) -> ModelServer:
    """Load ``cfg.bundle`` and wrap it in a :class:`ModelServer` (not started).

    Config keys (``configs/serve.yaml``): ``bundle`` (required), ``name`` (default: the bundle
    folder's name), ``budget_ms`` (replaces the bundle policy's budget; ``null`` keeps it),
    ``max_concurrency`` (replaces the policy's: model calls that walk the primary at once, ``cores``
    by default; the other requests in flight are served by the student at once; ``null`` keeps it),
    ``backend`` (``torch`` or ``onnxruntime``), ``num_threads`` (torch threads), ``audit_log`` (a
    JSONL file for fallback events, or ``null``) and the ``serve`` node (:class:`ServeSettings`).

    Raises:
        ValueError: no bundle given; ``BundleError`` for a bundle that fails verification.
    """
    import fallbackformer as ff

    bundle = _get(cfg, "bundle")
    if not bundle or bundle == "???":
        raise ValueError("no bundle to serve; pass bundle=<folder written by ff.save>, e.g. bundle=checkpoints/digits")
    threads = _get(cfg, "num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    sinks = []
    audit = _get(cfg, "audit_log")
    if audit:
        from fallbackformer.monitoring.sinks import JsonlFileSink

        sinks.append(JsonlFileSink(audit))
    model = ff.load(bundle, backend=_get(cfg, "backend", "torch"), sinks=sinks)
    budget = _get(cfg, "budget_ms")
    if budget is not None:
        model.policy = dataclasses.replace(model.policy, budget_ms=float(budget))
    concurrency = _get(cfg, "max_concurrency")
    if concurrency is not None:  # (Policy checks it: an int >= 1 or "cores")
        model.policy = dataclasses.replace(model.policy, max_concurrency=concurrency)
    node = _get(cfg, "serve", {}) or {}
    fields = {f.name for f in dataclasses.fields(ServeSettings)}
    items = {k: v for k, v in (node.items() if hasattr(node, "items") else ()) if not str(k).startswith("_")}
    unknown = sorted(set(items) - fields)
    if unknown:
        raise ValueError(f"unknown serve settings {unknown}; known: {sorted(fields)}")
    if items.get("warm_up_batch_sizes") is not None:
        items["warm_up_batch_sizes"] = [int(b) for b in items["warm_up_batch_sizes"]]
    settings = ServeSettings(**items)
    folder = Path(os.path.abspath(str(bundle)))  # (not resolve(): a bundle is a symlink to its version folder)
    if folder.name == "manifest.json":
        folder = folder.parent
    name = _get(cfg, "name") or folder.name
    return ModelServer(model, str(name), settings)


def serve(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Serve the bundle until SIGINT/SIGTERM; uvicorn drains requests, then the model is closed.

    Args:
        cfg: the composed ``configs/serve.yaml`` (``host``, ``port``, ``log_level`` beside the
            keys of :func:`build_server`).

    Returns:
        ``(metrics, objects)``: the model's final ``stats()``, and ``{"server": ModelServer}``.
    """
    import uvicorn

    server = build_server(cfg)
    host, port = str(_get(cfg, "host", "127.0.0.1")), int(_get(cfg, "port", 8080))
    log.info("serving %r on http://%s:%d/v2/models/%s", server.name, host, port, server.name)
    config = uvicorn.Config(
        server.app, host=host, port=port, log_level=str(_get(cfg, "log_level", "info")),
        timeout_graceful_shutdown=int(max(1, server.settings.drain_timeout_s)), lifespan="on",
    )
    uvicorn.Server(config).run()
    return server.model.stats(), {"server": server}
