"""Save the bundle and the ONNX file: python scripts/export.py primary_dir=.. student_dir=.. calibration=DIR/gates.json"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="stages")
def main(cfg: DictConfig) -> None:
    from fallbackformer.training.pipeline import export

    metrics, _ = export(cfg)
    print(metrics)


if __name__ == "__main__":
    main()
