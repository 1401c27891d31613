"""The main job: train, distill, calibrate, assemble, evaluate, save, export. See configs/run.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="run")
def main(cfg: DictConfig) -> None:
    from fallbackformer.training.pipeline import run

    run(cfg)


if __name__ == "__main__":
    main()
