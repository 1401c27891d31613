"""fallbackformer.gates: confidence scores, temperature scaling, risk-controlled thresholds.

Importable with torch, numpy and safetensors only (no lightning, hydra, sklearn, matplotlib,
scipy or torchmetrics).
"""

from fallbackformer.gates.drift import InputRangeCheck, ScoreDriftMonitor
from fallbackformer.gates.gate import METHODS, ConfidenceGate
from fallbackformer.gates.guarantee import Guarantee
from fallbackformer.gates.learned import LearnedScore
from fallbackformer.gates.pvalues import binom_pvalue, hb_pvalue, ltt_pvalues, min_accepted
from fallbackformer.gates.risk_control import threshold_grid
from fallbackformer.gates.scores import (
    SCORES,
    compute_score,
    margin,
    max_softmax,
    neg_entropy,
    patience,
)
from fallbackformer.gates.system import calibrate_system
from fallbackformer.gates.temperature import brier, fit_temperature, nll

__all__ = [
    "METHODS",
    "SCORES",
    "ConfidenceGate",
    "Guarantee",
    "InputRangeCheck",
    "LearnedScore",
    "ScoreDriftMonitor",
    "binom_pvalue",
    "brier",
    "calibrate_system",
    "compute_score",
    "fit_temperature",
    "hb_pvalue",
    "ltt_pvalues",
    "margin",
    "max_softmax",
    "min_accepted",
    "neg_entropy",
    "nll",
    "patience",
    "threshold_grid",
]
