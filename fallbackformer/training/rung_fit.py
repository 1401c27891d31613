"""Fit the classical fallback rungs on the primary's answers with scikit-learn, and turn them into tensors.

The rungs imitate the primary (as the student does), not the labels: a linear model fitted on the
primary's soft labels (its softmax on the training split; the soft cross-entropy is fitted exactly by
giving each sample once per class, weighted by the primary's probability of that class), and trees
fitted on the primary's hard labels (the argmax of its soft labels: scikit-learn's trees take class
labels only). Both read the flattened raw input through the same feature transform as the student
(:func:`~fallbackformer.models.classical.transform_spec_of`); trees are invariant to it.

The fitted estimators are converted to registered torch models (:mod:`fallbackformer.models.classical`)
whose decisions equal scikit-learn's own ``predict``; every fit checks this on the training split
before it returns. scikit-learn is needed here only: inference runs the tensors.

>>> fit = fit_tree_rung(primary, x_train, kind="gradient_boosting", n_estimators=30)    # doctest: +SKIP
>>> fit.module(x_test).argmax(1)                                                         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from fallbackformer.models.classical import MISSING_CLASS_LOGIT, FlatFeatures, LinearRung, TreeEnsemble
from fallbackformer.models.registry import create_model
from fallbackformer.models.transforms import fit_input_transforms

__all__ = ["RungFit", "TREE_KINDS", "fit_linear_rung", "fit_tree_rung", "linear_from_sklearn",
           "primary_soft_labels", "tree_from_sklearn"]

TREE_KINDS = ("decision_tree", "random_forest", "gradient_boosting")
SOFT_LABEL_MIN = 1e-4  # a class with less probability under the primary adds no weighted copy of the sample


class RungFit(NamedTuple):
    """A fitted rung: the torch model that serves, and the scikit-learn estimator it was converted from."""

    module: nn.Module
    estimator: Any


@torch.no_grad()
def primary_soft_labels(primary: nn.Module, x: Tensor, temperature: float = 1.0, batch_size: int = 512) -> Tensor:
    """The primary's final-exit softmax at ``temperature`` on ``x``, float64 ``[N, C]``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    primary.eval()
    outs = [primary(xb) for xb in x.split(batch_size)]
    logits = torch.cat([o[-1] if isinstance(o, (list, tuple)) else o for o in outs])  # [N, C]
    return torch.softmax(logits.double() / temperature, dim=1)


def _features(x: Tensor, soft: Tensor, transform: Mapping[str, Any] | None) -> tuple[FlatFeatures, np.ndarray]:
    """The rung's front fitted on ``x`` (data-fitted constants), and the features it reads, float32 ``[N, D]``."""
    front = FlatFeatures(int(np.prod(x.shape[1:])), transform)
    fit_input_transforms(front, x, soft.argmax(1))
    with torch.no_grad():
        return front, front.features(x).numpy()


def fit_linear_rung(primary: nn.Module, x_train: Tensor, *, transform: Mapping[str, Any] | None = None,
                    labels: str = "soft", temperature: float = 1.0, C: float = 1.0, max_iter: int = 1000) -> RungFit:
    """Fit a multinomial logistic regression on the primary's labels; return it as a :class:`LinearRung`.

    Args:
        primary: the trained primary (its final exit labels the training split).
        x_train: raw training inputs ``[N, ...]``.
        transform: the feature transform spec (the student's: ``transform_spec_of(student.input_transform)``).
        labels: ``"soft"`` (the primary's probabilities) or ``"hard"`` (their argmax).
        temperature: softens the primary's probabilities for ``"soft"``.
        C: inverse L2 strength (scikit-learn's ``C``).
        max_iter: lbfgs iterations.
    """
    from sklearn.linear_model import LogisticRegression

    if labels not in ("soft", "hard"):
        raise ValueError(f"labels={labels!r}; use 'soft' or 'hard'")
    soft = primary_soft_labels(primary, x_train, temperature)
    front, z = _features(x_train, soft, transform)
    if labels == "soft":
        rows, cls = torch.nonzero(soft >= SOFT_LABEL_MIN, as_tuple=True)
        z_fit, y_fit, w_fit = z[rows.numpy()], cls.numpy(), soft[rows, cls].numpy()
    else:
        z_fit, y_fit, w_fit = z, soft.argmax(1).numpy(), None
    est = LogisticRegression(C=C, max_iter=max_iter).fit(z_fit, y_fit, sample_weight=w_fit)
    module = linear_from_sklearn(est, front, soft.shape[1], transform)
    _check_agreement(module, est, x_train, z)
    return RungFit(module, est)


def fit_tree_rung(primary: nn.Module, x_train: Tensor, *, kind: str = "gradient_boosting",
                  transform: Mapping[str, Any] | None = None, max_depth: int = 3, n_estimators: int = 30,
                  learning_rate: float = 0.1, min_samples_leaf: int = 1, floor: float = 1e-3,
                  seed: int = 0) -> RungFit:
    """Fit trees on the primary's hard labels; return them as a :class:`TreeEnsemble`.

    Args:
        primary: the trained primary.
        x_train: raw training inputs ``[N, ...]``.
        kind: ``"decision_tree"``, ``"random_forest"`` or ``"gradient_boosting"``.
        transform: the feature transform spec (trees are invariant to it; kept for a common front).
        max_depth: depth of every tree.
        n_estimators: trees (forest) or boosting stages (gradient boosting); unused for one tree.
        learning_rate: gradient boosting's shrinkage.
        min_samples_leaf: the smallest leaf.
        floor: the smallest probability a tree or forest takes the log of (its logits).
        seed: scikit-learn's ``random_state``.
    """
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier

    builders = {
        "decision_tree": lambda: DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=min_samples_leaf,
                                                        random_state=seed),
        "random_forest": lambda: RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                                        min_samples_leaf=min_samples_leaf, random_state=seed),
        "gradient_boosting": lambda: GradientBoostingClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                                                learning_rate=learning_rate,
                                                                min_samples_leaf=min_samples_leaf, random_state=seed),
    }
    if kind not in builders:
        raise ValueError(f"kind={kind!r}; use one of {TREE_KINDS}")
    soft = primary_soft_labels(primary, x_train)
    front, z = _features(x_train, soft, transform)
    est = builders[kind]().fit(z, soft.argmax(1).numpy())
    module = tree_from_sklearn(est, front, soft.shape[1], transform, floor=floor)
    _check_agreement(module, est, x_train, z)
    return RungFit(module, est)


def _classes(est: Any, num_classes: int) -> np.ndarray:
    classes = np.asarray(est.classes_)
    if classes.dtype.kind not in "iu" or classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(f"the estimator's classes {classes.tolist()} are not class indices in [0, {num_classes}); "
                         "fit it on integer labels 0..C-1")
    return classes.astype(np.int64)


def linear_from_sklearn(est: Any, front: FlatFeatures, num_classes: int,
                        transform: Mapping[str, Any] | None = None) -> LinearRung:
    """A fitted ``LogisticRegression`` as a registered :class:`LinearRung` (front: its fitted transform)."""
    classes = _classes(est, num_classes)
    coef, intercept = np.asarray(est.coef_, np.float64), np.asarray(est.intercept_, np.float64)
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, MISSING_CLASS_LOGIT)
    if coef.shape[0] == 1:  # binary: scikit-learn's score is the second class's logit against the first's 0
        bias[classes[0]] = 0.0
        weight[classes[1]], bias[classes[1]] = coef[0], intercept[0]
    else:
        weight[classes], bias[classes] = coef, intercept
    module = create_model("linear_rung", num_features=front.num_features, num_classes=num_classes,
                          transform=_spec(transform))
    module.input_transform.load_state_dict(front.input_transform.state_dict())
    with torch.no_grad():
        module.linear.weight.copy_(torch.from_numpy(weight))
        module.linear.bias.copy_(torch.from_numpy(bias))
    return module.eval()


def tree_from_sklearn(est: Any, front: FlatFeatures, num_classes: int, transform: Mapping[str, Any] | None = None,
                      *, floor: float = 1e-3) -> TreeEnsemble:
    """A fitted decision tree, random forest or gradient boosting classifier as a :class:`TreeEnsemble`."""
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier

    classes = _classes(est, num_classes)
    bias = np.zeros(num_classes)
    if isinstance(est, GradientBoostingClassifier):
        trees = [t.tree_ for t in est.estimators_.ravel()]  # stage by stage, one tree per class column
        per_step = est.estimators_.shape[1]
        columns = [classes[1]] if per_step == 1 else list(classes)
        init = est._raw_predict_init(np.zeros((1, front.num_features), np.float32))[0]  # [K]
        bias[:] = MISSING_CLASS_LOGIT
        if per_step == 1:
            bias[classes[0]] = 0.0
        bias[columns] = init
        leaf_values = [_column_value(est.learning_rate * t.value[:, 0, 0], columns[i % per_step], num_classes)
                       for i, t in enumerate(trees)]
        output = "sum"
    elif isinstance(est, (RandomForestClassifier, DecisionTreeClassifier)):
        trees = [e.tree_ for e in est.estimators_] if isinstance(est, RandomForestClassifier) else [est.tree_]
        per_step, output = 1, "mean_proba"
        leaf_values = []
        for t in trees:
            value = np.zeros((t.node_count, num_classes))
            proba = t.value[:, 0, :]
            norm = proba.sum(axis=1, keepdims=True)
            value[:, classes] = proba / np.where(norm == 0, 1.0, norm)  # as predict_proba normalises
            leaf_values.append(value)
    else:
        raise TypeError(f"cannot convert a {type(est).__name__}; fit a DecisionTreeClassifier, "
                        "RandomForestClassifier or GradientBoostingClassifier")
    nodes = max(t.node_count for t in trees)
    module = create_model("tree_rung", num_features=front.num_features, num_classes=num_classes,
                          num_trees=len(trees), num_nodes=nodes, depth=max(t.max_depth for t in trees),
                          trees_per_step=per_step, output=output, floor=floor, transform=_spec(transform))
    module.input_transform.load_state_dict(front.input_transform.state_dict())
    _fill_tables(module, trees, leaf_values, bias)
    return module.eval()


def _column_value(leaf: np.ndarray, column: int, num_classes: int) -> np.ndarray:
    value = np.zeros((leaf.shape[0], num_classes))
    value[:, column] = leaf
    return value


@torch.no_grad()
def _fill_tables(module: TreeEnsemble, trees: list[Any], leaf_values: list[np.ndarray], bias: np.ndarray) -> None:
    n = module.num_nodes
    for t, (tree, value) in enumerate(zip(trees, leaf_values)):
        base, count = t * n, tree.node_count
        own = np.arange(base, base + count)
        is_leaf = tree.children_left < 0
        module.feature[base:base + count] = torch.from_numpy(np.where(is_leaf, 0, tree.feature).astype(np.int64))
        module.threshold[base:base + count] = torch.from_numpy(np.where(is_leaf, 0.0, tree.threshold))
        module.left[base:base + count] = torch.from_numpy(np.where(is_leaf, own, base + tree.children_left))
        module.right[base:base + count] = torch.from_numpy(np.where(is_leaf, own, base + tree.children_right))
        module.value[base:base + count] = torch.from_numpy(value)
    module.bias.copy_(torch.from_numpy(bias))


def _spec(transform: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if transform is None else dict(transform)


@torch.no_grad()
def _check_agreement(module: nn.Module, est: Any, x: Tensor, z: np.ndarray) -> None:
    ours = module(x).argmax(1).numpy()
    theirs = est.predict(z)
    bad = int((ours != theirs).sum())
    if bad:
        raise RuntimeError(f"the converted {type(est).__name__} disagrees with scikit-learn's predict on {bad} of "
                           f"{len(theirs)} training samples; the conversion does not support this estimator's "
                           "settings (scikit-learn version or options), so it cannot serve")
