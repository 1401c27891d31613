"""Calibrate the gates: python scripts/calibrate.py primary_dir=DIR student_dir=DIR"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="stages")
def main(cfg: DictConfig) -> None:
    from fallbackformer.training.pipeline import calibrate

    metrics, _ = calibrate(cfg)
    print(metrics)


if __name__ == "__main__":
    main()
