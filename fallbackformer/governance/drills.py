"""Fallback drills: inject a fault for every reason in :data:`fallbackformer.REASONS` and check the answer.

A drill loads the bundle afresh on a :class:`~fallbackformer.runtime.clock.FakeClock` (time moves
only when a scripted fault moves it, so every drill is deterministic and takes milliseconds),
attaches a chained :class:`~fallbackformer.monitoring.sinks.JsonlFileSink` (``audit.jsonl`` in the
run directory, one chain for all drills), injects one fault through public hooks (forward hooks on a
primary stage, the latency profile, the policy, the rollback switch), calls the model and checks:

1. every sample of the faulted call is answered with the drill's reason and not by the primary;
2. the answer came within the policy's budget (fake milliseconds);
3. the audit log holds a record of that call with that reason, and the whole chain verifies.

Faults that a policy must allow for a reason to exist (``on_invalid_input="default"``, a breaker,
``drift_check``) are set for that drill and named in its evidence. Every drill runs with
``hedge="off"`` except the hang, which needs the hard deadline (``hedge="always"``).

>>> report = run_drills("checkpoints/digits", "outputs/drill")   # doctest: +SKIP
>>> report.passed, [r.name for r in report.results if not r.passed]   # doctest: +SKIP
(True, [])
"""

from __future__ import annotations

import dataclasses
import math
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fallbackformer.common.jsonsafe import dumps
from fallbackformer.common.paths import is_primary_path
from fallbackformer.runtime import reasons as R
from fallbackformer.runtime.breaker import BreakerConfig
from fallbackformer.runtime.clock import HANG, FakeClock, ScriptedDelay
from fallbackformer.runtime.fallback_model import FallbackModel
from fallbackformer.runtime.output import FallbackOutput

__all__ = [
    "DRILLS", "Drill", "DrillReport", "DrillSettings", "DrillResult", "drill_reasons", "run_drills", "run_drills_from_config", "write_report",
]

AUDIT_LOG = "audit.jsonl"


@dataclass(frozen=True)
class DrillSettings:
    """How the drills run (``configs/drill.yaml``'s ``drills`` node).

    Args:
        seed: seed of the drill inputs.
        batch_size: samples per faulted call.
        max_drift_calls: shifted calls the drift drill may take before it fails.
    """

    seed: int = 0
    batch_size: int = 8
    max_drift_calls: int = 50

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_drift_calls < 1:
            raise ValueError(f"DrillSettings needs batch_size >= 1 and max_drift_calls >= 1; got {self}")


@dataclass
class DrillContext:
    """What a drill gets: a loader of fresh models (faults never leak between drills) and inputs."""

    bundle: Path
    sinks: list[Any]
    settings: DrillSettings = field(default_factory=DrillSettings)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def model(self, **policy: Any) -> tuple[FallbackModel, FakeClock]:
        """A freshly loaded bundle on a FakeClock, ``hedge="off"`` and the given policy overrides."""
        from fallbackformer.export.bundle import load

        clock = FakeClock()
        model = load(self.bundle, clock=clock, sinks=self.sinks)
        model.policy = dataclasses.replace(model.policy, **{"hedge": "off", **policy})
        self.cleanups.append(lambda: model.close(timeout_s=1.0))
        return model, clock

    def inputs(self, model: FallbackModel, n: int | None = None, offset: int = 0) -> torch.Tensor:
        """``n`` seeded inputs in the bundle's input spec (uniform over its value range)."""
        spec = model.input_spec
        shape = tuple(spec.shape) if spec is not None else (1, 8, 8)
        low, high = spec.value_range if spec is not None and spec.value_range is not None else (0.0, 1.0)
        g = torch.Generator().manual_seed(self.settings.seed * 1000 + offset)
        n = self.settings.batch_size if n is None else n
        return low + (high - low) * torch.rand(n, *shape, generator=g)


def _stage(model: FallbackModel, i: int = 0) -> torch.nn.Module:
    return model.primary.stages[i]


def _delay_hook(delay: ScriptedDelay) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: Any) -> None:
        delay.take_time()  # sleep on the fake clock, raise, or hang: as scripted

    return hook


# ---------------------------------------------------------------------- the drills
# Each returns (the faulted call's output, its evidence); the runner checks reason, budget and log.


def _low_confidence(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    model, _ = ctx.model()
    if model.router is not None:  # the router decides: raise its one threshold above any probability
        model.router.threshold.fill_(2.0)
        return model(ctx.inputs(model)), {"fault": "the router's threshold raised to 2.0 (trusts no answer)"}
    for name in model.primary.exit_names:  # a primary unsure of everything: no exit's gate accepts
        gate = model.gates[name]
        if not torch.isinf(gate.threshold):
            gate.threshold.fill_(2.0)  # above any calibrated confidence (<= 1)
    return model(ctx.inputs(model)), {"fault": "every primary exit's threshold raised to 2.0 (never confident)"}


def _stall(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    model, _ = ctx.model()
    budget = model.policy.budget_ms
    stalls = ScriptedDelay(torch.nn.Identity(), model.clock, 2.0 * budget)
    hook = _stage(model).register_forward_pre_hook(_delay_hook(stalls))
    for _ in range(max(16, model.profile.min_samples)):  # the profile has seen the stage stall
        model.profile.record("stage_0", ctx.settings.batch_size, 2.0 * budget)
    out = model(ctx.inputs(model))
    hook.remove()
    return out, {"fault": f"stage_0 stalls {2.0 * budget:g} ms (profile p99)", "stage_0_runs": stalls.calls}


def _hang(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    model, _ = ctx.model(hedge="always", hedge_workers=1)
    hang = ScriptedDelay(torch.nn.Identity(), model.clock, [HANG])
    ctx.cleanups.insert(0, hang.release)
    _stage(model, 0).register_forward_pre_hook(_delay_hook(hang))  # (before any exit could answer)
    out = model(ctx.inputs(model))
    return out, {"fault": "stage_0 hangs (never returns); hedge=always", "hedge": model.stats().get("hedge")}


def _exception(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    model, _ = ctx.model()
    fault = ScriptedDelay(torch.nn.Identity(), model.clock, RuntimeError("drill: injected stage fault"))
    _stage(model, 1).register_forward_pre_hook(_delay_hook(fault))
    return model(ctx.inputs(model)), {"fault": "stage_1 raises RuntimeError"}


def _nonfinite(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    model, _ = ctx.model()
    _stage(model, 0).register_forward_hook(lambda m, args, out: out * float("nan"))
    return model(ctx.inputs(model)), {"fault": "stage_0's output is NaN"}


def _breaker(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    cfg = BreakerConfig(sliding_window_size=4, minimum_number_of_calls=4, failure_rate_threshold=50.0)
    model, _ = ctx.model(breaker=cfg)
    fault = ScriptedDelay(torch.nn.Identity(), model.clock, RuntimeError("drill: failing primary"))
    hook = _stage(model).register_forward_pre_hook(_delay_hook(fault))
    failing = [model(ctx.inputs(model, 1, offset=k)).reason[0] for k in range(4)]
    hook.remove()  # the primary is healthy again, but the breaker is open
    out = model(ctx.inputs(model))
    state = model.breaker.state.name if model.breaker is not None else None
    return out, {"fault": f"4 failing calls open a breaker {dataclasses.asdict(cfg)}",
                 "failing_calls": failing, "breaker_state": state}


def _rollback(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    model, _ = ctx.model()
    model.set_rollback(True)
    return model(ctx.inputs(model)), {"fault": "model.set_rollback(True)"}


def _invalid_input(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    model, _ = ctx.model(on_invalid_input="default")
    x = ctx.inputs(model)
    x[:, ..., 0] = float("nan")
    return model(x), {"fault": "NaN in every sample; on_invalid_input=default (the bundle's: "
                               f"{model.bundle_manifest['policy'].get('on_invalid_input')})"}


def _drift(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    model, _ = ctx.model(drift_check=True, on_drift="student", drift_window=100, drift_check_every=25)
    calls = 0
    while calls < ctx.settings.max_drift_calls and not (model.drift_monitor is not None and model.drift_monitor.drifted):
        model(ctx.inputs(model, 32, offset=100 + calls))  # uniform noise: far from the digits it saw
        calls += 1
    out = model(ctx.inputs(model))
    return out, {"fault": "uniform-noise inputs (a shifted input distribution); drift_check, on_drift=student",
                 "calls_until_drift": calls, "gate": model.drift_gate}


def _router_preferred(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    model, _ = ctx.model()
    router = model.router
    if router is None:
        raise RuntimeError("the bundle has no router, so no answer can carry router_preferred; "
                           "rebuild it with router=default")
    never = lambda module, args, out: torch.zeros_like(out)  # noqa: E731  (P(right) = 0)
    for k in range(router.num_exits):  # the router judges every exit and the primary wrong
        router.scorers[str(k)].register_forward_hook(never)
    router.threshold.fill_(0.0)  # and accepts the student wherever it is judged better
    return model(ctx.inputs(model)), {"fault": "the router's scorers for every exit and the primary return 0; "
                                               "threshold 0: the student is judged more likely right"}


class _Contrarian(torch.nn.Module):
    """A rung that votes for the primary's least likely class: it agrees with no answer of the primary."""

    def __init__(self, primary: torch.nn.Module) -> None:
        super().__init__()
        self.primary = primary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.primary(x)[-1]


def _rung_disagreement(ctx: DrillContext) -> tuple[FallbackOutput, dict[str, Any]]:
    from fallbackformer.gates.gate import ConfidenceGate
    from fallbackformer.rungs.ladder import Rung

    loaded, clock = ctx.model()
    rung = Rung("contrarian", _Contrarian(loaded.primary), ConfidenceGate(threshold=math.inf))
    model = loaded.rebuild(router=None, fallbacks=[rung], veto=["contrarian"], veto_below=math.inf, clock=clock,
                           sinks=ctx.sinks)  # the veto reviews every answer, whatever level the bundle's ladder has
    model.model_hashes = loaded.model_hashes
    ctx.cleanups.append(lambda: model.close(timeout_s=1.0))
    for name in model.primary.exit_names[:-1]:  # the final head answers every sample ...
        model.gates[name].threshold.fill_(math.inf)
    model.gates[R.PRIMARY].threshold.fill_(-math.inf)
    model.gates[R.STUDENT].threshold.fill_(math.inf)  # ... and the veto sends each to the default
    return model(ctx.inputs(model)), {"fault": "a vetoing rung that votes for the primary's least likely class; "
                                               "the final head accepts every sample, the student none"}


@dataclass(frozen=True)
class Drill:
    """A named fault and the reason it must produce."""

    name: str
    reason: str
    run: Callable[[DrillContext], tuple[FallbackOutput, dict[str, Any]]]


DRILLS: tuple[Drill, ...] = (
    Drill("low_confidence", R.LOW_CONFIDENCE, _low_confidence),
    Drill("stall", R.DEADLINE_PREDICTED, _stall),
    Drill("hang", R.DEADLINE_EXCEEDED, _hang),
    Drill("exception", R.PRIMARY_ERROR, _exception),
    Drill("nonfinite_output", R.NONFINITE_OUTPUT, _nonfinite),
    Drill("breaker_open", R.BREAKER_OPEN, _breaker),
    Drill("rollback_switch", R.BREAKER_OPEN, _rollback),
    Drill("invalid_input", R.INVALID_INPUT, _invalid_input),
    Drill("calibration_drift", R.CALIBRATION_DRIFT, _drift),
    Drill("router_preferred", R.ROUTER_PREFERRED, _router_preferred),
    Drill("rung_disagreement", R.RUNG_DISAGREEMENT, _rung_disagreement),
)


def drill_reasons() -> set[str]:
    """The reasons the drills cover (a test holds this equal to ``set(ff.REASONS)``)."""
    return {d.reason for d in DRILLS}


@dataclass
class DrillResult:
    """One drill's verdict and the evidence for it."""

    name: str
    reason: str
    passed: bool
    failures: list[str]
    evidence: dict[str, Any]


@dataclass
class DrillReport:
    """Every drill's result, the audit log and its verification."""

    bundle: str
    passed: bool
    results: list[DrillResult]
    audit_log: str
    audit: dict[str, Any]
    uncovered_reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(drill: Drill, out: FallbackOutput, budget_ms: float, logged: list[dict[str, Any]]) -> list[str]:
    problems = []
    wrong = sorted({r for r in out.reason if r != drill.reason})
    if wrong:
        problems.append(f"reasons {wrong} where every sample should give {drill.reason!r}")
    if any(is_primary_path(s) for s in out.served_by):
        problems.append(f"served_by {sorted(set(out.served_by))}: the primary answered despite the fault")
    if not out.latency_ms <= budget_ms:
        problems.append(f"answered in {out.latency_ms:g} ms, over the budget {budget_ms:g} ms")
    if len([r for r in logged if r.get("reason") == drill.reason]) < len(out.reason):
        problems.append(f"the audit log holds {len(logged)} record(s) of request {out.request_id}, "
                        f"expected {len(out.reason)} with reason {drill.reason!r}")
    return problems


def run_drills(
    bundle: str | os.PathLike[str], out_dir: str | os.PathLike[str], settings: DrillSettings | None = None
) -> DrillReport:
    """Run every drill against ``bundle``; write ``audit.jsonl`` into ``out_dir``; return the report.

    Args:
        bundle: the bundle folder.
        out_dir: the run directory (created).
        settings: seed, batch size and drift-drill length (default :class:`DrillSettings`).
    """
    settings = settings or DrillSettings()
    from fallbackformer.export.bundle import read_manifest
    from fallbackformer.governance.audit import verify_log
    from fallbackformer.monitoring.audit_chain import policy_digest
    from fallbackformer.monitoring.sinks import JsonlFileSink, read_jsonl

    bundle, out_dir = Path(bundle), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / AUDIT_LOG
    manifest = read_manifest(bundle)
    sink = JsonlFileSink(log, policy_digest=policy_digest(manifest["policy"]))
    results = []
    try:
        for drill in DRILLS:
            ctx = DrillContext(bundle, [sink], settings)
            try:
                out, evidence = drill.run(ctx)
                sink.flush()
                logged = [r for r in read_jsonl(log) if r.get("request_id") == out.request_id]
                budget = float(logged[0]["budget_ms"]) if logged else float("nan")  # (recorded per event)
                failures = _check(drill, out, budget, logged)
                evidence.update(
                    request_id=out.request_id, served_by=sorted(set(out.served_by)), reasons=sorted(set(out.reason)),
                    latency_ms=out.latency_ms, budget_ms=budget, audit_records=[r.get("seq") for r in logged],
                    detail=logged[0].get("detail", "") if logged else "",
                )
            except Exception as exc:  # a drill that crashes fails, and says how
                failures, evidence = [f"the drill raised {type(exc).__name__}: {exc}"], {}
            finally:
                for fn in ctx.cleanups:
                    fn()
            results.append(DrillResult(drill.name, drill.reason, not failures, failures, evidence))
    finally:
        sink.close()
    audit = verify_log(log)
    uncovered = sorted(set(R.REASONS) - drill_reasons())
    passed = all(r.passed for r in results) and audit.ok and not uncovered
    return DrillReport(str(bundle), passed, results, str(log), dataclasses.asdict(audit), uncovered)


def write_report(report: DrillReport, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``drill.json`` and a short ``drill.html`` into ``out_dir``; return their paths."""
    import html

    out_dir = Path(out_dir)
    jpath, hpath = out_dir / "drill.json", out_dir / "drill.html"
    jpath.write_text(dumps(report.to_dict(), indent=2, where="drill report") + "\n", encoding="utf-8")
    rows = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td><code>{r.reason}</code></td>"
        f"<td style='color:{'green' if r.passed else 'red'}'>{'PASS' if r.passed else 'FAIL'}</td>"
        f"<td>{html.escape(str(r.evidence.get('fault', '')))}</td>"
        f"<td>{html.escape('; '.join(r.failures) or 'served_by ' + ', '.join(r.evidence.get('served_by', [])) + ', ' + str(r.evidence.get('latency_ms')) + ' ms')}</td></tr>"
        for r in report.results
    )
    verdict = "PASS" if report.passed else "FAIL"
    hpath.write_text(
        f"<!doctype html><meta charset='utf-8'><title>Fallback drills: {verdict}</title>"
        f"<h1>Fallback drills: {verdict}</h1><p>bundle <code>{html.escape(report.bundle)}</code>; "
        f"audit log <code>{html.escape(report.audit_log)}</code>: {html.escape(report.audit['message'])}</p>"
        "<table border='1' cellpadding='4'><tr><th>drill</th><th>reason</th><th>result</th><th>fault</th>"
        f"<th>evidence</th></tr>{rows}</table>"
        + (f"<p style='color:red'>reasons without a drill: {report.uncovered_reasons}</p>" if report.uncovered_reasons else ""),
        encoding="utf-8",
    )
    return jpath, hpath


def run_drills_from_config(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``scripts/drill.py``: run the drills on ``cfg.bundle`` into ``cfg.out_dir``; print one line per drill.

    Returns:
        ``(metrics, objects)``: ``{"passed", "failed": [names], "audit_ok"}`` and ``{"report": DrillReport}``.
    """
    from hydra.utils import instantiate

    report = run_drills(cfg.bundle, cfg.out_dir, instantiate(cfg.drills))
    jpath, hpath = write_report(report, cfg.out_dir)
    for r in report.results:
        ev = r.evidence
        line = f"served_by {','.join(ev.get('served_by', []))} in {ev.get('latency_ms')} ms; logged seq {ev.get('audit_records', [None])[0]}.."
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.name:<18} {r.reason:<19} {'; '.join(r.failures) or line}")
    print(f"audit log {report.audit_log}: {report.audit['message']}")
    print(f"{'ALL DRILLS PASSED' if report.passed else 'DRILLS FAILED'}; report {jpath} and {hpath}")
    failed = [r.name for r in report.results if not r.passed]
    return {"passed": report.passed, "failed": failed, "audit_ok": report.audit["ok"]}, {"report": report}
