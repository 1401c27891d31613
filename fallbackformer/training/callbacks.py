"""Lightning callbacks, loggers and the trainer wiring of the ``callbacks/``, ``logger/`` and ``ckpt_path`` configs.

``_fit`` in :mod:`fallbackformer.training.pipeline` builds its callbacks and logger with the helpers
here, so that every Lightning fit of the main job (the primary, then the student) gets:

* the callbacks of ``cfg.callbacks`` (checkpoint on the stage's monitored validation metric, early
  stopping, a progress bar, a one-line-per-epoch log), where a ``monitor``/``dirpath``/``stage`` left
  ``null`` in the config is filled with the stage's own value;
* a progress bar when the terminal is interactive (``sys.stderr.isatty()``), and otherwise the
  clean one-line-per-epoch log of :class:`EpochLog` (``progress`` forces either);
* the logger of ``cfg.logger`` (CSV by default; TensorBoard on request, with a clear error when it is
  not installed);
* ``cfg.ckpt_path`` to resume, routed to the stage the checkpoint belongs to.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Keys of a callback or logger node that the stage fills in when the config leaves them null.
_STAGE_FILLED = ("monitor", "dirpath", "stage", "save_dir", "name")


def interactive(progress: bool | None = None) -> bool:
    """Whether to show progress bars: ``progress`` when given, else whether stderr is a terminal."""
    return bool(progress) if progress is not None else sys.stderr.isatty()


class EpochLog(Callback):
    """One log line per finished training epoch (rank zero only): the stage, the epoch, the metrics.

    The plain-console counterpart of a progress bar, for logs that go to files or CI.

    Args:
        stage: name shown at the start of each line (``_fit`` fills it with the stage: primary, student).
        keys: metric names to show (default: every scalar in ``trainer.callback_metrics``).
    """

    def __init__(self, stage: str | None = None, keys: list[str] | None = None) -> None:
        self.stage = stage or "fit"
        self.keys = list(keys) if keys is not None else None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if (self.keys is None or k in self.keys) and torch.as_tensor(v).numel() == 1}
        shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        log.info("%s epoch %d/%d  %s", self.stage, trainer.current_epoch + 1, trainer.max_epochs, shown)


def csv_logger(save_dir: str | None = None, name: str = "csv", **kwargs: Any) -> Any:
    """Lightning's CSVLogger; ``save_dir`` ``None`` (not yet filled by the stage) means the current folder.

    Args:
        save_dir: where ``metrics.csv`` goes (``_fit`` fills it with ``<run>/logs/<stage>``).
        name: sub-folder under ``save_dir``.
        **kwargs: passed on to :class:`lightning.pytorch.loggers.CSVLogger`.
    """
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=save_dir or ".", name=name, **kwargs)


def tensorboard_logger(save_dir: str | None = None, name: str = "tensorboard", **kwargs: Any) -> Any:
    """Lightning's TensorBoardLogger, or an ImportError that says what to install.

    Args:
        save_dir: where the event files go (``_fit`` fills it with ``<run>/logs/<stage>``).
        name: sub-folder under ``save_dir``.
        **kwargs: passed on to :class:`lightning.pytorch.loggers.TensorBoardLogger`.
    """
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ImportError(
            "logger=tensorboard needs the tensorboard package, which is not installed: "
            "pip install tensorboard (or lightning's extra: pip install 'lightning[extra]'), "
            "or keep the default logger=csv"
        )
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=save_dir or ".", name=name, **kwargs)


def _fill(node: DictConfig, values: dict[str, Any]) -> dict[str, Any]:
    """The stage's values for the keys of ``node`` that the config left null."""
    return {k: v for k, v in values.items() if k in _STAGE_FILLED and k in node and node[k] is None}


def build_callbacks(callbacks_cfg: DictConfig | None, monitor: str, ckpt_dir: Path, progress: bool,
                    stage: str) -> list[Callback]:
    """The callbacks of ``callbacks_cfg`` for one stage.

    Args:
        callbacks_cfg: a mapping name -> callback node (``cfg.callbacks``); ``None`` gives no callbacks.
        monitor: the stage's validation metric (maximised), for nodes whose ``monitor`` is null.
        ckpt_dir: the stage's checkpoint folder, for nodes whose ``dirpath`` is null.
        progress: keep the progress bars (interactive) or drop them and keep :class:`EpochLog` (not).
        stage: the stage's name, for nodes whose ``stage`` is null.
    """
    if callbacks_cfg is None:
        return []
    values = {"monitor": monitor, "dirpath": str(ckpt_dir), "stage": stage}
    callbacks = []
    for key, node in callbacks_cfg.items():
        if node is None:  # callbacks.early_stopping=null switches one off
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"callbacks.{key} must be a config node with a _target_; got {node!r}")
        callback = instantiate(node, **_fill(node, values))
        if isinstance(callback, ProgressBar) and not progress:
            continue
        if isinstance(callback, EpochLog) and progress:
            continue
        callbacks.append(callback)
    return callbacks


def build_logger(logger_cfg: DictConfig | None, log_dir: Path) -> Any:
    """The logger of ``logger_cfg`` (a null ``save_dir`` becomes ``log_dir``), or ``False`` for none."""
    if logger_cfg is None:
        return False
    return instantiate(logger_cfg, **_fill(logger_cfg, {"save_dir": str(log_dir)}))


def resume_path(ckpt_path: str | None, module: L.LightningModule, stage: str) -> str | None:
    """The checkpoint this stage resumes from, or ``None`` (a fresh fit).

    Args:
        ckpt_path: ``cfg.ckpt_path``: a Lightning ``.ckpt`` file (it resumes the stage whose module
            its weights fit; the other stage trains afresh), or a run's ``checkpoints/`` folder (each
            stage resumes from ``<folder>/<stage>/last.ckpt`` when there is one).
        module: the LightningModule about to be fitted.
        stage: the stage's name (the sub-folder of the checkpoints folder).

    Raises:
        FileNotFoundError: ``ckpt_path`` does not exist.
    """
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist; give a .ckpt file or a run's checkpoints/ folder "
            "(for example outputs/run/<date>/checkpoints), or ckpt_path=null to train afresh"
        )
    if path.is_dir():
        last = path / stage / "last.ckpt"
        return str(last) if last.exists() else None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if set(state.get("state_dict", {})) == set(module.state_dict()):
        return str(path)
    log.info("ckpt_path %s holds another stage's weights; %s trains afresh", path, stage)
    return None


def best_checkpoint(callbacks: list[Callback], monitor: str) -> ModelCheckpoint | None:
    """The checkpoint callback that tracks ``monitor`` (the first one), if any."""
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor == monitor:
            return callback
    return None


def check_launch(cfg: DictConfig) -> None:
    """Refuse what Lightning's script launcher cannot do: a DDP trainer inside a Hydra multirun.

    ``strategy: ddp`` re-runs the command line for ranks >= 1; under ``-m`` that command is the
    whole sweep again. Sweeps run one process per trial.

    Raises:
        ValueError: ``cfg.trainer`` is a subprocess DDP setup and Hydra runs in MULTIRUN mode.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    trainer = cfg.get("trainer")
    if trainer is None or not HydraConfig.initialized():
        return
    strategy = trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    subprocess_ddp = target.endswith("DDPStrategy") and (not isinstance(strategy, DictConfig)
                                                         or strategy.get("start_method", "popen") == "popen")
    subprocess_ddp = subprocess_ddp or target == "ddp"
    if subprocess_ddp and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ValueError(
            f"trainer.strategy={target} re-launches the script for every rank, which a Hydra multirun (-m) "
            "cannot do; sweep with one process per trial (the default trainer, or trainer.devices=1 and no "
            "strategy), and train the chosen setting with trainer=ddp_sim afterwards"
        )

