"""Every config composes, every config node instantiates, and overrides work."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRIMARY_CONFIGS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())


def _compose(name: str, overrides: list[str] = ()) -> DictConfig:
    """Compose like a script run would, with Hydra's runtime set (so ${hydra:...} resolves)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _target_nodes(node, path=""):
    """Yield (path, node) for every mapping with a _target_, outermost first, not descending into them."""
    if isinstance(node, DictConfig):
        if path == "hydra":
            return
        if "_target_" in node:
            yield path, node
            return
        for key in node:
            yield from _target_nodes(node[key], f"{path}.{key}" if path else str(key))


def _instantiate_all(cfg: DictConfig) -> list[str]:
    done = []
    for path, node in _target_nodes(cfg):
        obj = instantiate(node)
        assert obj is not None, path
        done.append(path)
    return done


# Values a user must give on the command line (``???``), with a stand-in for this test.
REQUIRED = {"bundle": "checkpoints/digits", "current": "checkpoints/digits", "candidate": "checkpoints/digits"}


@pytest.mark.parametrize("name", PRIMARY_CONFIGS)
def test_primary_config_composes_and_instantiates(name):
    cfg = _compose(name)
    missing = sorted(k for k in cfg if k != "hydra" and OmegaConf.is_missing(cfg, k))
    assert set(missing) <= set(REQUIRED), f"{name}.yaml requires {missing}; add a stand-in to REQUIRED"
    cfg = _compose(name, [f"{k}={REQUIRED[k]}" for k in missing])
    done = _instantiate_all(cfg)
    assert done, f"{name}.yaml has no _target_ node"


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))],
)
def test_every_group_option_composes_into_run(group, option):
    base = "run" if (CONFIGS / "run.yaml").exists() else PRIMARY_CONFIGS[0]
    key = f"+{group}" if group == "experiment" else group
    override = f"{key}={option}" if group != "experiment" else f"experiment={option}"
    cfg = _compose(base, [override])
    _instantiate_all(cfg)


def test_overrides_reach_the_objects():
    cfg = _compose("run", ["policy.budget_ms=2", "trainer.max_epochs=1", "gate.alpha.primary=0.02"])
    policy = instantiate(cfg.policy)
    assert policy.budget_ms == 2.0
    assert cfg.trainer.max_epochs == 1 and cfg.gate.alpha.primary == 0.02
    module = instantiate(cfg.primary.module)
    assert isinstance(module, functools.partial)


def test_a_bad_override_names_the_field():
    cfg = _compose("run", ["policy.budget_ms=-1"])
    with pytest.raises(Exception, match="budget_ms"):
        instantiate(cfg.policy)


def test_the_main_job_builds_the_ladder_by_default_and_ladder_none_turns_it_off():
    """The main job's ladder: the router stays, two classical rungs, the veto on both, a cache and a coarse
    default; ladder=none (and the tabular experiment) compose the one-student system."""
    from fallbackformer.rungs import CacheConfig, Coarse
    from fallbackformer.training.ladder_step import LadderConfig

    cfg = _compose("run", [])
    ladder = instantiate(cfg.ladder, _convert_="all")
    assert isinstance(ladder, LadderConfig)
    assert [(r.name, r.kind) for r in ladder.rungs] == [("forest", "random_forest"), ("linear", "linear")]
    assert list(ladder.veto) == ["forest", "linear"] and cfg.router is not None
    assert ladder.veto_below == cfg.router.exit_floor == 0.9  # the level fixed a priori: the router's exit floor
    assert isinstance(ladder.cache, CacheConfig) and isinstance(ladder.default, Coarse)
    assert ladder.default.groups == {"loop": [0, 6, 8, 9], "straight": [1, 4, 7], "curve": [2, 3, 5]}
    assert cfg.degradation.on_breach == "refuse"
    assert not _compose("run", ["ladder=none"]).get("ladder")
    assert not _compose("run", ["experiment=breast_cancer"]).get("ladder")
    with pytest.raises(ValueError, match="not rungs"):
        LadderConfig(rungs=[{"name": "forest", "kind": "random_forest"}], veto=["tree"])
