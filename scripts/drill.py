"""Fallback drills: inject a fault for every reason in ff.REASONS and check answer, budget and audit log.

    python scripts/drill.py bundle=checkpoints/digits
    python scripts/drill.py bundle=PATH hydra.run.dir=outputs/drill

Writes drill.json, drill.html and audit.jsonl into the run directory; exits 1 if any drill fails.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="drill")
def main(cfg: DictConfig) -> None:
    from fallbackformer.governance.drills import run_drills_from_config

    metrics, _ = run_drills_from_config(cfg)
    if not metrics["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
