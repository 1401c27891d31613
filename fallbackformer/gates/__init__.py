"""fallbackformer.gates: confidence scores, temperature scaling, risk-controlled thresholds.

Importable with torch, numpy and safetensors only.
"""

from fallbackformer.gates.gate import METHODS, ConfidenceGate
from fallbackformer.gates.scores import SCORES, compute_score, margin, max_softmax, neg_entropy
from fallbackformer.gates.temperature import fit_temperature

__all__ = [
    "METHODS",
    "SCORES",
    "ConfidenceGate",
    "compute_score",
    "fit_temperature",
    "margin",
    "max_softmax",
    "neg_entropy",
]
