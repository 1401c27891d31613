"""The main job: train, distill, calibrate, assemble, evaluate, save, export. See configs/run.yaml.

Returns ``cfg.optimized_metric`` from the summary (a float, or ``None`` when the key is null), which
is what Hydra's Optuna sweeper optimises: ``python scripts/run.py -m hparams_search=digits_optuna``.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="run")
def main(cfg: DictConfig) -> float | None:
    from fallbackformer.training.pipeline import run
    from fallbackformer.training.sweep import metric_from_summary

    summary, _ = run(cfg)
    return metric_from_summary(summary, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
