"""``augment=augmix`` composes into the main job and builds what the training modules take."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fallbackformer.data.augment import AugMix
from fallbackformer.data.shift import HELD_OUT, TUNING_CORRUPTIONS
from fallbackformer.training.pipeline import build_augmentation

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


def test_augmix_composes_and_reaches_the_modules():
    cfg = _compose(["augment=augmix", "seed=5"])
    aug = build_augmentation(cfg)
    assert isinstance(aug, AugMix)
    assert aug.config.seed == 5 and aug.config.width == 3 and aug.lambda_jsd == cfg.augment.config.lambda_jsd
    assert set(aug.operations) == set(TUNING_CORRUPTIONS) and not set(aug.operations) & HELD_OUT


def test_the_default_is_augmix_and_none_turns_it_off():
    cfg = _compose([])
    assert cfg.augment._target_ == "fallbackformer.data.augment.AugMix"  # chosen on the validation split
    off = _compose(["augment=none"])
    assert off.augment._target_ == "fallbackformer.data.augment.NoAugmentation"
    assert build_augmentation(off) is None


def test_augmix_views_is_augmix_plus_the_loss_on_the_views():
    plain, views = build_augmentation(_compose(["augment=augmix"])), build_augmentation(_compose(["augment=augmix_views"]))
    assert plain.lambda_views == 0.0 and views.lambda_views == 1.0  # the default recipe keeps the views out of the CE
    assert {**vars(views.config), "lambda_views": 0.0} == vars(plain.config)
