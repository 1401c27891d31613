"""Serve a bundle over the Open Inference Protocol v2, with /metrics:

    python scripts/serve.py bundle=checkpoints/digits port=8080
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    from fallbackformer.serving import serve

    serve(cfg)


if __name__ == "__main__":
    main()
