"""Run the configured sections, write ``benchmark.json`` and ``BENCHMARKS.md`` (from the template)."""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fallbackformer.benchmarks.common import describe_machine, get, load_average
from fallbackformer.benchmarks.compiled import bench_compile
from fallbackformer.benchmarks.context import BenchmarkContext, build_system
from fallbackformer.benchmarks.deadline import bench_deadline
from fallbackformer.benchmarks.early_exit import bench_early_exit
from fallbackformer.benchmarks.evidence import bench_evidence
from fallbackformer.benchmarks.ort import bench_onnxruntime
from fallbackformer.benchmarks.overhead import bench_overhead
from fallbackformer.benchmarks.report import write_markdown
from fallbackformer.benchmarks.rungs import bench_rungs
from fallbackformer.common.jsonsafe import dumps
from fallbackformer.common.timing import Stopwatch

log = logging.getLogger(__name__)

__all__ = ["SECTIONS", "SECTION_PROVIDERS", "register_section", "run_benchmark", "unregister_section"]

Section = Callable[[BenchmarkContext], dict[str, Any]]

#: The sections this package implements, by name.
SECTIONS: dict[str, Section] = {
    "overhead": bench_overhead,
    "evidence": bench_evidence,
    "deadline": bench_deadline,
    "early_exit": bench_early_exit,
    "compile": bench_compile,
    "onnxruntime": bench_onnxruntime,
    "rungs": bench_rungs,
}

#: Sections implemented elsewhere: ``name -> "module:function"``; the function takes the
#: :class:`BenchmarkContext` and returns a JSON-able dict (rendered as a key/value table).
SECTION_PROVIDERS: dict[str, str] = {}
_REGISTERED: dict[str, Section] = {}


def register_section(name: str) -> Callable[[Section], Section]:
    """Decorator: make ``fn(ctx) -> dict`` the benchmark section ``name`` (overrides a provider)."""

    def deco(fn: Section) -> Section:
        _REGISTERED[name] = fn
        return fn

    return deco


def unregister_section(name: str) -> Section | None:
    """Remove the section ``name`` registered with :func:`register_section` (``None`` if absent)."""
    return _REGISTERED.pop(name, None)


def _external_section(name: str, ctx: BenchmarkContext) -> dict[str, Any]:
    fn = _REGISTERED.get(name)
    if fn is None:
        spec = SECTION_PROVIDERS.get(name)
        if spec is None:
            return {"status": f"no provider for section {name!r}"}
        module_name, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            return {"status": f"not available yet ({spec}: {type(exc).__name__})"}
    return dict(fn(ctx))


def _plain_config(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    return cfg


def run_benchmark(cfg: Any, system: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the configured sections; write ``benchmark.json`` and ``BENCHMARKS.md`` into ``cfg.out_dir``.

    Args:
        cfg: the composed ``configs/benchmark.yaml`` (or any mapping with the same keys).
        system: an already built ``{"primary", "student", "gates", "splits"}`` (optionally
            ``"input_spec"`` and ``"router"``); by default it is trained, or loaded from
            ``cfg.bundle``, when a section first needs it.

    Returns:
        ``(results, objects)``: the JSON-able results and ``{"out_dir", "system"}``.
    """
    out_dir = Path(get(cfg, "out_dir", "outputs/benchmark"))
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = get(cfg, "num_threads", None)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        machine = describe_machine()
        factory = (lambda: dict(system)) if system is not None else (lambda: build_system(cfg))
        ctx = BenchmarkContext(cfg=get(cfg, "benchmark", {}), machine=machine, out_dir=out_dir, root=cfg,
                               system_factory=factory)
        if system is not None:
            _ = ctx.system  # a given system counts as built from the start
        results: dict[str, Any] = {"machine": machine}
        watch = Stopwatch()
        for name in list(get(ctx.cfg, "sections", list(SECTIONS))):
            log.info("benchmark section %s", name)
            with watch.step(name):
                results[name] = SECTIONS[name](ctx) if name in SECTIONS else _external_section(name, ctx)
            log.info("section %s done in %.1f s", name, watch.seconds[name])
        machine["load_average_end"] = load_average()
        loads = [v[0] for v in (machine["load_average"], machine["load_average_end"]) if v]
        machine["loaded"] = bool(loads) and max(loads) >= float(machine["usable_cores"] or 1)
        built = ctx.built_system or {}
        machine["system_source"] = built.get("source", "given by the caller" if system is not None else "none built")
        results["config"] = _plain_config(cfg)
    finally:
        torch.set_num_threads(old_threads)
    (out_dir / "benchmark.json").write_text(dumps(results, indent=2, where="benchmark results"))
    write_markdown(json.loads((out_dir / "benchmark.json").read_text()), out_dir / "BENCHMARKS.md")
    return results, {"out_dir": out_dir, "system": ctx.built_system}
