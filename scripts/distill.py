"""Distill the student from a trained primary: python scripts/distill.py primary_dir=DIR"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="stages")
def main(cfg: DictConfig) -> None:
    from fallbackformer.training.pipeline import distill

    metrics, _ = distill(cfg)
    print(metrics)


if __name__ == "__main__":
    main()
