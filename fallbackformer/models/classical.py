"""Classical fallback models as tensors: a linear model and tree ensembles, raw input -> logits.

They are fitted elsewhere (scikit-learn, in :mod:`fallbackformer.training.rung_fit`) and run here with
torch alone, so they live in a bundle like any registered model (registry name + JSON arguments,
weights in safetensors) and export to ONNX. Both read the raw input ``[B, ...]`` as the student does,
flatten it, apply a feature transform that is part of the model (:func:`build_feature_transform`),
and compute in float64, as scikit-learn does, so that their decisions equal scikit-learn's own.

* :class:`LinearRung`: ``logits = W z + b`` (multinomial logistic regression).
* :class:`TreeEnsemble`: a gather-based traversal of every tree at once (``depth`` steps of "read the
  node's feature, compare with its threshold, move to a child"; leaves point to themselves), then the
  leaves' values are added tree by tree in scikit-learn's order. ``output="sum"`` gives raw scores
  (gradient boosting: softmax of them is ``predict_proba``); ``output="mean_proba"`` averages leaf
  class probabilities (a tree or a forest) and returns their log, floored at ``floor``, so a
  :class:`~fallbackformer.gates.gate.ConfidenceGate` reads them like any logits.

A row with a non-finite feature gets NaN logits, which no gate accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fallbackformer.models.registry import register_model
from fallbackformer.models.transforms import ScaleShift, Standardize

__all__ = [
    "FlatFeatures",
    "LinearRung",
    "MISSING_CLASS_LOGIT",
    "TRANSFORM_KINDS",
    "TreeEnsemble",
    "build_feature_transform",
    "transform_spec_of",
]

TRANSFORM_KINDS = ("identity", "scale_shift", "standardize")
TREE_OUTPUTS = ("sum", "mean_proba")
MISSING_CLASS_LOGIT = -1.0e4
"""The logit of a class the fitted model never saw (finite: a gate turns non-finite rows into NaN)."""


def build_feature_transform(spec: Mapping[str, Any] | None, num_features: int) -> nn.Module:
    """The transform a classical rung applies to the flattened raw input ``[B, D]``.

    Args:
        spec: ``None`` or ``{"kind": "identity"}``; ``{"kind": "scale_shift", "scale", "mean",
            "std"}`` (the digits student's transform); ``{"kind": "standardize"}`` (per-feature
            constants, buffers fitted on training data by ``fit_from_data``).
        num_features: ``D``.
    """
    spec = dict(spec or {"kind": "identity"})
    kind = spec.pop("kind", None)
    if kind == "identity" and not spec:
        return nn.Identity()
    if kind == "scale_shift" and set(spec) <= {"scale", "mean", "std"}:
        return ScaleShift(**{k: float(v) for k, v in spec.items()})
    if kind == "standardize" and not spec:
        return Standardize(num_features)
    raise ValueError(f"feature transform {dict(spec, kind=kind)!r} is not understood; use kind one of "
                     f"{TRANSFORM_KINDS} ('scale_shift' takes scale, mean, std; the others take nothing)")


def transform_spec_of(module: nn.Module | None) -> dict[str, Any]:
    """The spec of a student's input transform, for a classical rung that reads the input the same way.

    Accepts ``None``/``nn.Identity``, a :class:`ScaleShift`, a :class:`Standardize` (the rung refits
    its constants on the same training data), or an ``nn.Sequential`` of one of them and ``nn.Flatten``.

    Raises:
        ValueError: for any other transform (for example one that selects features), naming it.
    """
    parts = [m for m in (module if isinstance(module, nn.Sequential) else [module])
             if m is not None and not isinstance(m, (nn.Identity, nn.Flatten))]
    if not parts:
        return {"kind": "identity"}
    if len(parts) == 1 and isinstance(parts[0], ScaleShift):
        t = parts[0]
        return {"kind": "scale_shift", "scale": t.scale, "mean": t.mean, "std": t.std}
    if len(parts) == 1 and isinstance(parts[0], Standardize):
        return {"kind": "standardize"}
    raise ValueError(f"a classical rung cannot reproduce the transform {module!r}; pass a transform spec "
                     f"instead, e.g. {{'kind': 'standardize'}} (kinds: {TRANSFORM_KINDS})")


class FlatFeatures(nn.Module):
    """Flatten the raw input to ``[B, D]`` float32 and apply the feature transform (the rungs' front).

    Args:
        num_features: ``D``, input size after flattening.
        transform: the feature transform spec (:func:`build_feature_transform`).
    """

    def __init__(self, num_features: int, transform: Mapping[str, Any] | None) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = int(num_features)
        self.input_transform = build_feature_transform(transform, num_features)

    def features(self, x: Tensor) -> Tensor:
        """What the fitted model reads: the flattened, transformed raw input, float32 ``[B, D]``."""
        flat = x.reshape(x.shape[0], -1).to(torch.float32)  # [B, D]
        if flat.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__} reads {self.num_features} features per sample; "
                             f"got input {tuple(x.shape)} ({flat.shape[1]} after flattening)")
        return self.input_transform(flat)

    @staticmethod
    def _nan_rows(z: Tensor, logits: Tensor) -> Tensor:
        finite = torch.isfinite(z).all(dim=1, keepdim=True)  # [B, 1]
        return torch.where(finite, logits, torch.full_like(logits, float("nan")))


class LinearRung(FlatFeatures):
    """A linear model on the flattened raw input: ``logits = z W^T + b``, computed in float64.

    Args:
        num_features: ``D``, input size after flattening.
        num_classes: ``C``.
        transform: the feature transform spec (:func:`build_feature_transform`).
    """

    def __init__(self, num_features: int, num_classes: int, transform: Mapping[str, Any] | None = None) -> None:
        super().__init__(num_features, transform)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.linear = nn.Linear(num_features, num_classes, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:  # [B, ...] -> [B, C]
        z = self.features(x)  # [B, D]
        return self._nan_rows(z, self.linear(z.to(torch.float64)).to(torch.float32))


class TreeEnsemble(FlatFeatures):
    """Decision trees as tensors: every tree traversed at once by gathers, leaves summed in order.

    Nodes of tree ``t`` occupy rows ``t * num_nodes ... (t + 1) * num_nodes - 1`` of the node tables
    (padded); a leaf's children are itself, so ``depth`` steps end every path at a leaf.

    Args:
        num_features: ``D``, input size after flattening.
        num_classes: ``C``.
        num_trees: ``T``.
        num_nodes: nodes per tree (the largest tree's count; smaller trees are padded).
        depth: the deepest leaf's depth (traversal steps).
        trees_per_step: trees whose leaves are added in one step (gradient boosting: the trees of
            one stage, one per class, each adding to its own column, so the order of additions
            matches scikit-learn's bit for bit).
        output: ``"sum"`` (raw scores: ``bias + sum of leaf values``) or ``"mean_proba"`` (log of
            the mean leaf probability, floored at ``floor``).
        floor: the smallest probability ``"mean_proba"`` takes the log of.
        transform: the feature transform spec (:func:`build_feature_transform`).
    """

    feature: Tensor
    threshold: Tensor
    left: Tensor
    right: Tensor
    value: Tensor
    bias: Tensor

    def __init__(self, num_features: int, num_classes: int, num_trees: int, num_nodes: int, depth: int,
                 trees_per_step: int = 1, output: str = "mean_proba", floor: float = 1e-3,
                 transform: Mapping[str, Any] | None = None) -> None:
        super().__init__(num_features, transform)
        if output not in TREE_OUTPUTS:
            raise ValueError(f"output={output!r}; use one of {TREE_OUTPUTS}")
        if num_classes < 2 or num_trees < 1 or num_nodes < 1 or depth < 0:
            raise ValueError(f"need num_classes >= 2, num_trees >= 1, num_nodes >= 1, depth >= 0; got "
                             f"{num_classes}, {num_trees}, {num_nodes}, {depth}")
        if trees_per_step < 1 or num_trees % trees_per_step:
            raise ValueError(f"trees_per_step={trees_per_step} must divide num_trees={num_trees}")
        if not 0.0 < floor < 1.0:
            raise ValueError(f"floor={floor} must lie in (0, 1)")
        self.num_classes, self.num_trees, self.num_nodes = int(num_classes), int(num_trees), int(num_nodes)
        self.depth, self.trees_per_step, self.output, self.floor = int(depth), int(trees_per_step), output, float(floor)
        n = num_trees * num_nodes
        self.register_buffer("feature", torch.zeros(n, dtype=torch.long))  # [T*N] feature read at each node
        self.register_buffer("threshold", torch.zeros(n, dtype=torch.float64))  # [T*N] go left where z <= it
        self.register_buffer("left", torch.arange(n))  # [T*N] global index of the left child (leaf: itself)
        self.register_buffer("right", torch.arange(n))  # [T*N]
        self.register_buffer("value", torch.zeros(n, num_classes, dtype=torch.float64))  # [T*N, C] leaf values
        self.register_buffer("bias", torch.zeros(num_classes, dtype=torch.float64))  # [C] added first

    def leaves(self, x: Tensor) -> Tensor:
        """The global index of the leaf each sample reaches in each tree, ``[B, T]``."""
        return self._leaves(self.features(x).to(torch.float64))

    def _leaves(self, z: Tensor) -> Tensor:
        roots = torch.arange(self.num_trees, device=z.device) * self.num_nodes  # [T]
        node = roots.repeat(z.shape[0])  # [B*T], flat: index_select is far cheaper than advanced indexing
        for _ in range(self.depth):
            feature = self.feature.index_select(0, node).view(-1, self.num_trees)  # [B, T]
            go_left = z.gather(1, feature).flatten() <= self.threshold.index_select(0, node)  # [B*T]
            node = torch.where(go_left, self.left.index_select(0, node), self.right.index_select(0, node))
        return node.view(-1, self.num_trees)  # [B, T]

    def forward(self, x: Tensor) -> Tensor:  # [B, ...] -> [B, C]
        z = self.features(x)  # [B, D] float32
        zd = torch.nan_to_num(z.to(torch.float64))  # non-finite rows are masked below
        leaf_values = self.value.index_select(0, self._leaves(zd).flatten())  # [B*T, C]
        steps = leaf_values.view(z.shape[0], -1, self.trees_per_step, self.num_classes).sum(2)  # [B, S, C]
        acc = self.bias.expand(z.shape[0], -1)  # [B, C]
        for step in steps.unbind(1):  # in scikit-learn's order, so the sums agree bit for bit
            acc = acc + step
        if self.output == "mean_proba":
            acc = torch.log((acc / self.num_trees).clamp_min(self.floor))
        return self._nan_rows(z, acc.to(torch.float32))

    def extra_repr(self) -> str:
        return (f"trees={self.num_trees}, nodes={self.num_nodes}, depth={self.depth}, "
                f"output={self.output!r}, classes={self.num_classes}")


@register_model("linear_rung")
def linear_rung(num_features: int, num_classes: int, transform: dict[str, Any] | None = None) -> LinearRung:
    """A linear fallback rung (weights from :func:`fallbackformer.training.rung_fit.fit_linear_rung`)."""
    return LinearRung(num_features, num_classes, transform)


@register_model("tree_rung")
def tree_rung(num_features: int, num_classes: int, num_trees: int, num_nodes: int, depth: int,
              trees_per_step: int = 1, output: str = "mean_proba", floor: float = 1e-3,
              transform: dict[str, Any] | None = None) -> TreeEnsemble:
    """A tree-ensemble fallback rung (tables from :func:`fallbackformer.training.rung_fit.fit_tree_rung`)."""
    return TreeEnsemble(num_features, num_classes, num_trees, num_nodes, depth, trees_per_step, output, floor,
                        transform)
