"""Benchmark the runtime (overhead, evidence cost, deadline under stalls, early exits, compile, onnxruntime).

See configs/benchmark.yaml; the work is :func:`fallbackformer.benchmarks.run_benchmark`.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from fallbackformer.benchmarks import run_benchmark

    run_benchmark(cfg)


if __name__ == "__main__":
    main()
