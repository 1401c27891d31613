"""Evaluation metrics as pure functions (torchmetrics style: validate, then compute).

Every public function takes tensors and returns a Python ``float`` (or tensors for curves), so that
reports can store the numbers directly. A metric that is undefined on its input (the selective risk
when nothing is accepted, the accuracy of an empty set) returns ``nan`` rather than raising: a report
must be writable for any set, and ``nan`` is visible in it.

Definitions (exact):

* ``accuracy = mean(pred == target)``.
* ``coverage = mean(accepted)``.
* ``selective_risk = sum(~correct & accepted) / sum(accepted)``.
* Risk-coverage curve: sort by confidence, highest first; accepting the top ``k`` samples gives
  coverage ``k / N`` and selective risk ``errors(k) / k``.
* ``aurc = (1/N) * sum_{k=1..N} E[errors(k)] / k`` (Geifman et al., 2019). **Ties**: samples with equal
  confidence cannot be ordered by the score, so the expectation is over a uniformly random order inside
  each tied group. Within a group of ``m`` samples with ``e`` errors that starts after ``K0`` samples
  with ``E0`` errors, ``E[errors(K0 + j)] = E0 + j * e / m`` (the hypergeometric mean). Without ties this
  is the usual AURC; with ties it equals the average AURC over all tie-breaking orders.
* ``e_aurc = aurc - aurc_optimal``, where the optimal ranking puts every correct sample first.
* ``failure_auroc``: failure detection, the probability that a random correct sample has a higher
  confidence than a random wrong one, ties counted one half (the Mann-Whitney form of the ROC AUC with
  "correct" as the positive class); ``nan`` when every sample is correct or every sample is wrong.
* ``ece``: the project's one expected calibration error. 15 equal-width bins;
  ``sum_b |acc_b - conf_b| * n_b / N`` (torchmetrics' ``binary_calibration_error``; bin ``b`` holds
  confidences in ``[b/15, (b+1)/15)``, and a confidence of exactly 1.0 forms its own extra bin, which
  is torchmetrics' convention). ``binning="mass"``: the same sum over equal-mass bins (the sorted
  confidences cut into 15 consecutive groups of near-equal size; not in torchmetrics).
  ``ece_from_logits`` is torchmetrics' ``multiclass_calibration_error`` of ``softmax(logits / T)``.
* ``classwise_ece`` (Kull et al., 2019): the mean over classes ``c`` of the calibration error of
  ``p_c`` against ``1[y = c]``, equal-width bins ``(b/n, (b+1)/n]`` (the first also holds 0).
* ``mean_corruption_error`` (Hendrycks & Dietterich, 2019): ``CE_c = sum_s E_{c,s} / sum_s B_{c,s}``
  with a baseline's errors ``B``, or ``mean_s E_{c,s}`` without one; ``mCE = mean_c CE_c``.
* ``relative_drop = (acc_clean - mean_shift acc) / acc_clean``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "coverage",
    "selective_risk",
    "risk_coverage_curve",
    "aurc",
    "aurc_optimal",
    "e_aurc",
    "failure_auroc",
    "ece",
    "ece_from_logits",
    "classwise_ece",
    "calibration_bins",
    "corruption_errors",
    "mean_corruption_error",
    "relative_corruption_errors",
    "relative_drop",
    "risk_upper_bound",
    "risk_lower_bound",
    "ECE_BINS",
]

ECE_BINS = 15


# --------------------------------------------------------------------------------------------------
# validation


def _as_1d(name: str, t: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}; flatten it or pass one value per sample")
    return t.detach().to("cpu")


def _validate_bool(name: str, t: Tensor) -> Tensor:
    t = _as_1d(name, t)
    if t.dtype != torch.bool:
        if t.is_floating_point() or not torch.isin(t, torch.tensor([0, 1])).all():
            raise ValueError(f"{name} must be boolean (or 0/1 integers), got dtype {t.dtype}; pass e.g. pred == target")
        t = t.bool()
    return t


def _validate_confidence(confidence: Tensor, unit_interval: bool = False) -> Tensor:
    c = _as_1d("confidence", confidence)
    if not c.is_floating_point():
        raise ValueError(f"confidence must be floating point, got {c.dtype}")
    if torch.isnan(c).any():
        raise ValueError("confidence contains NaN; replace it (e.g. with -inf: never accepted) before ranking")
    if unit_interval and ((c < 0) | (c > 1)).any():
        raise ValueError(
            f"confidence must lie in [0, 1] for calibration metrics, got range [{c.min().item():.4g}, "
            f"{c.max().item():.4g}]; pass a probability (max softmax), not a raw score"
        )
    return c.double()


def _same_length(**tensors: Tensor) -> int:
    lengths = {k: int(v.shape[0]) for k, v in tensors.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return next(iter(lengths.values()))


# --------------------------------------------------------------------------------------------------
# accuracy, coverage, selective risk


def accuracy(preds: Tensor, target: Tensor) -> float:
    """Fraction of correct predictions.

    Args:
        preds: predicted classes ``[N]`` or logits/probabilities ``[N, C]`` (argmax is taken).
        target: true classes ``[N]``.

    Returns:
        ``mean(pred == target)``; ``nan`` when ``N == 0``.
    """
    if preds.dim() == 2:
        preds = preds.argmax(dim=1)
    p = _as_1d("preds", preds)
    t = _as_1d("target", target)
    n = _same_length(preds=p, target=t)
    return float((p == t).double().mean()) if n else math.nan


def coverage(accepted: Tensor) -> float:
    """Fraction of samples accepted; ``nan`` when empty."""
    a = _validate_bool("accepted", accepted)
    return float(a.double().mean()) if a.numel() else math.nan


def selective_risk(correct: Tensor, accepted: Tensor) -> float:
    """Error rate among the accepted samples; ``nan`` when nothing is accepted."""
    c = _validate_bool("correct", correct)
    a = _validate_bool("accepted", accepted)
    _same_length(correct=c, accepted=a)
    n = int(a.sum())
    return float((~c & a).sum()) / n if n else math.nan


def _clopper_pearson(k: int, n: int, delta: float, upper: bool) -> float:
    from scipy.stats import beta  # evaluation-only dependency (scikit-learn brings scipy)

    if n == 0:
        return math.nan
    if upper:
        return 1.0 if k >= n else float(beta.ppf(1 - delta, k + 1, n - k))
    return 0.0 if k <= 0 else float(beta.ppf(delta, k, n - k + 1))


def risk_upper_bound(errors: int, n: int, delta: float = 0.1) -> float:
    """One-sided Clopper-Pearson upper bound on a risk at confidence ``1 - delta``."""
    return _clopper_pearson(int(errors), int(n), float(delta), upper=True)


def risk_lower_bound(errors: int, n: int, delta: float = 0.1) -> float:
    """One-sided Clopper-Pearson lower bound on a risk at confidence ``1 - delta``.

    If it exceeds ``alpha``, the data show (at level ``delta``) that the true risk exceeds ``alpha``.
    """
    return _clopper_pearson(int(errors), int(n), float(delta), upper=False)


# --------------------------------------------------------------------------------------------------
# risk-coverage and AURC


def _sorted_groups(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort by confidence (desc) and group ties.

    Returns:
        group_conf [G] (descending), group_size [G], group_errors [G] (all float64).
    """
    c = _validate_confidence(confidence)
    ok = _validate_bool("correct", correct)
    _same_length(confidence=c, correct=ok)
    order = torch.argsort(c, descending=True, stable=True)
    cs = c[order]
    err = (~ok[order]).double()
    group_conf, inverse, counts = torch.unique_consecutive(cs, return_inverse=True, return_counts=True)
    group_err = torch.zeros(len(group_conf), dtype=torch.float64).index_add_(0, inverse, err)
    return group_conf, counts.double(), group_err


def risk_coverage_curve(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Selective risk against coverage, one point per distinct confidence threshold.

    The point for threshold ``t`` accepts every sample with ``confidence >= t`` (a whole tied group
    at once, which is how a gate behaves).

    Args:
        confidence: ``[N]``; higher means more likely correct. ``-inf`` is allowed (never accepted last).
        correct: ``[N]`` bool.

    Returns:
        coverage ``[G]`` (increasing), risk ``[G]``, thresholds ``[G]`` (decreasing); empty for ``N == 0``.
    """
    gconf, gsize, gerr = _sorted_groups(confidence, correct)
    k = gsize.cumsum(0)
    n = k[-1] if len(k) else torch.tensor(1.0, dtype=torch.float64)
    return k / n, gerr.cumsum(0) / k.clamp_min(1), gconf


def aurc(confidence: Tensor, correct: Tensor) -> float:
    """Area under the risk-coverage curve, ``(1/N) sum_k E[errors(k)] / k``, ties in expectation.

    See the module docstring for the exact definition. ``nan`` when ``N == 0``.

    >>> aurc(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([True, False, True]))  # (0/1 + 1/2 + 1/3) / 3
    0.2777777777777778
    """
    gconf, gsize, gerr = _sorted_groups(confidence, correct)
    n = int(gsize.sum()) if len(gsize) else 0
    if n == 0:
        return math.nan
    size_long = gsize.long()
    k0 = torch.cat([torch.zeros(1, dtype=torch.float64), gsize.cumsum(0)[:-1]])  # samples before each group
    e0 = torch.cat([torch.zeros(1, dtype=torch.float64), gerr.cumsum(0)[:-1]])  # errors before each group
    gid = torch.repeat_interleave(torch.arange(len(gsize)), size_long)  # [N]
    k = torch.arange(1, n + 1, dtype=torch.float64)  # [N]
    j = k - k0[gid]  # position inside the group, 1..m
    expected_errors = e0[gid] + j * gerr[gid] / gsize[gid]
    return float((expected_errors / k).sum() / n)


def aurc_optimal(correct: Tensor) -> float:
    """The AURC of a perfect ranking (every correct sample before every error)."""
    ok = _validate_bool("correct", correct)
    n = ok.numel()
    if n == 0:
        return math.nan
    n_ok = int(ok.sum())
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((k - n_ok).clamp_min(0) / k).sum() / n)


def e_aurc(confidence: Tensor, correct: Tensor) -> float:
    """Excess AURC: ``aurc - aurc_optimal`` (0 for a perfect ranking)."""
    return aurc(confidence, correct) - aurc_optimal(correct)


def failure_auroc(confidence: Tensor, correct: Tensor) -> float:
    """ROC AUC of ``confidence`` for telling correct answers (positive) from wrong ones; ties count 1/2.

    ``-inf`` is allowed (an unanswered request ranks last). ``nan`` when one class is empty.

    >>> failure_auroc(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([True, False, True]))  # 1 of 2 pairs
    0.5
    """
    _, gsize, gerr = _sorted_groups(confidence, correct)
    gok = gsize - gerr
    n_ok, n_err = float(gok.sum()), float(gerr.sum())
    if n_ok == 0 or n_err == 0:
        return math.nan
    ok_above = torch.cat([torch.zeros(1, dtype=torch.float64), gok.cumsum(0)[:-1]])  # correct in higher groups
    return float((gerr * (ok_above + 0.5 * gok)).sum() / (n_ok * n_err))


# --------------------------------------------------------------------------------------------------
# calibration


def ece(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS, binning: str = "width") -> float:
    """Expected calibration error of top-label confidences (see the module docstring).

    Args:
        confidence: probability of the predicted class ``[N]`` in ``[0, 1]``.
        correct: whether the prediction was right ``[N]``.
        n_bins: number of bins (15 by default).
        binning: ``"width"`` (equal-width bins: torchmetrics ``binary_calibration_error``) or
            ``"mass"`` (equal-mass bins).

    Returns:
        The L1 ECE; ``nan`` when ``N == 0``.
    """
    from torchmetrics.functional.classification import binary_calibration_error

    if binning not in ("width", "mass"):
        raise ValueError(f"binning must be 'width' or 'mass', got {binning!r}")
    c = _validate_confidence(confidence, unit_interval=True)
    ok = _validate_bool("correct", correct)
    n = _same_length(confidence=c, correct=ok)
    if n == 0:
        return math.nan
    if binning == "mass":
        return _equal_mass_ece(c, ok.double(), n_bins)
    return float(binary_calibration_error(c, ok.long(), n_bins=n_bins, norm="l1", validate_args=False))


def _equal_mass_ece(conf: Tensor, correct: Tensor, n_bins: int) -> float:
    m = conf.shape[0]
    idx = torch.empty(m, dtype=torch.long)
    idx[conf.argsort()] = torch.arange(m) * n_bins // m  # [M] consecutive groups of near-equal size
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones(m, dtype=torch.float64))
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    nz = count > 0
    gap = (sum_acc[nz] - sum_conf[nz]).abs() / count[nz]
    return float((gap * count[nz] / m).sum())


def ece_from_logits(logits: Tensor, target: Tensor, temperature: float = 1.0, n_bins: int = ECE_BINS) -> float:
    """ECE of ``softmax(logits / temperature)`` (torchmetrics ``multiclass_calibration_error``).

    Args:
        logits: ``[N, C]``.
        target: ``[N]`` classes.
        temperature: divides the logits first (a gate's fitted temperature).
        n_bins: equal-width bins.
    """
    from torchmetrics.functional.classification import multiclass_calibration_error

    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    t = _as_1d("target", target)
    n = _same_length(logits=logits, target=t)
    if n == 0:
        return math.nan
    probs = torch.softmax(logits.detach().to("cpu").double() / float(temperature), dim=1)
    return float(
        multiclass_calibration_error(probs, t.long(), num_classes=logits.shape[1], n_bins=n_bins, norm="l1")
    )


def classwise_ece(logits: Tensor, target: Tensor, n_bins: int = ECE_BINS) -> float:
    """Classwise ECE of ``softmax(logits)`` over the rows with finite logits (see the module docstring)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    t = _as_1d("target", target)
    _same_length(logits=logits, target=t)
    finite = torch.isfinite(logits).all(dim=1).cpu()
    if not finite.any():
        return math.nan
    p = torch.softmax(logits.detach().cpu()[finite].double(), dim=1)  # [M, C]
    m, c = p.shape
    onehot = torch.nn.functional.one_hot(t[finite].long(), c).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(p, edges[1:-1], right=False)  # [M, C]
    flat = (idx + n_bins * torch.arange(c)).flatten()  # a bin per (class, bin)
    sum_p = torch.zeros(c * n_bins, dtype=torch.float64).index_add_(0, flat, p.flatten())
    sum_y = torch.zeros(c * n_bins, dtype=torch.float64).index_add_(0, flat, onehot.flatten())
    per_class = ((sum_y - sum_p).abs() / m).reshape(c, n_bins).sum(dim=1)  # sum_b |B|/M |acc - conf|
    return float(per_class.mean())


def calibration_bins(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> dict[str, Tensor]:
    """Per-bin statistics for reliability diagrams.

    Bin ``b`` holds confidences in ``[b/n, (b+1)/n)``; the last bin is closed (it holds 1.0 too).

    Returns:
        ``{"lower", "upper", "confidence", "accuracy", "count"}``, each ``[n_bins]``; empty bins have
        ``nan`` confidence and accuracy.
    """
    c = _validate_confidence(confidence, unit_interval=True)
    ok = _validate_bool("correct", correct).double()
    _same_length(confidence=c, correct=ok)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(c, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(c))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, c)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, ok)
    nan = torch.full_like(count, math.nan)
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "confidence": torch.where(count > 0, conf_sum / count.clamp_min(1), nan),
        "accuracy": torch.where(count > 0, acc_sum / count.clamp_min(1), nan),
        "count": count,
    }


# --------------------------------------------------------------------------------------------------
# distribution shift


def _split_key(key: str) -> tuple[str, int]:
    name, sep, sev = key.rpartition("/")
    if not sep or not sev.isdigit():
        raise ValueError(f"shift set key {key!r} is not '<corruption>/<severity>'; e.g. 'rotate/3'")
    return name, int(sev)


def _group(errors: Mapping[str, float]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for key, err in errors.items():
        name, sev = _split_key(key)
        out.setdefault(name, {})[sev] = float(err)
    return out


def corruption_errors(
    errors: Mapping[str, float], baseline: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Corruption error per corruption type.

    Args:
        errors: ``{"<corruption>/<severity>": error rate}``.
        baseline: the same keys for a baseline model; if given, ``CE_c = sum_s E / sum_s B``
            (Hendrycks), else ``CE_c = mean_s E``.

    Returns:
        ``{corruption: CE_c}`` in first-seen order.
    """
    grouped = _group(errors)
    if baseline is None:
        return {c: sum(v.values()) / len(v) for c, v in grouped.items()}
    base = _group(baseline)
    out = {}
    for c, v in grouped.items():
        missing = sorted(set(v) - set(base.get(c, {})))
        if missing:
            raise ValueError(f"baseline lacks {c!r} at severities {missing}; evaluate the baseline on the same suite")
        denom = sum(base[c][s] for s in v)
        out[c] = sum(v.values()) / denom if denom > 0 else math.nan
    return out


def mean_corruption_error(errors: Mapping[str, float], baseline: Mapping[str, float] | None = None) -> float:
    """mCE: the mean over corruption types of :func:`corruption_errors`; ``nan`` if there are none."""
    ce = corruption_errors(errors, baseline)
    return sum(ce.values()) / len(ce) if ce else math.nan


def relative_corruption_errors(
    errors: Mapping[str, float],
    clean_error: float,
    baseline: Mapping[str, float] | None = None,
    baseline_clean_error: float | None = None,
) -> dict[str, float]:
    """Relative CE per corruption: ``sum_s (E - E_clean) / sum_s (B - B_clean)`` (or ``mean_s (E - E_clean)``)."""
    shifted = {k: v - clean_error for k, v in errors.items()}
    if baseline is None:
        return corruption_errors(shifted)
    if baseline_clean_error is None:
        raise ValueError("baseline_clean_error is required with a baseline")
    return corruption_errors(shifted, {k: v - baseline_clean_error for k, v in baseline.items()})


def relative_drop(clean_accuracy: float, shifted_accuracies: Iterable[float]) -> float:
    """``(clean - mean(shifted)) / clean``: the fraction of clean accuracy lost under shift."""
    vals = [float(a) for a in shifted_accuracies if not math.isnan(float(a))]
    if not vals or not clean_accuracy or math.isnan(clean_accuracy):
        return math.nan
    return (clean_accuracy - sum(vals) / len(vals)) / clean_accuracy
