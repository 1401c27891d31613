"""onnxruntime against the PyTorch runtime (eager) at batch 1 and 64: ratios and decision parity."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from fallbackformer.benchmarks.common import get, tile
from fallbackformer.benchmarks.context import BenchmarkContext
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.policy import Policy

__all__ = ["bench_onnxruntime"]


def bench_onnxruntime(ctx: BenchmarkContext) -> dict[str, Any]:
    """onnxruntime against the PyTorch runtime (eager) at batch 1 and 64: ratios and decision parity.

    The system is saved as a bundle with its ONNX graphs (``ff.save(model, tmp, onnx=True)``), then
    timed by :func:`fallbackformer.export.onnx_export.onnxruntime_vs_torch` ``rounds`` times: the
    combined graphs (``variants``) in one session each and the bundle loaded with
    ``backend="onnxruntime"`` (``ort_threads=threads``), torch at the same thread count. Figures are
    medians over the rounds, with the spread (min, max) of each ratio.
    """
    cfg = ctx.section("onnxruntime")
    repeats, rounds = int(get(cfg, "repeats", 30)), int(get(cfg, "rounds", 3))
    threads = int(get(cfg, "threads", 1))
    variants = tuple(str(v) for v in get(cfg, "variants", ["where", "cond"]))
    backend = bool(get(cfg, "backend", True))
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:  # say so, do not fail the run
        return {"status": f"onnxruntime or onnxscript not installed ({exc.name}): pip install onnxruntime onnxscript"}
    import fallbackformer as ff
    from fallbackformer.export.onnx_export import export_onnx, onnxruntime_vs_torch

    system = ctx.system
    model = FallbackModel(system["primary"], system["student"], list(system["gates"]), Policy(),
                          input_spec=ctx.input_spec).eval()
    x_test = system["splits"]["test"][0]
    x_b1, x_b64 = x_test[:1], tile(x_test, 64)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = ff.save(model, Path(tmp) / "bundle", onnx=True)  # model.onnx is the "where" graph
        paths = {v: (bundle / "model.onnx" if v == "where" else export_onnx(model, Path(tmp) / f"{v}.onnx", variant=v))
                 for v in variants}
        backend_model = ff.load(bundle, backend="onnxruntime", ort_threads=threads) if backend else None
        for _ in range(rounds):
            runs.append(onnxruntime_vs_torch(model, x_b1, x_b64, repeats=repeats, variants=variants,
                                             onnx_paths=paths, backend_model=backend_model, threads=threads))
    out: dict[str, Any] = {"threads": threads, "repeats": repeats, "rounds": rounds,
                           "torch_ms": {b: statistics.median(r["torch_ms"][b] for r in runs) for b in ("b1", "b64")}}
    for name in [f"onnx_{v}" for v in variants] + (["ort_backend"] if backend else []):
        rows = [r[name] for r in runs]
        out[name] = {
            "ms": {b: statistics.median(r["ms"][b] for r in rows) for b in ("b1", "b64")},
            "ratio": {b: statistics.median(r["ratio"][b] for r in rows) for b in ("b1", "b64")},
            "ratio_spread": {b: [min(r["ratio"][b] for r in rows), max(r["ratio"][b] for r in rows)] for b in ("b1", "b64")},
            "decisions_identical": all(r["decisions_identical"] for r in rows),
        }
    out["decisions_identical"] = all(out[k]["decisions_identical"] for k in out if isinstance(out[k], dict) and "ms" in out[k])
    return out
