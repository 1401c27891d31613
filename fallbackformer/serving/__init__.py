"""fallbackformer.serving: the HTTP server (Open Inference Protocol v2 and ``/metrics``).

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client); FastAPI is imported here only.
:mod:`fallbackformer.serving.protocol` and :mod:`fallbackformer.serving.budget` need neither.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ModelServer", "RequestBudgets", "ServeSettings", "build_server", "serve"]


def __getattr__(name: str) -> Any:  # lazy: importing the package does not import FastAPI
    if name in ("ModelServer", "ServeSettings"):
        from fallbackformer.serving import app

        return getattr(app, name)
    if name in ("build_server", "serve"):
        from fallbackformer.serving import server

        return getattr(server, name)
    if name == "RequestBudgets":
        from fallbackformer.serving.budget import RequestBudgets

        return RequestBudgets
    raise AttributeError(f"module 'fallbackformer.serving' has no attribute {name!r}")
