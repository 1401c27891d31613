"""The label-free accuracy estimate of a bundle, per shift set, against the truth.

    python scripts/label_free.py bundle=checkpoints/digits
    python scripts/label_free.py bundle=checkpoints/digits fit=true save_to=checkpoints/digits

Prints the per-set table and one line (within 5 pt on how many sets: all, tunable, held-out) and
writes label_free.json / label_free.md into the run directory.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="label_free_table")
def main(cfg: DictConfig) -> None:
    from fallbackformer.training.label_free_run import run_label_free

    run_label_free(cfg)


if __name__ == "__main__":
    main()
