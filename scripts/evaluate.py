"""Evaluate a bundle on the clean test split and the shift suite; write report.json/.md/.html.

    python scripts/evaluate.py bundle=PATH hydra.run.dir=DIR
    python scripts/evaluate.py bundle=PATH shift=smoke          # 3 types x 3 severities
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from fallbackformer.evaluation.pipeline import run_evaluation

    run_evaluation(cfg)


if __name__ == "__main__":
    main()
