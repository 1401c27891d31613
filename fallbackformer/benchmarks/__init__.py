"""Side-by-side benchmarks of the runtime: what the wrapper costs, what it saves, whether it keeps the deadline.

``run_benchmark(cfg)`` (called by ``scripts/benchmark.py``, config ``configs/benchmark.yaml``) writes
``DIR/benchmark.json`` and ``DIR/BENCHMARKS.md`` (rendered from ``BENCHMARKS.md.tmpl``, every figure
from the JSON). One module per section:

``overhead``     the wrapper on the primary's path against the bare primary and a gated peer in plain
                 PyTorch, on the configured primary and a ResNet-18-sized CNN (:mod:`.overhead`).
``evidence``     the routed model against the gated model, batch 1 and 64 (:mod:`.evidence`).
``deadline``     injected stalls: fallbackformer vs a naive timeout wrapper vs no wrapper (:mod:`.deadline`).
``early_exit``   per-sample exits against the full primary, gated and routed (:mod:`.early_exit`).
``compile``      eager against ``compile="auto"`` (:mod:`.compiled`).
``onnxruntime``  onnxruntime against the PyTorch runtime (:mod:`.ort`).
``rungs``        each rung of the ladder alone (student, classical rungs, a cache lookup), b1 and b64,
                 against the primary alone (:mod:`.rungs`).

More sections: :data:`SECTION_PROVIDERS` and :func:`register_section`. The machine is noisy (shared
cores): every comparison interleaves its contenders round by round and reports medians of per-round
figures; ratios are medians of per-round ratios.
"""

from fallbackformer.benchmarks.common import describe_machine
from fallbackformer.benchmarks.context import BenchmarkContext
from fallbackformer.benchmarks.report import render_markdown, write_markdown
from fallbackformer.benchmarks.runner import SECTION_PROVIDERS, SECTIONS, register_section, run_benchmark, unregister_section

__all__ = [
    "BenchmarkContext",
    "SECTIONS",
    "SECTION_PROVIDERS",
    "describe_machine",
    "register_section",
    "render_markdown",
    "run_benchmark",
    "unregister_section",
    "write_markdown",
]
