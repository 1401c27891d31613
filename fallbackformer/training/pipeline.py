"""The pipeline functions the scripts call: each takes the Hydra config, returns (metrics, objects).

``run(cfg)`` is the main job: train the primary with early exits, distill the student, calibrate the
gates, assemble the :class:`FallbackModel`, evaluate on the clean test split and the shift suite,
save the bundle, export ONNX and check it against onnxruntime, and write ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fallbackformer.common.jsonsafe import dumps
from fallbackformer.common.paths import path_names
from fallbackformer.common.timing import Stopwatch
from fallbackformer.gates.gate import ConfidenceGate
from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.data.protocol import DataSource, ShiftSuiteLike, check_data_source, check_shift_suite
from fallbackformer.models.transforms import fit_input_transforms
from fallbackformer.runtime.fallback_model import FallbackModel

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    """The run directory (Hydra's, or ``cfg.output_dir`` when run without Hydra's runtime)."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _fit(module: L.LightningModule, datamodule: L.LightningDataModule, trainer_cfg: DictConfig,
         monitor: str, max_epochs: int | None, ckpt_dir: Path) -> tuple[float, dict[str, float]]:
    """Fit with Lightning, keep the checkpoint that is best on validation, load it back.

    The callbacks, logger, resume checkpoint and progress display come from the config that holds
    ``trainer_cfg`` (``cfg.callbacks``, ``cfg.logger``, ``cfg.ckpt_path``, ``cfg.progress``; see
    :mod:`fallbackformer.training.callbacks`). A config without a ``callbacks`` key (the stage
    scripts') gets a checkpoint on ``monitor`` alone; ``callbacks: null`` gets none.
    """
    from fallbackformer.training.callbacks import (
        best_checkpoint, build_callbacks, build_logger, interactive, resume_path,
    )

    root = trainer_cfg._get_root()  # the whole run config (trainer_cfg itself when it stands alone)
    stage = ckpt_dir.name
    progress = interactive(root.get("progress"))
    if "callbacks" in root:
        callbacks = build_callbacks(root.callbacks, monitor, ckpt_dir, progress, stage)
    else:
        callbacks = [ModelCheckpoint(dirpath=ckpt_dir, monitor=monitor, mode="max", save_top_k=1,
                                     filename="best", enable_version_counter=False)]
    checkpoint = best_checkpoint(callbacks, monitor)
    overrides: dict[str, Any] = {"callbacks": callbacks, "default_root_dir": str(ckpt_dir),
                                 "enable_progress_bar": progress and any(isinstance(c, ProgressBar) for c in callbacks)}
    if root.get("logger") is not None:
        # <run>/logs/<stage>/: next to checkpoints/, not inside the checkpoint folder
        overrides["logger"] = build_logger(root.logger, ckpt_dir.parent.parent / "logs" / stage)
    if max_epochs is not None:
        overrides["max_epochs"] = max_epochs
    trainer: L.Trainer = instantiate(trainer_cfg, **overrides)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(root.get("ckpt_path"), module, stage))
    # Every rank loads the same best weights (the file is written by rank zero before a barrier), so
    # under DDP the teacher of the next stage is the same in every process.
    trainer.strategy.barrier("fallbackformer._fit")
    if checkpoint is not None and checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
    score = checkpoint.best_model_score if checkpoint is not None else None
    best = float(score) if score is not None else float("nan")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return best, metrics


def build_augmentation(cfg: DictConfig) -> Any:
    """The training augmentation of ``cfg.augment`` (a fresh one, seeded), or ``None``."""
    from fallbackformer.data.augment import optional_augmentation

    return optional_augmentation(instantiate(cfg.augment)) if cfg.get("augment") is not None else None


def train_primary(cfg: DictConfig, datamodule: L.LightningDataModule, workdir: Path) -> tuple[MultiExitNet, dict]:
    """Train the primary's exits jointly; the checkpoint is chosen on the validation split."""
    primary: MultiExitNet = instantiate(cfg.primary.model)
    fit_input_transforms(primary, *datamodule.splits["train"])  # data-fitted constants (e.g. standardisation)
    module = instantiate(cfg.primary.module)(model=primary, augment=build_augmentation(cfg))
    best, _ = _fit(module, datamodule, cfg.trainer, cfg.primary.monitor, None, workdir / "primary")
    return primary.eval(), {"val_acc_primary": best}


def distill_student(cfg: DictConfig, datamodule: L.LightningDataModule, primary: MultiExitNet,
                    workdir: Path) -> tuple[nn.Module, dict]:
    """Distill the student from the frozen primary's final exit (Hinton loss)."""
    student: nn.Module = instantiate(cfg.student.model)
    fit_input_transforms(student, *datamodule.splits["train"])
    module = instantiate(cfg.student.module)(student=student, teacher=primary, augment=build_augmentation(cfg))
    best, _ = _fit(module, datamodule, cfg.trainer, cfg.student.monitor, cfg.student.max_epochs,
                   workdir / "student")
    return student.eval(), {"val_acc_student": best}


@torch.no_grad()
def path_logits(primary: MultiExitNet, student: nn.Module, x: torch.Tensor,
                batch_size: int = 512) -> list[torch.Tensor]:
    """Logits of every path on ``x``, ``[exit_1, ..., primary, student]``, each ``[N, C]``."""
    chunks = [primary(xb) + [student(xb)] for xb in x.split(batch_size)]
    return [torch.cat(parts) for parts in zip(*chunks)]


def calibrate_paths(cfg: DictConfig, primary: MultiExitNet, student: nn.Module,
              splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
              report_dir: Path | None = None) -> tuple[list[ConfidenceGate], dict]:
    """Gates ``[exit_1.., primary, student]`` on the calibration split (``cfg.gate``).

    A learned score trains on the validation split, disjoint from calibration. With ``report_dir``,
    ``calibration.json`` and per-gate reliability and risk-coverage figures are written there.
    """
    from fallbackformer.training.calibration import calibrate_gates, write_calibration_report

    x_cal, y_cal = splits["calibration"]
    logits = path_logits(primary, student, x_cal)
    score_train = None
    if cfg.gate.get("score") == "learned":
        x_val, y_val = splits["val"]
        val_logits = path_logits(primary, student, x_val)
        score_train = (val_logits[:-1], val_logits[-1], y_val)
    gates, report = calibrate_gates(logits[:-1], logits[-1], y_cal, cfg.gate, score_train=score_train)
    if report_dir is not None:
        write_calibration_report(report, gates, logits, y_cal, report_dir)
    return gates, report


def fit_router_step(cfg: DictConfig, primary: MultiExitNet, student: nn.Module,
                    splits: dict[str, tuple[torch.Tensor, torch.Tensor]], suite: ShiftSuiteLike) -> tuple[Any, dict]:
    """The router of ``cfg.router`` (``None`` when the config has none): fitted, certified, and its report.

    The mixture it is certified on is drawn with the dataset's own shift suite (``suite.corrupt``).
    """
    if not cfg.get("router"):
        return None, {}
    from fallbackformer.training.router_step import fit_router

    return fit_router(primary, student, splits, instantiate(cfg.router), check_shift_suite(suite), int(cfg.num_classes))


def fit_label_free_step(cfg: DictConfig, model: FallbackModel, splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        suite: ShiftSuiteLike) -> dict[str, Any]:
    """Fit ``cfg.label_free`` on the calibration split and attach it (``model.label_free``); its report.

    Nothing happens (``{}``) when the config has none. ``ff.save`` stores the estimator in the
    manifest's ``label_free`` section; the evaluation reports it per set.
    """
    if not cfg.get("label_free"):
        return {}
    from fallbackformer.training.label_free_fit import fit_label_free

    x_cal, y_cal = splits["calibration"]
    model.label_free, report = fit_label_free(model, x_cal, y_cal, check_shift_suite(suite), instantiate(cfg.label_free))
    log.info("label-free estimator: %s (leave-one-corruption-out within %.2f: %s)", model.label_free.method,
             report["tolerance"], {m: f"{r['within']}/{r['n']}" for m, r in report["loco"].items()})
    return report


def fit_ladder_step(cfg: DictConfig, primary: MultiExitNet, student: nn.Module,
                    splits: dict[str, tuple[torch.Tensor, torch.Tensor]], suite: ShiftSuiteLike) -> tuple[Any, dict]:
    """The ladder of ``cfg.ladder`` (``None`` when the config has none): rungs fitted, gated; and its report.

    With a router the rungs' gates calibrate on the router's own shifted mixture (``training/ladder_step.py``).
    """
    if not cfg.get("ladder"):
        return None, {}
    from fallbackformer.training.ladder_step import build_ladder

    router_cfg = instantiate(cfg.router) if cfg.get("router") else None
    ladder = build_ladder(instantiate(cfg.ladder, _convert_="all"), primary, student, splits,
                          router_cfg, check_shift_suite(suite) if router_cfg is not None else None)
    return ladder, ladder.report


def assemble(cfg: DictConfig, primary: MultiExitNet, student: nn.Module,
             gates: list[ConfidenceGate], router: Any = None, datamodule: DataSource | None = None,
             ladder: Any = None) -> FallbackModel:
    """The combined model, ready to serve.

    Args:
        cfg: the run config (``policy``, ``num_classes``; ``data`` when no datamodule is given).
        primary: the trained primary.
        student: the trained student.
        gates: ``[exit_1.., primary, student]``.
        router: the fitted router, or ``None``.
        ladder: the :class:`~fallbackformer.training.ladder_step.Ladder` (rungs, veto, cache, default), or ``None``.
        datamodule: where the input spec and the class names come from (default: ``instantiate(cfg.data)``).

    Raises:
        ValueError: ``cfg.num_classes`` differs from the datamodule's number of classes.
    """
    data = check_data_source(datamodule if datamodule is not None else instantiate(cfg.data))
    if int(cfg.num_classes) != data.num_classes:
        raise ValueError(f"num_classes={cfg.num_classes} but the datamodule {type(data).__name__} has "
                         f"{data.num_classes} classes {data.class_names}; set num_classes={data.num_classes} "
                         "(the experiment config should set it with its data group)")
    policy = instantiate(cfg.policy)
    return FallbackModel(primary, student, gates, policy, input_spec=data.input_spec,
                         class_names=list(data.class_names), router=router,
                         **(ladder.model_kwargs() if ladder is not None else {})).eval()


def combined_onnx(model: FallbackModel, bundle_dir: Path, out_dir: Path, variant: str) -> Path:
    """``out_dir/model.onnx``, the combined graph of ``variant``: a copy of the bundle's own when it is that
    variant (``save(onnx=True)`` writes the "where" graph; exporting it again costs ~20 s), else exported."""
    from fallbackformer.export import export_onnx
    from fallbackformer.export.bundle import COMBINED_ONNX

    target, saved = out_dir / "model.onnx", bundle_dir / COMBINED_ONNX
    if variant == "where" and saved.is_file():
        shutil.copyfile(saved, target)
        return target
    return Path(export_onnx(model, target, variant=variant))


def run(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The main job (see the module docstring). Returns ``(summary, objects)``."""
    from fallbackformer.evaluation.governance_report import label_free_summary
    from fallbackformer.evaluation.pipeline import evaluate_and_report, headline_metrics
    from fallbackformer.evaluation.shift_eval import CLEAN
    from fallbackformer.export import check_onnx_parity, save

    from lightning.pytorch.utilities import rank_zero_only

    from fallbackformer.training.callbacks import check_launch, interactive
    from fallbackformer.training.console import setup_console_logging

    setup_console_logging()  # each Lightning line once (Hydra's handlers only), no "Tip" lines
    check_launch(cfg)  # trainer=ddp_sim re-launches the script per rank: not inside a -m sweep
    if cfg.get("evaluation") is not None and cfg.evaluation.get("progress") is None:
        cfg.evaluation.progress = interactive(cfg.get("progress"))  # bars only on a terminal
    watch = Stopwatch()
    out_dir = output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # the exporter logs every graph pass at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    splits = datamodule.splits

    with watch.step("train"):
        primary, train_metrics = train_primary(cfg, datamodule, out_dir / "checkpoints")
    with watch.step("distill"):
        student, distill_metrics = distill_student(cfg, datamodule, primary, out_dir / "checkpoints")
    if rank_zero_only.rank != 0:  # DDP: the other ranks only train; rank zero calibrates, evaluates, saves
        return {}, {"primary": primary, "student": student, "output_dir": out_dir}

    with watch.step("calibrate"):
        gates, calibration = calibrate_paths(cfg, primary, student, splits, out_dir / "calibration")
        suite = instantiate(cfg.shift)
        router, router_report = fit_router_step(cfg, primary, student, splits, suite)
        ladder, ladder_report = fit_ladder_step(cfg, primary, student, splits, suite)
        model = assemble(cfg, primary, student, gates, router, datamodule=datamodule, ladder=ladder)
        # Latency profiles (and the compile choice) before anything is timed, on validation images at
        # the request sizes the evaluation uses.
        model.warm_up(splits["val"][0][: cfg.evaluation.batch_size], batch_sizes=[1, cfg.evaluation.batch_size])
    with watch.step("label_free"):
        label_free_report = fit_label_free_step(cfg, model, splits, suite)

    # Evaluation touches the test split and the shift sets made from it, nothing else does.
    with watch.step("evaluate"):
        x_test, y_test = splits["test"]
        shift_sets = suite.build(x_test, y_test)
        evaluation, report_paths = evaluate_and_report(
            model, x_test, y_test, suite, out_dir, shift_sets=shift_sets,
            extra={"bundle": str(cfg.bundle_dir), "seed": cfg.seed},
            **OmegaConf.to_container(cfg.evaluation, resolve=True),
        )

    with watch.step("export"):
        bundle_dir = Path(cfg.bundle_dir)
        # With the ONNX stage graphs inside, the bundle also loads with backend="onnxruntime".
        save(model, bundle_dir, evaluation=headline_metrics(evaluation),
             degradation=OmegaConf.to_container(cfg.degradation, resolve=True), onnx=bool(cfg.onnx.export))
        onnx_report: dict[str, Any] = {}
        if cfg.onnx.export:
            onnx_path = combined_onnx(model, bundle_dir, out_dir, cfg.onnx.variant)
            onnx_report = check_onnx_parity(model, onnx_path, x_test)
    seconds = {**watch.seconds, "total": watch.elapsed()}

    clean = evaluation.per_set[CLEAN]
    shift = {
        key: {"accuracy_system": r["accuracy"]["system"], "accuracy_primary": r["accuracy"]["primary"],
              "accuracy_student": r["accuracy"]["student"], "fallback_rate": r["fallback_rate"]}
        for key, r in evaluation.per_set.items() if key != CLEAN
    }
    summary = {
        "accuracy": clean["accuracy"],
        "fallback_rate": clean["fallback_rate"],
        "served_by": clean["served_by"],
        "reasons": clean["reasons"],
        "shift": shift,
        "shift_summary": evaluation.summary,
        "label_free": {"method": getattr(getattr(model, "label_free", None), "method", "mean_confidence"),
                       "loco": {m: {k: r[k] for k in ("within", "n", "mae")} for m, r in label_free_report.get("loco", {}).items()},
                       "test_sets": label_free_summary(evaluation.per_set)},
        "onnx": onnx_report,
        "bundle": str(bundle_dir),
        "report": {k: str(v) for k, v in report_paths.items() if k in ("json", "md", "html")},
        "calibration": {"mode": calibration["mode"], "system": calibration["system"],
                        "gates": {n: g["guarantee"] for n, g in calibration["gates"].items()},
                        "router": router_report.get("guarantee")},
        "ladder": ladder_report or None,
        "training": {**train_metrics, **distill_metrics},
        "seconds": seconds,
    }
    (out_dir / "summary.json").write_text(dumps(summary, indent=2, where="summary"))
    log.info("summary written to %s", out_dir / "summary.json")
    print(format_summary(summary))
    objects = {"model": model, "primary": primary, "student": student, "gates": gates,
               "splits": splits, "shift_sets": shift_sets, "evaluation": evaluation, "output_dir": out_dir}
    return summary, objects


def format_summary(summary: dict[str, Any]) -> str:
    """A short plain-text table of the main figures."""
    a = summary["accuracy"]
    lines = [
        "fallbackformer run summary",
        f"  clean accuracy   primary {a['primary']:.4f}   student {a['student']:.4f}   system {a['system']:.4f}",
        f"  fallback rate    {summary['fallback_rate']:.4f}",
        "  served_by        " + "  ".join(f"{k} {v:.3f}" for k, v in summary["served_by"].items()),
    ]
    if summary.get("report"):
        lines.append(f"  report           {summary['report'].get('html')}")
    if summary.get("onnx"):
        o = summary["onnx"]
        lines.append(f"  onnx             max_abs_diff {o.get('max_abs_diff', float('nan')):.2e}   "
                     f"decisions_agree {o.get('decisions_agree', float('nan')):.4f}")
    lines.append(f"  {'shift (mean over severities)':<30} {'system':>8} {'primary':>8} {'student':>8} {'fallback':>9}")
    by_corruption: dict[str, list[dict[str, float]]] = {}
    for key, r in summary["shift"].items():
        by_corruption.setdefault(key.split("/")[0], []).append(r)
    for name, rows in by_corruption.items():
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        lines.append(f"  {name:<30} {mean['accuracy_system']:>8.4f} {mean['accuracy_primary']:>8.4f} "
                     f"{mean['accuracy_student']:>8.4f} {mean['fallback_rate']:>9.4f}")
    lf = (summary.get("label_free") or {}).get("test_sets") or {}
    if lf.get("all"):
        lines.append(f"  label-free       {summary['label_free']['method']}: within 5 pt on {lf['all'][0]}/{lf['all'][1]} "
                     f"sets (tunable {lf['tunable'][0]}/{lf['tunable'][1]}, held-out {lf['held_out'][0]}/{lf['held_out'][1]})")
    s = summary["seconds"]
    lines.append("  seconds          " + "  ".join(f"{k} {v:.1f}" for k, v in s.items()))
    lines.append(f"  bundle           {summary['bundle']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- stage entry points
# scripts/train.py, distill.py, calibrate.py and export.py run the main job one step at a time,
# passing models between them through safetensors files in a directory (training/artifacts.py).


def _stage_setup(cfg: DictConfig) -> tuple[Path, L.LightningDataModule]:
    out_dir = output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    return out_dir, datamodule


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the primary; write ``primary.safetensors`` / ``primary.json`` into the run directory."""
    from fallbackformer.training.artifacts import save_model

    out_dir, datamodule = _stage_setup(cfg)
    primary, metrics = train_primary(cfg, datamodule, out_dir / "checkpoints")
    save_model(primary, out_dir, "primary")
    return metrics, {"primary": primary, "output_dir": out_dir}


def distill(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Distill the student from the primary in ``cfg.primary_dir``; write ``student.*``."""
    from fallbackformer.training.artifacts import load_model, save_model

    out_dir, datamodule = _stage_setup(cfg)
    primary = load_model(cfg.primary_dir, "primary")
    student, metrics = distill_student(cfg, datamodule, primary, out_dir / "checkpoints")
    save_model(student, out_dir, "student")
    return metrics, {"student": student, "output_dir": out_dir}


def calibrate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate the gates of ``cfg.primary_dir`` / ``cfg.student_dir``; write ``calibration.json``."""
    from fallbackformer.training.artifacts import load_model

    out_dir, datamodule = _stage_setup(cfg)
    primary = load_model(cfg.primary_dir, "primary")
    student = load_model(cfg.student_dir, "student")
    gates, report = calibrate_paths(cfg, primary, student, datamodule.splits, out_dir)
    payload = {"gates": {n: g.to_config() for n, g in zip(path_names(primary.num_exits), gates)}}
    (out_dir / "gates.json").write_text(dumps(payload, indent=2, where="gates"))
    return report, {"gates": gates, "output_dir": out_dir}


def export(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Assemble primary, student and the gates of ``cfg.calibration``; save the bundle and ONNX."""
    from fallbackformer.export import check_onnx_parity, save
    from fallbackformer.training.artifacts import load_model

    out_dir, datamodule = _stage_setup(cfg)
    primary = load_model(cfg.primary_dir, "primary")
    student = load_model(cfg.student_dir, "student")
    gate_cfgs = json.loads(Path(cfg.calibration).read_text())["gates"]  # gates.json of calibrate.py
    gates = [ConfidenceGate.from_config(gate_cfgs[n]) for n in path_names(primary.num_exits)]
    model = assemble(cfg, primary, student, gates, datamodule=datamodule)
    bundle = save(model, Path(cfg.bundle_dir), degradation=OmegaConf.to_container(cfg.degradation, resolve=True),
                  onnx=bool(cfg.onnx.export))
    metrics: dict[str, Any] = {"bundle": str(bundle)}
    if cfg.onnx.export:
        onnx_path = combined_onnx(model, bundle, out_dir, cfg.onnx.variant)
        metrics["onnx"] = check_onnx_parity(model, onnx_path, datamodule.splits["test"][0])
    return metrics, {"model": model, "output_dir": out_dir}
