"""Reassess after a model update: approve or refuse a candidate bundle against the current one.

    python scripts/reassess.py current=checkpoints/digits candidate=DIR
    python scripts/reassess.py current=checkpoints/digits candidate=DIR shift=smoke

Prints one line ("approve: ..." or "refuse: ...") and writes reassess.json into the run directory;
exits 0 once it reached a verdict (either), non-zero only when it could not.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="reassess")
def main(cfg: DictConfig) -> None:
    from fallbackformer.governance.reassess import run_reassess_from_config

    run_reassess_from_config(cfg)


if __name__ == "__main__":
    main()
