"""One risk budget for the whole cascade: ``calibrate_system``.

The runtime serves a sample by the first gate that accepts it, in the order
``[exit_1, ..., exit_{E-1}, primary, student]``, and by the safe default when none does. The
contract is one number for the system: among all answers *not* served by the default, the error
rate (the **system selective risk**) is at most ``alpha``, with probability at least ``1 - delta``
over the calibration draw.

How alpha is shared among the exits and the student
----------------------------------------------------
Not by splitting it. All gates share ONE threshold ``lambda`` on the same temperature-scaled
score (each gate keeps its own temperature): a sample is served by the first gate whose calibrated
confidence reaches ``lambda``. This is a 1-D path of threshold vectors ``(lambda, ..., lambda)``
ordered by conservativeness (a higher ``lambda`` serves fewer samples at every gate), and it is the
natural path for calibrated scores: every gate answers exactly when it is at least ``lambda``
confident, so no gate is held to a stricter standard than another. Learn-then-Test runs along
the fixed ``lambda`` grid (:func:`~fallbackformer.gates.risk_control.threshold_grid`), from the
most conservative value down: at each ``lambda`` the cascade is simulated exactly as the runtime
runs it, the p-value of ``H: system selective risk(lambda) > alpha`` is computed from the served
count and the errors among them (method ``ltt_binom``, the default: the exact binomial tail, valid
because given the served count the served samples are i.i.d. and their errors binomial;
``ltt_hb``: Hoeffding-Bentkus, more conservative), and fixed-sequence testing stops at the first
``lambda`` it cannot reject. The budget is thus shared implicitly: the mix of exits, primary
and student that the cascade produces at ``lambda`` is what the test certifies.

Deadline robustness (``deadline_robust=True``, the default). A deadline can cut the cascade
after any stage and send the rest to the student. With this flag every truncated cascade
``[exit_1..exit_j, student]`` (``j = 0..E``, ``j = 0`` = the student alone, ``j = E`` = the
full cascade) must meet ``alpha`` too: the null at ``lambda`` is the union "some truncation has
risk > alpha", tested with the largest of the ``E + 1`` p-values (an intersection-union test,
valid without splitting ``delta``). So whichever stage a deadline stops at, the answers served
have selective risk ``<= alpha`` with probability ``>= 1 - delta``, all truncations at once.

Method ``crc`` controls, in expectation, the share of all requests answered wrongly (served by a
gate and wrong). In a cascade that loss is not monotone in ``lambda`` (a lower ``lambda`` can
hand a sample to an earlier, wrong exit), so CRC runs on its monotone envelope
``max_{lambda' >= lambda} loss(lambda')``, which bounds the loss from above. Method
``empirical`` picks the lowest ``lambda`` with empirical system selective risk ``<= alpha``
(no guarantee).

What is not covered: requests routed to the default for other reasons (breaker, invalid input)
are outside the risk by definition; distribution shift voids every guarantee here (watch it with
:class:`~fallbackformer.gates.drift.ScoreDriftMonitor`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from fallbackformer.common.paths import path_names
from fallbackformer.gates import risk_control as rc
from fallbackformer.gates.gate import METHODS, ConfidenceGate, reference_sample
from fallbackformer.gates.guarantee import certified
from fallbackformer.gates.temperature import fit_temperature

__all__ = ["calibrate_system", "cascade_counts", "cascade_served", "system_thresholds"]


def _records(conf: Tensor) -> tuple[Tensor, Tensor]:
    """Record structure of a cascade along dim -2 (gates).

    ``conf`` ``[..., M, N]`` (NaN already mapped to -inf). Gate ``m`` is a *record* for a sample
    when its confidence is strictly above every earlier gate's: as ``lambda`` decreases, the serving
    gate of a sample only ever moves to an earlier record.

    Returns:
        ``(record [..., M, N] bool, next_record [..., M, N] long)``: the index of the next record
        after ``m`` (``M`` when none).
    """
    m = conf.shape[-2]
    neg = torch.full_like(conf[..., :1, :], -math.inf)
    prev_max = torch.cat([neg, conf[..., :-1, :]], dim=-2).cummax(dim=-2).values
    record = conf > prev_max  # [..., M, N]
    nxt = torch.full_like(conf[..., 0, :], m, dtype=torch.long)  # [..., N]
    nexts = []
    for i in range(m - 1, -1, -1):
        nexts.append(nxt)
        nxt = torch.where(record[..., i, :], torch.full_like(nxt, i), nxt)
    next_record = torch.stack(nexts[::-1], dim=-2)  # [..., M, N]
    return record, next_record


def cascade_counts(conf: Tensor, errors: Tensor, grid: Tensor, envelope: bool = False) -> tuple[Tensor, Tensor]:
    """Served and served-and-wrong counts of a cascade with one common threshold, for every grid value.

    A sample is served at ``lambda`` by the first gate with ``conf >= lambda`` (NaN never accepts);
    when no gate accepts it goes to the default (not counted).

    Args:
        conf: ``[S, M, N]`` (or ``[M, N]``) confidences, gates in cascade order.
        errors: same shape, bool: the gate's own prediction is wrong.
        grid: ``[G]`` thresholds.
        envelope: count the monotone envelope of the error instead (a sample counts as wrong at
            ``lambda`` if it is served wrongly at any ``lambda' >= lambda``); used by CRC.

    Returns:
        ``(n, k)`` long ``[S, G]`` (``[G]`` for 2-D input).
    """
    squeeze = conf.dim() == 2
    if squeeze:
        conf, errors = conf[None], errors[None]
    c = torch.nan_to_num(conf.to(grid.dtype), nan=-math.inf)  # [S, M, N]
    s, m, n = c.shape
    record, next_record = _records(c)
    err = errors.long()
    err_pad = torch.cat([err, torch.zeros_like(err[:, :1])], dim=1)  # [S, M+1, N]; index M -> 0
    next_err = err_pad.gather(1, next_record)  # [S, M, N]
    served_w = (record & (next_record == m)).long()  # the overall max: served iff it reaches lambda
    flat = c.reshape(s, m * n)
    if envelope:
        # wrong at some lambda' >= lambda  <=>  lambda <= max conf over wrong records
        v = torch.where(record & errors, c, torch.full_like(c, -math.inf)).max(dim=1).values  # [S, N]
        n_out = _weighted_counts_above(flat, served_w.reshape(s, m * n)[None], grid)[0]
        k_out = _weighted_counts_above(v, torch.isfinite(v).long()[None], grid)[0]
    else:
        err_w = (record.long() * (err - next_err)).reshape(s, m * n)
        both = torch.stack([served_w.reshape(s, m * n), err_w])  # one sort for both counts
        n_out, k_out = _weighted_counts_above(flat, both, grid)
    if squeeze:
        return n_out[0], k_out[0]
    return n_out, k_out


def _weighted_counts_above(values: Tensor, weights: Tensor, grid: Tensor) -> Tensor:
    """``sum_i w_i * 1[values_i >= t]`` for every ``t`` in ``grid``.

    ``values`` ``[S, L]``, ``weights`` ``[W, S, L]`` (W weight channels sharing one sort) -> ``[W, S, G]``.
    """
    v_sorted, order = values.sort(dim=1)
    w = weights.gather(2, order.expand_as(weights))
    prefix = torch.cat([torch.zeros_like(w[..., :1]), w.cumsum(-1)], dim=-1)  # [W, S, L+1]
    pos = torch.searchsorted(v_sorted.contiguous(), grid.expand(values.shape[0], -1).contiguous())  # [S, G]
    return prefix[..., -1:] - prefix.gather(2, pos.expand(weights.shape[0], -1, -1))


def cascade_served(conf: Tensor, threshold: Tensor | float) -> Tensor:
    """Which gate serves each sample: ``[M, N]`` confidences -> long ``[N]`` (``M`` = default).

    ``threshold`` is a scalar or a per-gate ``[M]`` tensor. This is the runtime rule, used as the
    brute-force reference in tests.
    """
    thr = torch.as_tensor(threshold, dtype=conf.dtype)
    if thr.dim() == 0:
        thr = thr.expand(conf.shape[0])
    acc = torch.isfinite(conf) & (conf >= thr[:, None])  # [M, N]
    m = conf.shape[0]
    idx = torch.where(acc, torch.arange(m)[:, None], torch.full_like(acc, m, dtype=torch.long))
    return idx.min(dim=0).values


def _prefixes(num_primary: int, deadline_robust: bool) -> list[list[int]]:
    """Gate index lists of the cascades to certify (the student is index ``num_primary``)."""
    student = num_primary
    full = list(range(num_primary)) + [student]
    if not deadline_robust:
        return [full]
    return [list(range(j)) + [student] for j in range(num_primary + 1)]


def system_thresholds(
    conf: Tensor,
    errors: Tensor,
    alpha: float,
    delta: float,
    method: str,
    grid: Tensor,
    deadline_robust: bool = True,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict]:
    """The common threshold ``lambda`` for a cascade, vectorised over calibration splits.

    Args:
        conf: ``[S, M, N]`` or ``[M, N]`` confidences, order ``[exit_1.., primary, student]``.
        errors: same shape, bool.
        alpha, delta, method: as in :func:`calibrate_system`.
        grid: ``[G]`` thresholds, most conservative first.
        deadline_robust: also certify every truncation ``[exit_1..exit_j, student]``.
        return_info: also return per-split diagnostics.

    Returns:
        float64 ``[S]`` (0-dim for 2-D input); +inf where nothing is certified.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}.")
    squeeze = conf.dim() == 2
    if squeeze:
        conf, errors = conf[None], errors[None]
    num_primary = conf.shape[1] - 1
    cascades = _prefixes(num_primary, deadline_robust)
    total = conf.shape[2]
    info: dict = {"cascades": cascades}
    if method == "crc":
        ok_all = None
        for idx in cascades:
            n_c, k_c = cascade_counts(conf[:, idx], errors[:, idx], grid, envelope=True)
            ok = ((k_c + 1) <= alpha * (total + 1)).long().cumprod(dim=-1).bool()
            ok_all = ok if ok_all is None else ok_all & ok
        last = torch.where(ok_all, torch.arange(grid.numel()), torch.full_like(ok_all, -1, dtype=torch.long)).max(-1).values
    else:
        ns, ks = [], []
        for idx in cascades:
            n_c, k_c = cascade_counts(conf[:, idx], errors[:, idx], grid)
            ns.append(n_c)
            ks.append(k_c)
        n = torch.stack(ns, dim=1)  # [S, P, G]
        k = torch.stack(ks, dim=1)
        info.update(n=n, k=k)
        if method == "empirical":
            ok = ((n > 0) & (k <= alpha * n)).all(dim=1)  # [S, G]
            last = torch.where(ok, torch.arange(grid.numel()), torch.full_like(ok, -1, dtype=torch.long)).max(-1).values
        else:
            pv = rc.ltt_pvalues(k, n, alpha, method).amax(dim=1)  # [S, G] intersection-union p-value
            n_min = rc.min_accepted(alpha, delta, method)
            testable = (n >= n_min).all(dim=1)  # [S, G], nondecreasing along the grid
            g = grid.numel()
            start = torch.where(testable, torch.arange(g), torch.full_like(testable, g, dtype=torch.long)).min(-1).values
            last = rc.fixed_sequence(pv, delta, start)
            last = torch.where(start < g, last, torch.full_like(last, -1))
            info.update(pvalues=pv, start=start, n_min=n_min)
    info["last"] = last
    thr = grid[last.clamp(min=0)].double()
    thr = torch.where(last >= 0, thr, torch.full_like(thr, math.inf))
    if squeeze:
        thr = thr[0]
        info = {k_: (v[0] if isinstance(v, Tensor) else v) for k_, v in info.items()}
    return (thr, info) if return_info else thr


def calibrate_system(
    exit_logits: Sequence[Tensor],
    student_logits: Tensor,
    labels: Tensor,
    alpha: float = 0.05,
    delta: float = 0.1,
    method: str = "ltt_binom",
    score: str = "max_softmax",
    *,
    temperatures: Sequence[float] | None = None,
    deadline_robust: bool = True,
    score_train: tuple[Sequence[Tensor], Tensor, Tensor] | None = None,
    grid_size: int = 2000,
    names: Sequence[str] | None = None,
) -> list[ConfidenceGate]:
    """Calibrate all gates of a cascade against one system-level selective-risk budget.

    Args:
        exit_logits: calibration logits of every exit of the primary, ``[N, C]`` each, in order
            (the last one is the primary's final head), as ``MultiExitNet.forward`` returns them.
        student_logits: ``[N, C]`` the student's calibration logits.
        labels: ``[N]``.
        alpha: system selective-risk target (error rate among answers not served by the default).
        delta: allowed failure probability of the guarantee.
        method: ``ltt_binom`` (default), ``ltt_hb``, ``crc`` or ``empirical`` (see the module docstring).
        score: the score every gate uses.
        temperatures: one per gate (``E + 1``); fitted on the calibration split when None.
        deadline_robust: certify every truncated cascade too (see the module docstring).
        score_train: ``(exit_logits, student_logits, labels)`` of a split disjoint from
            calibration, for ``score="learned"``.
        grid_size: size of the fixed ``lambda`` grid.
        names: gate names for the guarantees (default ``exit_1.., primary, student``).

    Returns:
        Gates ``[exit_1.., primary, student]``, all with threshold ``lambda_hat`` (+inf, accept
        nothing, when no ``lambda`` is certified) and a :class:`~fallbackformer.gates.guarantee.Guarantee`
        whose details say ``scope="system"``, the gate's ``name`` and ``position``.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.randint(0, 10, (3000,), generator=g)
    >>> onehot = torch.nn.functional.one_hot(y, 10).float()
    >>> exits = [s * onehot + 2 * torch.randn(3000, 10, generator=g) for s in (3.0, 5.0, 7.0)]
    >>> student = 4 * onehot + 2 * torch.randn(3000, 10, generator=g)
    >>> gates = calibrate_system(exits, student, y, alpha=0.05, delta=0.1)
    >>> [gate.guarantee.details["name"] for gate in gates]
    ['exit_1', 'exit_2', 'primary', 'student']
    """
    if len(exit_logits) < 1:
        raise ValueError("exit_logits is empty: pass the list MultiExitNet returns (at least the primary's logits).")
    all_logits = [z.detach().cpu() for z in exit_logits] + [student_logits.detach().cpu()]
    n = labels.shape[0]
    for i, z in enumerate(all_logits):
        if z.dim() != 2 or z.shape[0] != n:
            raise ValueError(f"logits #{i} have shape {tuple(z.shape)}; every entry must be [N={n}, C].")
    m = len(all_logits)
    if names is None:
        names = path_names(m - 1)  # the primary's m - 1 heads, then the student
    if len(names) != m:
        raise ValueError(f"names has {len(names)} entries, expected {m} (exits + primary + student).")
    if temperatures is not None and len(temperatures) != m:
        raise ValueError(f"temperatures has {len(temperatures)} entries, expected {m}.")
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"alpha and delta must lie in (0, 1), got alpha={alpha!r}, delta={delta!r}.")
    if score == "learned" and score_train is None:
        raise ValueError("score='learned' needs score_train=(exit_logits, student_logits, labels) from a split disjoint from calibration.")
    labels = labels.detach().long().cpu()
    gates: list[ConfidenceGate] = []
    for i, z in enumerate(all_logits):
        t = float(temperatures[i]) if temperatures is not None else fit_temperature(z, labels)
        learned_cfg = None
        if score == "learned":
            from fallbackformer.gates.learned import LearnedScore

            tr_exits, tr_student, tr_labels = score_train  # type: ignore[misc]
            tr = (list(tr_exits) + [tr_student])[i].detach().cpu()
            learned_cfg = LearnedScore.fit(tr / t, tr_labels.detach().cpu()).to_config()
        gates.append(ConfidenceGate(temperature=t, score=score, learned=learned_cfg))
    with torch.no_grad():
        conf = torch.stack([g.confidence(z) for g, z in zip(gates, all_logits)])  # [M, N]
        errors = torch.stack([z.argmax(1) != labels for z in all_logits])  # [M, N]
    grid = rc.threshold_grid(score, all_logits[0].shape[1], grid_size)
    thr_t, info = system_thresholds(conf, errors, alpha, delta, method, grid, deadline_robust, return_info=True)
    thr = float(thr_t)
    served = cascade_served(conf, torch.tensor(thr, dtype=torch.float32).expand(m))  # [N]
    wrong_served = errors.gather(0, served.clamp(max=m - 1)[None])[0] & (served < m)
    n_served = int((served < m).sum())
    sys_stats = {
        "system_coverage_cal": n_served / n,
        "system_selective_risk_cal": (int(wrong_served.sum()) / n_served) if n_served else None,
    }
    satisfied, reason, extra = _explain(info, method, alpha, delta, m, thr)
    for i, gate in enumerate(gates):
        gate.threshold.fill_(thr)
        gate.reference_scores = reference_sample(conf[i])
        gate.guarantee = certified(
            alpha=alpha, delta=delta, method=method, n=n, threshold=thr, satisfied=satisfied, reason=reason,
            risk=extra["risk"], kind=extra["kind"], coverage=float((served == i).double().mean()),
            selective_risk=_risk(errors[i], served == i), scope="system", name=names[i], position=i, score=score,
            temperature=float(gate.temperature),
            temperature_source="given" if temperatures is not None else "fitted on the calibration split",
            deadline_robust=bool(deadline_robust), **sys_stats,
            **{k: v for k, v in extra.items() if k not in ("risk", "kind")},
        )
    return gates


def _risk(errors: Tensor, mask: Tensor) -> float | None:
    cnt = int(mask.sum())
    return int((errors & mask).sum()) / cnt if cnt else None


def _explain(info: dict, method: str, alpha: float, delta: float, m: int, thr: float) -> tuple[bool, str, dict]:
    ok = math.isfinite(thr)
    scope = (
        "every truncated cascade [exit_1..exit_j, student] (j = 0..E) and the full cascade"
        if len(info["cascades"]) > 1 else "the full cascade"
    )
    if method == "crc":
        if ok:
            return True, (f"conformal risk control on the monotone envelope: for {scope}, the expected share of "
                          f"requests served wrongly is <= {alpha:g}"), {"risk": "joint_error_rate", "kind": "expectation"}
        return False, (f"conformal risk control: no common threshold keeps (wrong + 1) / (n_cal + 1) <= {alpha:g} "
                       f"for {scope}; all gates accept nothing"), {"risk": "joint_error_rate", "kind": "expectation"}
    if method == "empirical":
        if ok:
            return True, (f"empirical system selective risk <= {alpha:g} on the calibration data for {scope}; "
                          "NO statistical guarantee"), {"risk": "selective_risk", "kind": "none"}
        return False, (f"no common threshold has empirical system selective risk <= {alpha:g} for {scope}; "
                       "all gates accept nothing"), {"risk": "selective_risk", "kind": "none"}
    extra = {"risk": "selective_risk", "kind": "high_probability", "n_min": info["n_min"]}
    g = info["pvalues"].shape[-1]
    start, last = int(info["start"]), int(info["last"])
    if start >= g:
        return False, (f"no common threshold lets every certified cascade serve the {info['n_min']} calibration "
                       f"samples needed to certify selective risk <= {alpha:g} at delta={delta:g}; calibrate "
                       "on more data or raise alpha/delta. All gates accept nothing."), extra
    if last < 0:
        pv = float(info["pvalues"][start])
        return False, (f"at the most conservative testable threshold the largest {rc.PVALUE_SHORT[method]} p-value over {scope} is "
                       f"{pv:.3g} > delta={delta:g}: system selective risk <= {alpha:g} cannot be certified. "
                       "All gates accept nothing."), {**extra, "p_value_first": pv}
    extra.update(p_value=float(info["pvalues"][last]), n_tested=last - start + 1)
    return True, (f"Learn-then-Test ({rc.PVALUE_NAMES[method]} p-value, fixed sequence over {g} common thresholds): with "
                  f"probability >= {1 - delta:g} over the calibration draw, the system selective risk of "
                  f"{scope} is <= {alpha:g}"), extra
