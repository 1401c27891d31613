"""A readable console for the main job: each Lightning message once, and no sales tips.

``import lightning`` puts a console handler on the ``lightning`` logger and lets its records
propagate, so under Hydra (whose handlers sit on the root logger) every Lightning line printed twice.
Lightning also prints "Tip" lines advertising its cloud products at every ``Trainer``.
:func:`setup_console_logging` fixes both; it is idempotent and the pipeline calls it at the top of
``run()``.
"""

from __future__ import annotations

import logging

# Loggers that Lightning may give their own console handler (the unified package and the standalone ones).
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
# Where Lightning's rank_zero_info (and so its tips) log from.
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class DropLightningTips(logging.Filter):
    """Drops Lightning's advertising lines ("💡 Tip: ... litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Tip:" in message and ("litlogger" in message or "litmodels" in message or "Lightning" in message))


_TIP_FILTER = DropLightningTips()


def _add_filter(target: logging.Filterer) -> None:
    if not any(isinstance(f, DropLightningTips) for f in target.filters):
        target.addFilter(_TIP_FILTER)


def setup_console_logging() -> None:
    """Each Lightning record printed once, tips dropped.

    When the root logger has handlers (Hydra's console and ``run.log`` file), Lightning's own stream
    handlers are removed and its records propagate to the root's alone, so they also reach the job's
    log file. Without root handlers (a plain script) Lightning keeps its own handler. Either way the
    tip filter sits on the loggers the tips come from and on every handler involved.
    """
    root = logging.getLogger()
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if root.handlers:
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # Lightning's console handlers, not files
                    logger.removeHandler(handler)
            logger.propagate = True
        for handler in logger.handlers:
            _add_filter(handler)
    for name in RANK_ZERO_LOGGERS:
        _add_filter(logging.getLogger(name))
    for handler in root.handlers:
        _add_filter(handler)
