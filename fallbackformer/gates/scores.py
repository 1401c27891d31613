"""Confidence scores: pure functions from logits ``[B, C]`` to a score ``[B]``.

Every score is "higher = more confident" and is computed in float32 (or float64 when the
logits are float64) from the logits it is given; temperature scaling happens before, in the gate.
A row with any non-finite logit gets the score NaN, which no gate accepts.

>>> import torch
>>> max_softmax(torch.tensor([[2.0, 0.0, 0.0]])).round(decimals=3)
tensor([0.7870])
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "SCORES",
    "compute_score",
    "is_tracing",
    "margin",
    "max_softmax",
    "max_softmax_fused",
    "neg_entropy",
    "patience",
    "score_range",
    "sorted_softmax_features",
]


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(
            f"scores expect logits of shape [B, C], got shape {tuple(logits.shape)}; "
            "flatten the batch dimensions first (logits.reshape(-1, C))."
        )
    if logits.shape[1] < 2:
        raise ValueError(f"scores need at least 2 classes, got C={logits.shape[1]}.")


def _probs(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax probabilities with non-finite rows replaced by a safe value, and the finite mask."""
    _check_logits(logits)
    x = logits if logits.dtype == torch.float64 else logits.float()  # [B, C]
    finite = torch.isfinite(x).all(dim=1)  # [B]
    x = torch.where(finite[:, None], x, torch.zeros_like(x))
    return torch.softmax(x, dim=1), finite


def is_tracing() -> bool:
    """Under torch.compile / torch.export (the ONNX exporter) or torch.jit tracing."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def max_softmax(logits: Tensor) -> Tensor:
    """Largest softmax probability, in ``[1/C, 1]``; NaN where a logit is not finite."""
    _check_logits(logits)
    x = logits if logits.dtype == torch.float64 else logits.float()  # [B, C]
    if is_tracing():  # a graph: explicit masks, whatever the backend's NaN rules for reductions
        p, finite = _probs(x)  # [B, C], [B]
        s = p.max(dim=1).values  # [B]
        return torch.where(finite, s, torch.full_like(s, float("nan")))
    return max_softmax_fused(x)


def max_softmax_fused(x: Tensor) -> Tensor:
    """:func:`max_softmax` on eager float logits ``[B, C]`` in three kernels (the gate's hot path; a
    graph being traced keeps the masked form of :func:`max_softmax`).

    Bit-identical to the masked form: a finite row's softmax is the same kernel on the same
    values; a row with NaN or +inf has a NaN softmax (``inf - inf``) and eager ``amax`` propagates
    NaN; a row whose only non-finite logits are -inf has a finite softmax, and adding
    ``0 * min(row)`` (``0 * -inf`` is NaN, ``0 * finite`` is 0 and ``conf + 0 == conf``) makes it NaN.
    """
    return torch.softmax(x, dim=1).amax(dim=1).add(x.amin(dim=1), alpha=0)  # [B]


def margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability, in ``[0, 1]``; NaN where a logit is not finite."""
    p, finite = _probs(logits)  # [B, C]
    top2 = p.topk(2, dim=1).values  # [B, 2]
    s = top2[:, 0] - top2[:, 1]  # [B]
    return torch.where(finite, s, torch.full_like(s, float("nan")))


def neg_entropy(logits: Tensor) -> Tensor:
    """Negative Shannon entropy (nats) of the softmax, in ``[-log C, 0]``; NaN where not finite."""
    p, finite = _probs(logits)  # [B, C]
    logp = torch.log_softmax(
        torch.where(finite[:, None], logits.to(p.dtype), torch.zeros_like(p)), dim=1
    )
    s = (p * logp).sum(dim=1)  # [B]  (p*log p -> 0 where p underflows to 0)
    s = s.clamp(max=0.0)
    return torch.where(finite, s, torch.full_like(s, float("nan")))


def sorted_softmax_features(logits: Tensor, k: int = 4) -> Tensor:
    """Features for a learned gate: the ``k`` largest softmax probabilities and the negative entropy.

    Args:
        logits: ``[B, C]``.
        k: how many sorted probabilities to keep (clipped to C).

    Returns:
        ``[B, min(k, C) + 1]``; rows with a non-finite logit are NaN.
    """
    p, finite = _probs(logits)  # [B, C]
    k = min(k, p.shape[1])
    top = p.topk(k, dim=1).values  # [B, k]
    ent = neg_entropy(logits).to(p.dtype)[:, None]  # [B, 1]
    f = torch.cat([top, ent], dim=1)  # [B, k+1]
    return torch.where(finite[:, None], f, torch.full_like(f, float("nan")))


SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "max_softmax": max_softmax,
    "margin": margin,
    "neg_entropy": neg_entropy,
}


def compute_score(name: str, logits: Tensor) -> Tensor:
    """Apply the score called ``name`` to ``logits`` ``[B, C]`` -> ``[B]``."""
    try:
        fn = SCORES[name]
    except KeyError:
        raise ValueError(
            f"unknown score {name!r}; choose one of {sorted(SCORES)} (or 'learned' on a gate "
            "calibrated with score='learned')."
        ) from None
    return fn(logits)


def score_range(name: str, num_classes: int) -> tuple[float, float]:
    """The closed interval a score can take for ``num_classes`` classes."""
    import math

    if name in ("max_softmax",):
        return 1.0 / num_classes, 1.0
    if name in ("margin", "learned"):
        return 0.0, 1.0
    if name == "neg_entropy":
        return -math.log(num_classes), 0.0
    raise ValueError(f"unknown score {name!r}; choose one of {sorted(SCORES) + ['learned']}.")


def patience(exit_logits: "list[Tensor] | tuple[Tensor, ...]", k: int) -> list[Tensor]:
    """Patience rule for early exits (PABEE, Zhou et al. 2020): stop once the argmax is stable.

    Exit ``i`` (0-based) fires for a sample when its argmax equals the argmax of the ``k``
    exits before it (``i-k .. i`` all agree), i.e. the prediction has stayed unchanged for ``k``
    consecutive exits. The first ``k`` exits never fire; a row with a non-finite logit at any
    of the exits involved never fires. The caller serves a sample at its first firing exit.

    Args:
        exit_logits: ``[B, C]`` logits per exit, in order.
        k: patience (``>= 1``).

    Returns:
        One BoolTensor ``[B]`` per exit.

    >>> import torch
    >>> a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    >>> [t.item() for t in patience([a, a, b, b, b], k=2)]
    [False, False, False, False, True]
    """
    if k < 1:
        raise ValueError(f"patience k must be >= 1, got {k}.")
    if len(exit_logits) == 0:
        return []
    for i, z in enumerate(exit_logits):
        _check_logits(z)
        if z.shape != exit_logits[0].shape:
            raise ValueError(
                f"exit {i} logits have shape {tuple(z.shape)}, exit 0 has {tuple(exit_logits[0].shape)}."
            )
    preds = [z.argmax(dim=1) for z in exit_logits]  # [B] each
    finite = [torch.isfinite(z).all(dim=1) for z in exit_logits]
    out = []
    b = exit_logits[0].shape[0]
    dev = exit_logits[0].device
    run = torch.zeros(b, dtype=torch.long, device=dev)  # consecutive agreements so far
    for i in range(len(exit_logits)):
        if i == 0:
            run = torch.where(finite[0], torch.zeros_like(run), torch.full_like(run, -(10**9)))
        else:
            same = (preds[i] == preds[i - 1]) & finite[i]
            run = torch.where(same, run + 1, torch.where(finite[i], torch.zeros_like(run), torch.full_like(run, -(10**9))))
        out.append(run >= k)
    return out
