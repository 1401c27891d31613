"""The gate's fused max-softmax path against the masked reference, bit for bit.

The serving hot path computes ``max_softmax`` in three kernels and the gate's decision with one
comparison (fallbackformer.gates.scores.max_softmax_fused, ConfidenceGate.forward); a graph being
traced (torch.compile, torch.export, the ONNX exporter) keeps the explicit masks. Both must agree
exactly, on finite rows and on rows with NaN, +inf, -inf or huge logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from fallbackformer.gates import scores
from fallbackformer.gates.gate import ConfidenceGate


def _masked_max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The reference: softmax of the rows made finite, max, NaN where a logit is not finite."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    finite = torch.isfinite(x).all(dim=1)
    s = torch.softmax(torch.where(finite[:, None], x, torch.zeros_like(x)), dim=1).max(dim=1).values
    return torch.where(finite, s, torch.full_like(s, float("nan")))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN where NaN."""
    return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))


def _logits(seed: int, b: int, c: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(b, c, generator=g) * (1 + 40 * torch.rand((), generator=g))).to(dtype)
    special = torch.tensor([math.nan, math.inf, -math.inf, 3e38, -3e38], dtype=dtype)
    mask = torch.rand(b, c, generator=g) < 0.08
    z[mask] = special[torch.randint(0, 5, (int(mask.sum()),), generator=g)]
    return z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_max_softmax_is_bit_identical_to_the_masked_form(dtype: torch.dtype) -> None:
    for seed in range(60):
        b, c = 1 + seed % 9 * 8, 2 + seed % 13
        z = _logits(seed, b, c, dtype)
        assert _same(scores.max_softmax(z), _masked_max_softmax(z)), seed
    rows = torch.tensor(
        [[-math.inf, -math.inf], [math.inf, math.inf], [math.inf, 0.0], [-math.inf, 0.0], [math.nan, 0.0], [0.0, 0.0]]
    )
    assert _same(scores.max_softmax(rows), torch.tensor([math.nan] * 5 + [0.5]))
    t = _logits(1, 16, 7).t().contiguous().t()  # a non-contiguous view
    assert _same(scores.max_softmax(t), _masked_max_softmax(t))


def test_traced_graphs_keep_the_masked_form(monkeypatch: pytest.MonkeyPatch) -> None:
    z = _logits(3, 32, 10)
    eager = scores.max_softmax(z)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as under torch.compile / torch.export
    assert scores.is_tracing()
    assert _same(scores.max_softmax(z), eager)
    gate = ConfidenceGate(temperature=1.3, threshold=0.5)  # the gate takes the masked path too
    accepted, conf = gate(z)
    assert _same(conf, _masked_max_softmax(z / gate.temperature))
    assert torch.equal(accepted, torch.isfinite(conf) & (conf >= 0.5))


@pytest.mark.parametrize("temperature", [0.37, 1.0, 2.5])
@pytest.mark.parametrize("threshold", [-math.inf, 0.3, 0.9, math.inf])
def test_gate_decision_equals_finite_and_above_threshold(temperature: float, threshold: float) -> None:
    gate = ConfidenceGate(temperature=temperature, threshold=threshold)
    for seed in range(10):
        z = _logits(100 + seed, 1 + 7 * seed, 10)
        accepted, conf = gate(z)
        reference = _masked_max_softmax(z.float() / gate.temperature)
        assert _same(conf, reference)
        assert torch.equal(accepted, torch.isfinite(reference) & (reference >= gate.threshold))
        assert torch.equal(gate.accept(z), accepted) and _same(gate.confidence(z), conf)


def test_other_dtypes_and_scores_take_the_general_path() -> None:
    z = _logits(7, 8, 5)
    gate = ConfidenceGate(temperature=1.5, threshold=0.4)
    acc16, conf16 = gate(z.half())  # half logits: cast to float first, as before
    assert conf16.dtype == torch.float32 and torch.equal(acc16, gate(z.half().float())[0])
    margin_gate = ConfidenceGate(temperature=1.5, threshold=0.2, score="margin")
    acc, conf = margin_gate(z)
    ref = scores.margin(z / margin_gate.temperature)
    assert _same(conf, ref) and torch.equal(acc, torch.isfinite(ref) & (ref >= 0.2))
    with pytest.raises(ValueError, match=r"logits \[B, C\]"):
        gate(torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        gate(torch.zeros(3, 1))


def test_a_subclass_score_keeps_the_finite_check() -> None:
    class Unbounded(ConfidenceGate):
        def confidence(self, logits: torch.Tensor) -> torch.Tensor:
            return torch.full((logits.shape[0],), math.inf)

    accepted, _ = Unbounded(threshold=math.inf)(torch.zeros(2, 3))
    assert not accepted.any()  # +inf >= +inf, but a gate whose threshold is +inf accepts nothing


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_decide_agrees_with_forward_and_predicts_the_argmax(temperature: float) -> None:
    """The runtime's one-reduction call: same acceptance and confidence, bit for bit, and the class
    is the logits' argmax wherever the confidence is finite (the only rows a path may serve; a
    finite logit that overflows once divided by T has none)."""
    gate = ConfidenceGate(temperature=temperature, threshold=0.6)
    for seed in range(60):
        z = _logits(seed, 1 + seed % 9 * 8, 2 + seed % 13)
        accept, conf = gate(z)
        d_accept, d_conf, prediction = gate.decide(z)
        assert torch.equal(accept, d_accept) and _same(conf, d_conf), seed
        finite = torch.isfinite(d_conf)
        assert torch.equal(prediction[finite], z.argmax(dim=1)[finite]), seed
        assert prediction.dtype == torch.long and prediction.shape == (z.shape[0],)


def test_decide_honours_a_subclass_forward_and_hooks() -> None:
    class Strict(ConfidenceGate):
        def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            accept, conf = super().forward(logits)
            return torch.zeros_like(accept), conf

    z = torch.tensor([[0.0, 9.0], [9.0, 0.0]])
    accept, _, prediction = Strict(threshold=0.5).decide(z)
    assert not accept.any() and prediction.tolist() == [1, 0]
    gate, seen = ConfidenceGate(threshold=0.5), []
    gate.register_forward_hook(lambda m, i, o: seen.append(o))
    assert gate.decide(z)[0].all() and len(seen) == 1
