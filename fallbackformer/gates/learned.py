"""A small learned confidence score: P(correct) from sorted softmax features.

A logistic model (``hidden=0``) or a one-hidden-layer MLP on the ``k`` largest softmax
probabilities and the negative entropy of the (temperature-scaled) logits, trained with full-batch
L-BFGS on binary cross-entropy to predict whether the argmax is correct. Train it on a split
DISJOINT from the calibration split (e.g. validation): the thresholds are then chosen on
calibration data the score never saw, so the risk guarantees hold as for a fixed score.

The parameters are a handful of floats and travel in the gate's JSON config.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from fallbackformer.gates.scores import sorted_softmax_features

__all__ = ["LearnedScore"]


class LearnedScore(nn.Module):
    """``[B, C]`` (already temperature-scaled) logits -> ``[B]`` estimated probability of correctness.

    Args:
        k: number of sorted probabilities used as features (clipped to C at use).
        num_features: input width (``min(k, C) + 1``).
        hidden: hidden units (0 = logistic regression).
    """

    def __init__(self, k: int = 4, num_features: int = 5, hidden: int = 8) -> None:
        super().__init__()
        self.k = k
        self.hidden = hidden
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Linear(num_features, 1)
        # feature standardisation fitted on the training split
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, logits: Tensor) -> Tensor:
        f = sorted_softmax_features(logits, self.k)  # [B, F], NaN rows for non-finite logits
        if f.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"learned score was trained on {self.mean.shape[0]} features, got {f.shape[1]} "
                f"(C={logits.shape[1]}); recalibrate the gate for this number of classes."
            )
        f = (f.to(self.mean.dtype) - self.mean) / self.std
        out = torch.sigmoid(self.net(torch.nan_to_num(f)).squeeze(1))  # [B]
        nan_rows = torch.isnan(f).any(dim=1)
        return torch.where(nan_rows, torch.full_like(out, float("nan")), out)

    @classmethod
    def fit(
        cls,
        logits: Tensor,
        labels: Tensor,
        k: int = 4,
        hidden: int = 8,
        weight_decay: float = 1e-3,
        max_iter: int = 100,
        seed: int = 0,
    ) -> "LearnedScore":
        """Train on ``(logits, labels)`` of a split disjoint from calibration.

        Args:
            logits: ``[N, C]`` temperature-scaled logits.
            labels: ``[N]``.
            k: sorted probabilities used as features.
            hidden: hidden units (0 = logistic regression).
            weight_decay: L2 penalty on the weights.
            max_iter: L-BFGS iterations.
            seed: initialisation seed (the fit is deterministic).
        """
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"need logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}.")
        logits = logits.detach().float()
        f = sorted_softmax_features(logits, k)  # [N, F]
        keep = ~torch.isnan(f).any(dim=1)
        f = f[keep]
        target = (logits[keep].argmax(1) == labels[keep].long()).float()  # [N]
        if f.shape[0] < 10:
            raise ValueError(f"the learned score needs at least 10 finite training rows, got {f.shape[0]}.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(k=k, num_features=f.shape[1], hidden=hidden)
        model.mean.copy_(f.mean(0))
        model.std.copy_(f.std(0).clamp(min=1e-6))
        x = (f - model.mean) / model.std
        params = list(model.net.parameters())
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model.net(x).squeeze(1), target)
            loss = loss + weight_decay * sum((p**2).sum() for n_, p in model.net.named_parameters() if "weight" in n_)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def to_config(self) -> dict[str, Any]:
        """JSON-able parameters (a few dozen floats)."""
        return {
            "k": self.k,
            "hidden": self.hidden,
            "num_features": int(self.mean.shape[0]),
            "state": {name: t.detach().tolist() for name, t in self.state_dict().items()},
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LearnedScore":
        model = cls(k=int(config["k"]), num_features=int(config["num_features"]), hidden=int(config["hidden"]))
        state = {name: torch.tensor(v, dtype=torch.float32) for name, v in config["state"].items()}
        model.load_state_dict(state)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model
