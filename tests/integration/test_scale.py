"""Issue 13 (4, 5): callbacks/logger/debug/resume wiring of the Lightning fits, the console, the sweep metric.

Fast tests only (no wall-clock assertions); the DDP and Optuna end-to-end runs are in test_scale_slow.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig

from fallbackformer.training.callbacks import (
    EpochLog, build_callbacks, interactive, resume_path, tensorboard_logger,
)
from fallbackformer.training.sweep import metric_from_summary

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

pytestmark = pytest.mark.integration


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="run", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


# ----------------------------------------------------------------------------- callbacks and logger


@pytest.mark.parametrize("progress", [False, True])
def test_callbacks_config_fills_the_stage_and_picks_bar_or_epoch_log(tmp_path, progress):
    cfg = _compose([])
    callbacks = build_callbacks(cfg.callbacks, "val/acc_primary", tmp_path / "primary", progress, "primary")
    by_type = {type(c): c for c in callbacks}
    checkpoint = by_type[ModelCheckpoint]
    assert checkpoint.monitor == "val/acc_primary" and checkpoint.mode == "max"
    assert Path(checkpoint.dirpath) == tmp_path / "primary" and checkpoint.save_last
    assert by_type[EarlyStopping].monitor == "val/acc_primary"
    assert (TQDMProgressBar in by_type) is progress
    assert (EpochLog in by_type) is not progress
    if not progress:
        assert by_type[EpochLog].stage == "primary"


def test_one_callback_switched_off_and_a_bad_node_named():
    cfg = _compose(["callbacks.early_stopping=null"])
    callbacks = build_callbacks(cfg.callbacks, "val/acc_student", Path("x"), False, "student")
    assert not any(isinstance(c, EarlyStopping) for c in callbacks)
    with pytest.raises(ValueError, match="callbacks.bad"):
        build_callbacks(DictConfig({"bad": 3}), "m", Path("x"), False, "s")


def test_interactive_follows_the_terminal_unless_forced(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert interactive(None) is True and interactive(False) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert interactive(None) is False and interactive(True) is True


def test_tensorboard_missing_names_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(ImportError, match="pip install tensorboard"):
        tensorboard_logger(save_dir=str(tmp_path))


def test_logger_choice_reaches_lightning(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from fallbackformer.training.callbacks import build_logger

    assert isinstance(build_logger(_compose([]).logger, tmp_path), CSVLogger)
    tb = build_logger(_compose(["logger=tensorboard"]).logger, tmp_path)
    assert isinstance(tb, TensorBoardLogger) and Path(tb.save_dir) == tmp_path
    assert build_logger(_compose(["~logger"]).get("logger"), tmp_path) is False


def test_ddp_sim_and_debug_configs_say_what_they_promise():
    cfg = _compose(["trainer=ddp_sim"])
    assert (cfg.trainer.devices, cfg.trainer.accelerator, cfg.trainer.num_nodes) == (2, "cpu", 1)
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "DDPStrategy" and strategy._process_group_backend == "gloo"
    assert _compose(["debug=fdr"]).trainer.fast_dev_run is True
    overfit = _compose(["debug=overfit"])
    assert overfit.trainer.overfit_batches == 3 and overfit.callbacks.early_stopping is None
    search = _compose(["hparams_search=digits_optuna"])
    assert search.optimized_metric == "accuracy.system"
    assert set(search.hydra.sweeper.params) == {"router.alpha", "policy.budget_ms", "student.model.hidden"}


# ----------------------------------------------------------------------------- fit, checkpoints, resume


def _train(cfg: DictConfig, workdir: Path):
    from fallbackformer.training.pipeline import train_primary

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    return train_primary(cfg, datamodule, workdir)


def test_fit_checkpoints_logs_and_resumes(tmp_path, caplog):
    first = tmp_path / "first" / "checkpoints"
    cfg = _compose(["experiment=fast", "trainer.max_epochs=1", "progress=false"])
    with caplog.at_level(logging.INFO, logger="fallbackformer.training.callbacks"):
        primary, metrics = _train(cfg, first)
    assert (first / "primary" / "best.ckpt").exists() and (first / "primary" / "last.ckpt").exists()
    assert 0.0 <= metrics["val_acc_primary"] <= 1.0
    assert list((tmp_path / "first" / "logs" / "primary").rglob("metrics.csv"))
    assert any("primary epoch 1/1" in r.getMessage() for r in caplog.records)

    # Resume from the run's checkpoints folder with one more epoch: only the second epoch runs.
    caplog.clear()
    cfg = _compose(["experiment=fast", "trainer.max_epochs=2", "progress=false", f"ckpt_path={first}"])
    with caplog.at_level(logging.INFO, logger="fallbackformer.training.callbacks"):
        _train(cfg, tmp_path / "second" / "checkpoints")
    epochs = [r.getMessage() for r in caplog.records if "primary epoch" in r.getMessage()]
    assert len(epochs) == 1 and "primary epoch 2/2" in epochs[0], epochs

    # A .ckpt file resumes only the stage whose weights it holds.
    from fallbackformer.training.distill_module import DistillModule

    student = instantiate(cfg.student.model)
    distill = DistillModule(student, primary, torch.optim.AdamW, num_classes=10)
    last = first / "primary" / "last.ckpt"
    assert resume_path(str(last), distill, "student") is None
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*does not exist"):
        resume_path(str(tmp_path / "nope.ckpt"), distill, "student")


def test_without_a_callbacks_group_the_best_checkpoint_is_still_kept(tmp_path):
    """``~callbacks`` (or a config without the group, like the stage scripts'): checkpoint on monitor alone."""
    cfg = _compose(["experiment=fast", "trainer.max_epochs=1", "~callbacks", "~logger"])
    _, metrics = _train(cfg, tmp_path / "checkpoints")
    assert 0.0 <= metrics["val_acc_primary"] <= 1.0
    assert (tmp_path / "checkpoints" / "primary" / "best.ckpt").exists()
    assert not (tmp_path / "checkpoints" / "primary" / "last.ckpt").exists()
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------- the sweep metric


def test_optimized_metric_reads_a_summary_leaf_and_names_a_bad_key():
    summary = {"accuracy": {"system": 0.9, "primary": 0.95}, "served_by": {"primary": 1.0}}
    assert metric_from_summary(summary, "accuracy.system") == 0.9
    assert metric_from_summary(summary, None) is None
    assert metric_from_summary({}, "accuracy.system") is None  # a DDP rank other than zero
    with pytest.raises(KeyError, match=r"accuracy has no 'sytem'.*\['primary', 'system'\]"):
        metric_from_summary(summary, "accuracy.sytem")
    with pytest.raises(TypeError, match="not a number"):
        metric_from_summary(summary, "accuracy")


# ----------------------------------------------------------------------------- the console

_CONSOLE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # what Hydra's job_logging does
import lightning as L
if {fixed}:
    from fallbackformer.training.console import setup_console_logging
    setup_console_logging()
    setup_console_logging()  # idempotent
L.Trainer(accelerator="cpu", devices=1, default_root_dir={root!r}, enable_progress_bar=False)
"""


def _console(tmp_path: Path, fixed: bool) -> list[str]:
    result = subprocess.run([sys.executable, "-c", _CONSOLE.format(fixed=fixed, root=str(tmp_path))],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    return [line.split(" - ", 1)[-1].removeprefix("INFO: ") for line in lines if line.strip()]


def test_console_setup_prints_each_lightning_record_once_and_no_tip():
    """In process: Hydra's situation (a root handler, and lightning's own handler on "lightning")."""
    import io

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from fallbackformer.training.console import LIGHTNING_LOGGERS, RANK_ZERO_LOGGERS, setup_console_logging

    names = ("", *LIGHTNING_LOGGERS, *RANK_ZERO_LOGGERS)
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).filters[:], logging.getLogger(n).propagate,
                 logging.getLogger(n).level) for n in names}
    stream = io.StringIO()
    hydra_like, own = logging.StreamHandler(stream), logging.StreamHandler(stream)
    hydra_like.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    own.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))  # what `import lightning` installs
    try:
        for n in names:
            logging.getLogger(n).handlers, logging.getLogger(n).propagate = [], True
        logging.getLogger().handlers = [hydra_like]
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("lightning").handlers = [own]
        rank_zero_info("GPU available: False, used: False")
        assert stream.getvalue().count("GPU available") == 2  # the bug this guards against
        setup_console_logging()
        setup_console_logging()  # idempotent
        stream.seek(0), stream.truncate()
        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        lines = stream.getvalue().splitlines()
        assert lines == ["[lightning.pytorch.utilities.rank_zero][INFO] - GPU available: False, used: False"], lines
    finally:
        for n, (handlers, filters, propagate, level) in saved.items():
            logger = logging.getLogger(n)
            logger.handlers, logger.filters, logger.propagate = handlers, filters, propagate
            logger.setLevel(level)
        for handler in (hydra_like, own):
            handler.close()


@pytest.mark.slow
def test_console_prints_each_lightning_line_once_and_no_tip(tmp_path):
    """The same with a real Trainer in a fresh process (two lightning imports: slow on 2 shared cores)."""
    before = _console(tmp_path, fixed=False)
    assert before.count("GPU available: False, used: False") == 2  # the bug this guards against
    after = _console(tmp_path, fixed=True)
    assert after.count("GPU available: False, used: False") == 1
    assert len(after) == len(set(after)), after
    assert not [line for line in after if "Tip" in line], after


def test_ddp_inside_a_sweep_is_refused_with_the_fix():
    from fallbackformer.training.callbacks import check_launch

    check_launch(_compose(["trainer=ddp_sim"]))  # a single run: fine
    check_launch(_compose(["hydra.mode=MULTIRUN"]))  # a sweep of single-process trials: fine
    with pytest.raises(ValueError, match=r"DDPStrategy re-launches .* multirun \(-m\).*default trainer"):
        check_launch(_compose(["trainer=ddp_sim", "hydra.mode=MULTIRUN"]))
