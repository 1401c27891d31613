"""Benchmark the runtime (overhead, deadline under stalls, early exits, compile). See configs/benchmark.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from fallbackformer.training.benchmark import run_benchmark

    run_benchmark(cfg)


if __name__ == "__main__":
    main()
