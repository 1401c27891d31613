"""Export a :class:`FallbackModel` as one ONNX graph and check it against the PyTorch runtime.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript), the
default of torch 2.13: the TorchScript exporter cannot export ``AdaptiveAvgPool2d`` with a dynamic
batch axis, nor ``torch.cond`` as an ``If`` node.

>>> path = export_onnx(model, "model.onnx")                       # doctest: +SKIP
>>> check_onnx_parity(model, path, x)                             # doctest: +SKIP
{'max_abs_diff': 1.2e-06, 'decisions_agree': True, ...}
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor, nn

from fallbackformer.export.graph import OUTPUT_NAMES, VARIANTS, CombinedGraph, served_by_codes
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.clock import median_ms

if TYPE_CHECKING:  # pragma: no cover
    from fallbackformer.runtime.fallback_model import FallbackModel

DEFAULT_OPSET = 18


def example_input(model: "FallbackModel", batch: int = 4) -> Tensor:
    """A valid raw batch for tracing: mid-range values of the model's input spec.

    Raises:
        ValueError: when the model has no ``input_spec`` (pass an example input explicitly).
    """
    spec = model.input_spec
    if spec is None:
        raise ValueError(
            "the model has no input_spec, so the input shape is unknown; pass example_input=<a raw "
            "batch [B, ...]> or build the FallbackModel with input_spec=InputSpec(shape=...)"
        )
    lo, hi = spec.value_range if spec.value_range is not None else (0.0, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *spec.shape), generator=g) * (hi - lo) + lo
    return x.to(getattr(torch, spec.dtype))


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and warnings (it reports failures by raising)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=4)
def _torchlib_registry(opset: int):
    """The exporter's op registry, built once per opset (torch.onnx.export rebuilds it per call,
    about 60% of the time of exporting a small module)."""
    from torch.onnx._internal.exporter import _constants, _registration

    return _registration.ONNXRegistry().from_torchlib(opset_version=max(opset, _constants.TORCHLIB_OPSET))


def _fast_path_available() -> bool:
    try:
        from torch.onnx._internal.exporter import _core

        return "registry" in inspect.signature(_core.export).parameters
    except Exception:  # a torch without the private module: use the public API
        return False


def _dynamo_export(module, args, dynamic_shapes, input_names, output_names, opset: int, optimize: bool):
    """``torch.onnx.export(dynamo=True)``, reusing the op registry between calls when torch allows."""
    if _fast_path_available():
        from torch.onnx._internal.exporter import _core

        return _core.export(
            module,
            args,
            registry=_torchlib_registry(opset),
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            optimize=optimize,
            opset_version=opset,
            verbose=False,
        )
    return torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=opset,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        external_data=False,
        optimize=optimize,
        verbose=False,
    )


def export_module_onnx(
    module: nn.Module,
    example: Tensor | tuple[Tensor, ...],
    path: str | Path,
    *,
    input_names: list[str],
    output_names: list[str],
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    optimize: bool = True,
) -> Path:
    """Export any module with a dynamic batch axis on every input; check the graph.

    Args:
        module: the module (put in eval mode by the caller).
        example: example input(s), batch size >= 2 so the batch axis is not specialised.
        path: the ``.onnx`` file to write (parent folders are created).
        input_names: one name per input.
        output_names: one name per output.
        opset: the ONNX opset.
        check: run ``onnx.checker.check_model(full_check=True)``.
        optimize: run onnxscript's graph optimizer (constant folding, dead code); onnxruntime
            optimizes again at session creation, so small graphs lose nothing without it.

    Returns:
        The path written.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = example if isinstance(example, tuple) else (example,)
    if args[0].shape[0] < 2:
        raise ValueError(
            f"example batch size {args[0].shape[0]} would fix the batch axis; trace with a batch of >= 2"
        )
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} for _ in args)
    if len(input_names) != len(args):
        raise ValueError(f"{len(args)} example inputs but input_names={input_names}")
    with _quiet(), torch.no_grad():
        program = _dynamo_export(module, args, dynamic_shapes, input_names, output_names, opset, optimize)
        program.save(str(path), external_data=False)
    if check:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def export_onnx(
    model: "FallbackModel",
    path: str | Path,
    *,
    variant: str = "where",
    opset: int = DEFAULT_OPSET,
    example_input: Tensor | None = None,
) -> Path:
    """Export the whole model (transforms, exits, gates, student, default) as one ONNX graph.

    Input ``x``: the same raw batch as ``FallbackModel`` (digits: float ``[B, 1, 8, 8]`` in 0..16),
    dynamic batch axis. Outputs ``prediction`` (int64 [B]), ``served_by`` (int64 [B], codes of
    :func:`served_by_codes`, also written into the model's metadata as ``served_by_codes``),
    ``confidence`` (float [B]) and ``logits`` (float [B, C]). See
    :mod:`fallbackformer.export.graph` for what the graph holds and what stays in the runtime.

    Args:
        model: the model to export (its modules are put in eval mode).
        path: the ``.onnx`` file to write.
        variant: ``"where"`` (per-sample ``Where`` selection) or ``"cond"`` (also ``If`` nodes
            that skip the later stages once the whole batch has exited).
        opset: the ONNX opset.
        example_input: a raw batch for tracing (default: from the model's input spec).

    Returns:
        The path written; the graph passed ``onnx.checker.check_model(full_check=True)``.
    """
    import onnx

    if variant not in VARIANTS:
        raise ValueError(f"unknown ONNX variant {variant!r}; choose one of {list(VARIANTS)}")
    model.eval()
    x = example_input if example_input is not None else _example(model)
    graph = CombinedGraph(model, variant, example_input=x).eval()
    path = export_module_onnx(
        graph, x, path, input_names=["x"], output_names=list(OUTPUT_NAMES), opset=opset, check=False
    )
    proto = onnx.load(str(path))
    codes = served_by_codes(model.path_names)
    meta = {
        "served_by_codes": ",".join(codes),
        "variant": variant,
        "producer": "fallbackformer",
        "default_prediction": str(graph.default_prediction),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (
        "fallbackformer combined model: served_by codes "
        + ", ".join(f"{i}={n}" for i, n in enumerate(codes))
    )
    onnx.save(proto, str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def _example(model: "FallbackModel") -> Tensor:
    return example_input(model)


def ort_session(path: str | Path, *, threads: int | None = None, spinning: bool = True):
    """An onnxruntime CPU ``InferenceSession`` with warnings silenced.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (default: onnxruntime's choice, one per core).
        spinning: let idle intra-op threads spin; turn it off when many sessions take turns
            (the onnxruntime backend), or their spinning pools steal each other's cores.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session_or_path: Any, x: Tensor) -> dict[str, Tensor]:
    """Run a combined graph; returns ``{output name: tensor}``."""
    sess = session_or_path if hasattr(session_or_path, "run") else ort_session(session_or_path)
    feed = {sess.get_inputs()[0].name: x.detach().cpu().float().numpy()}
    outs = sess.run(None, feed)
    return {o.name: torch.from_numpy(v) for o, v in zip(sess.get_outputs(), outs)}


def reference_runtime(model: "FallbackModel") -> "FallbackModel":
    """A sink-free copy of the runtime that shares the modules, for parity checks.

    The deadline is lifted (a graph has none) and invalid input gets the default (a graph cannot
    raise); everything else is the model's own policy, gates and modules. The model's counters and
    sinks are untouched.
    """
    policy = dataclasses.replace(model.policy, budget_ms=1e9, on_invalid_input="default")
    return model.rebuild(policy=policy).eval()


def runtime_decisions(model: "FallbackModel", x: Tensor) -> dict[str, Tensor]:
    """The PyTorch runtime's answer as the graph's four tensors (served_by as codes). A row the default
    serves has no confidence there: the graph leaves a typed default's (a coarse set's mass, say) out."""
    ref = reference_runtime(model)
    codes = {n: i for i, n in enumerate(served_by_codes(model.path_names))}
    out = ref(x)
    served = torch.tensor([codes[s] for s in out.served_by], dtype=torch.long)
    confidence = out.confidence.float().cpu().clone()
    confidence[served == codes[R.DEFAULT]] = float("nan")
    return {
        "prediction": out.prediction.cpu(),
        "served_by": served,
        "confidence": confidence,
        "logits": out.logits.float().cpu(),
    }


def compare_decisions(ref: dict[str, Tensor], got: dict[str, Tensor]) -> dict[str, Any]:
    """Parity figures between two answers given as the graph's four tensors."""
    agree_pred = ref["prediction"] == got["prediction"]
    agree_served = ref["served_by"] == got["served_by"]

    def max_diff(a: Tensor, b: Tensor) -> float:
        a, b = a.float(), b.float()
        both_nan = torch.isnan(a) & torch.isnan(b)
        diff = (a - b).abs()
        diff = torch.where(both_nan, torch.zeros_like(diff), diff)
        if diff.numel() == 0:
            return 0.0
        d = diff.max().item()
        return float("inf") if d != d else d  # a NaN on one side only is a mismatch

    ref_l, got_l = ref["logits"], got["logits"]
    if ref_l.shape != got_l.shape:  # the runtime keeps [B, 0] when nothing served
        logits_diff = 0.0 if bool(torch.isnan(got_l).all()) and ref_l.numel() == 0 else float("inf")
    else:
        logits_diff = max_diff(ref_l, got_l)
    return {
        "n": int(agree_pred.numel()),
        "max_abs_diff": logits_diff,
        "max_abs_diff_confidence": max_diff(ref["confidence"], got["confidence"]),
        "decisions_agree": bool(agree_pred.all() and agree_served.all()),
        "prediction_agree": float(agree_pred.float().mean()),
        "served_by_agree": float(agree_served.float().mean()),
        "served_by_counts": {
            int(c): int(n) for c, n in zip(*torch.unique(got["served_by"], return_counts=True))
        },
    }


def check_onnx_parity(model: "FallbackModel", onnx_path: str | Path, x: Tensor) -> dict[str, Any]:
    """Compare a combined ONNX graph in onnxruntime with the PyTorch runtime on a raw batch.

    Args:
        model: the :class:`FallbackModel` the graph was exported from.
        onnx_path: the combined graph (:func:`export_onnx`).
        x: raw input ``[B, ...]``.

    Returns:
        ``max_abs_diff`` (logits of the serving path, NaN rows of the default equal),
        ``max_abs_diff_confidence``, ``decisions_agree`` (prediction and served_by identical for
        every sample), the agreement fractions, ``n`` and ``served_by_counts`` (code -> count).
    """
    ref = runtime_decisions(model, x)
    got = run_onnx(onnx_path, x)
    return compare_decisions(ref, got)


def onnxruntime_vs_torch(
    model: "FallbackModel",
    x_b1: Tensor,
    x_b64: Tensor,
    *,
    repeats: int = 30,
    variants: tuple[str, ...] = ("where", "cond"),
    onnx_paths: Mapping[str, str | Path] | None = None,
    backend_model: "FallbackModel | None" = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Latency of onnxruntime against the PyTorch runtime (eager), at batch 1 and 64.

    Rows: each combined graph (``variants``) in one onnxruntime session, and optionally
    ``backend_model`` (a bundle loaded with ``backend="onnxruntime"``: the same runtime, stages in
    onnxruntime). The deadline is lifted on both sides (:func:`reference_runtime`) so that every
    call does the full work; decisions (prediction and served_by) are compared on both batches.

    Args:
        model: the model (torch eager is the baseline).
        x_b1: a raw batch of 1.
        x_b64: a raw batch of 64.
        repeats: timed calls per measurement (the median is reported, after 3 warm-up calls).
        variants: which combined graphs to time.
        onnx_paths: already exported graphs ``{variant: path}`` (exported to a temporary folder
            otherwise).
        backend_model: a model loaded with ``ff.load(path, backend="onnxruntime")`` (load it with
            ``ort_threads`` equal to ``threads`` for a like-for-like row).
        threads: intra-op threads for torch (set for the duration of the call) and for the
            combined graphs' sessions; ``None`` leaves both at their defaults. One thread gives
            per-core figures that a shared machine does not scramble.

    Returns:
        ``{"torch_ms": {"b1": ms, "b64": ms}, "<row>": {"ms": {...}, "ratio": {...},
        "decisions_identical": bool}}`` with rows ``onnx_where``, ``onnx_cond`` and
        ``ort_backend``; ``ratio`` is onnxruntime time / torch eager time (below 1: onnxruntime is
        faster).
    """
    batches = {"b1": x_b1, "b64": x_b64}
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _compare_latency(model, batches, repeats, variants, onnx_paths, backend_model, threads)
    finally:
        torch.set_num_threads(saved_threads)


def _compare_latency(model, batches, repeats, variants, onnx_paths, backend_model, threads) -> dict[str, Any]:
    import tempfile

    ref = reference_runtime(model)
    torch_ms = {k: median_ms(lambda x=x: ref(x), repeats, discard=3) for k, x in batches.items()}
    expected = {k: runtime_decisions(model, x) for k, x in batches.items()}
    result: dict[str, Any] = {"torch_ms": torch_ms, "threads": threads}

    def row(fn, decide) -> dict[str, Any]:
        ms = {k: median_ms(lambda fn=fn, x=x: fn(x), repeats, discard=3) for k, x in batches.items()}
        identical = all(
            compare_decisions(expected[k], decide(x))["decisions_agree"] for k, x in batches.items()
        )
        return {"ms": ms, "ratio": {k: ms[k] / torch_ms[k] for k in ms}, "decisions_identical": identical}

    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            path = (onnx_paths or {}).get(variant)
            if path is None:
                path = export_onnx(model, Path(tmp) / f"model_{variant}.onnx", variant=variant)
            sess = ort_session(path, threads=threads)
            result[f"onnx_{variant}"] = row(lambda x: run_onnx(sess, x), lambda x: run_onnx(sess, x))
    if backend_model is not None:
        ort_ref = reference_runtime(backend_model)
        result["ort_backend"] = row(ort_ref, lambda x: runtime_decisions(backend_model, x))
    return result
