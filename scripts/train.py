"""Train the primary with early exits (Lightning); writes primary.safetensors into the run dir."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="stages")
def main(cfg: DictConfig) -> None:
    from fallbackformer.training.pipeline import train

    metrics, _ = train(cfg)
    print(metrics)


if __name__ == "__main__":
    main()
