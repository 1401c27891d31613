"""The fallback ladder's rungs beside the primary and the student: model rungs (:class:`Rung`), the
response cache, typed safe defaults, and saving one rung on its own.

The classical models themselves (a linear model, tree ensembles as tensors) are registered models in
:mod:`fallbackformer.models.classical`; they are fitted by :mod:`fallbackformer.training.rung_fit`.
Everything here needs torch, safetensors and numpy only.
"""

from fallbackformer.rungs.cache import CacheConfig, CacheLookup, ResponseCache, input_keys
from fallbackformer.rungs.defaults import (
    Abstain,
    CallableDefault,
    Coarse,
    ConstantClass,
    DefaultAnswer,
    Prior,
    SafeDefault,
    default_from_dict,
    default_from_policy,
    list_default_actions,
    register_default_action,
)
from fallbackformer.rungs.io import load_rung, save_rung
from fallbackformer.rungs.ladder import CACHE, Rung, RungDecision, check_ladder

__all__ = [
    "Abstain",
    "CACHE",
    "CacheConfig",
    "CacheLookup",
    "CallableDefault",
    "Coarse",
    "ConstantClass",
    "DefaultAnswer",
    "Prior",
    "ResponseCache",
    "Rung",
    "RungDecision",
    "SafeDefault",
    "check_ladder",
    "default_from_dict",
    "default_from_policy",
    "input_keys",
    "list_default_actions",
    "load_rung",
    "register_default_action",
    "save_rung",
]
