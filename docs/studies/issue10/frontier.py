"""Issue 10 study, measurement only (not shipped): the router's threshold frontier on the evaluation's shift sets.

For a saved bundle: per threshold t, every exit reached (no deadline), the router's decisions
(exit k if p_k >= max(t, floor), else the better of primary/student if >= t, else the default), then
per set silent error, useful and whether the CP lower bound (delta 0.1) of the selective risk
exceeds alpha=0.1 (a breach). Prints the frontier; nothing is chosen from it.
"""
import sys, json
import torch
import fallbackformer as ff
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from pathlib import Path
from fallbackformer.gates.router_calibration import collect_evidence
from fallbackformer.evaluation import metrics as M

bundle = sys.argv[1]
model = ff.load(bundle)
d = model.decisions
primary, student, router = d.primary, d.fallbacks[0], d.router
with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base=None):
    cfg = compose("run")
dm = instantiate(cfg.data); dm.setup()
suite = instantiate(cfg.shift)
import os
SPLIT = os.environ.get("SPLIT", "test")
x, y = dm.splits[SPLIT]
sets = suite.build(x, y, include_held_out=(SPLIT == "test"))
if SPLIT != "test":  # selection: validation-split criterion of training/robust.py, tunable only
    from fallbackformer.training.robust import tuning_robustness
    print("tuning_robustness(val)", tuning_robustness({"primary": primary, "student": student}, *dm.splits["val"], suite=suite))
held = set(suite.held_out)

def probs(ev):
    E = router.num_exits
    from fallbackformer.gates.evidence import path_features
    pk = [torch.nan_to_num(router.exit_probability(ev, k), nan=-1.0) for k in range(E)]
    ps = torch.nan_to_num(router.scorers["student"](path_features(ev, "student")), nan=-1.0)
    return pk, ps

rows = {}
items = sets.items() if isinstance(sets, dict) else sets
for key, val in items:
    xs, ys = val if isinstance(val, tuple) else (val["x"], val["y"])
    with torch.no_grad():
        ev, _ = collect_evidence(primary, student, router, xs)
        pk, ps = probs(ev)
    E = router.num_exits
    preds = [ev.exit_logits[k].argmax(-1) for k in range(E)]
    rows[key] = (pk, ps, preds, ev.student_logits.argmax(-1), ys, str(key).split("/")[0] in held)

def decide(t, pk, ps, preds, spred):
    E = len(pk)
    n = pk[0].shape[0]
    ans = torch.zeros(n, dtype=torch.bool); pred = torch.full((n,), -1)
    done = torch.zeros(n, dtype=torch.bool)
    for k in range(E - 1):
        acc = (~done) & (pk[k] >= max(t, router.exit_floor))
        pred = torch.where(acc, preds[k], pred); ans |= acc; done |= acc
    use_s = ps > pk[-1]
    conf = torch.where(use_s, ps, pk[-1])
    fp = torch.where(use_s, spred, preds[-1])
    acc = (~done) & (conf >= t)
    pred = torch.where(acc, fp, pred); ans |= acc
    return ans, pred

print("threshold(current)", float(router.threshold))
out = []
grid = sorted(set([float(router.threshold)] + [round(v, 3) for v in torch.linspace(0.5, 0.995, 34).tolist()]))
for t in grid:
    agg = {"t": t, "se": [], "use": [], "ht": [], "hh": [0.0], "seh": [0.0], "bs": []}
    for key, (pk, ps, preds, spred, ys, is_held) in rows.items():
        if "/" not in str(key):
            continue
        ans, pred = decide(t, pk, ps, preds, spred)
        wrong = int((ans & (pred != ys)).sum()); right = int((ans & (pred == ys)).sum()); n = int(ans.sum())
        agg["se"].append(wrong / len(ys)); agg["use"].append(right / len(ys))
        agg["bs"].append(max(float((preds[-1] == ys).float().mean()), float((spred == ys).float().mean())))
        breach = n > 0 and M.risk_lower_bound(wrong, n, 0.1) > 0.1
        (agg["hh"] if is_held else agg["ht"]).append(0.0 if breach else 1.0)
        if is_held: agg["seh"].append(wrong / len(ys))
    m = lambda v: sum(v) / len(v)
    print(f"t={t:.3f} silent={m(agg['se']):.3f} silent_ho={m(agg['seh']):.3f} useful={m(agg['use']):.3f} held_tun={m(agg['ht']):.2f} held_ho={m(agg['hh']):.2f} best_single={m(agg['bs']):.3f}")

# Upper bound for any per-set (stream-level) threshold: per set the lowest grid threshold with no breach.
fine = [i / 1000 for i in range(0, 1000)] + [0.9995, 1.01]
tot = {"se": [], "use": [], "ht": [], "hh": []}
for key, (pk, ps, preds, spred, ys, is_held) in rows.items():
    if "/" not in str(key):
        continue
    for t in fine:
        ans, pred = decide(t, pk, ps, preds, spred)
        wrong = int((ans & (pred != ys)).sum()); n = int(ans.sum())
        if not (n and M.risk_lower_bound(wrong, n, 0.1) > 0.1):
            break
    tot["se"].append(wrong / len(ys)); tot["use"].append(int((ans & (pred == ys)).sum()) / len(ys))
m = lambda v: sum(v) / len(v)
print(f"per-set oracle threshold (every set holds): silent={m(tot['se']):.3f} useful={m(tot['use']):.3f}")

# Label-free per-set threshold: per set (a window of one stream), the lowest t whose estimated selective
# risk from the router's own probabilities, mean(1 - conf | answered), is <= target (conf: the
# probability of the answer given). No labels; measures whether the router's p can steer a window.
def conf_of(t, pk, ps, preds, spred):
    E = len(pk); n = pk[0].shape[0]
    conf = torch.full((n,), -1.0); done = torch.zeros(n, dtype=torch.bool)
    for k in range(E - 1):
        acc = (~done) & (pk[k] >= max(t, router.exit_floor)); conf = torch.where(acc, pk[k], conf); done |= acc
    fc = torch.maximum(ps, pk[-1]); acc = (~done) & (fc >= t); conf = torch.where(acc, fc, conf)
    return conf
for target in (0.10, 0.07, 0.05, 0.03):
    tot = {"se": [], "use": [], "ht": [], "hh": []}
    for key, (pk, ps, preds, spred, ys, is_held) in rows.items():
        if "/" not in str(key):
            continue
        for t in fine[::5] + [1.01]:
            ans, pred = decide(t, pk, ps, preds, spred)
            c = conf_of(t, pk, ps, preds, spred)
            if not ans.any() or float((1 - c[ans]).mean()) <= target:
                break
        wrong = int((ans & (pred != ys)).sum()); n = int(ans.sum())
        tot["se"].append(wrong / len(ys)); tot["use"].append(int((ans & (pred == ys)).sum()) / len(ys))
        (tot["hh"] if is_held else tot["ht"]).append(0.0 if (n and M.risk_lower_bound(wrong, n, 0.1) > 0.1) else 1.0)
    print(f"label-free per-set threshold, target {target}: silent={m(tot['se']):.3f} useful={m(tot['use']):.3f} "
          f"held_tun={m(tot['ht']):.2f} held_ho={m(tot['hh']) if tot['hh'] else float('nan'):.2f}")

# The online risk controller's update (runtime/online_risk.py, rolling risk control, tighten-only) per
# set as one stream from the certified threshold: labels for a random fraction q of requests, applied
# at once (no delay); lambda += eta * (err - alpha) on labelled answered requests, lambda >= lambda0;
# probe: after probe_after labelled requests while lambda > 1, lambda = 0.99 and the wait doubles.
def stream(pk, ps, preds, spred, ys, q, eta, seed, alpha=0.1, probe_after=200):
    n = ys.shape[0]; g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g); lab = torch.rand(n, generator=g) < q
    lam0 = float(router.threshold); lam = lam0; wait = probe_after; above = 0
    ans_all = torch.zeros(n, dtype=torch.bool); pred_all = torch.full((n,), -1)
    for i in order.tolist():
        a, p = decide(lam, [t[i:i + 1] for t in pk], ps[i:i + 1], [t[i:i + 1] for t in preds], spred[i:i + 1])
        ans_all[i], pred_all[i] = a[0], p[0]
        if lab[i]:
            if a[0]:
                lam = max(lam0, lam + eta * (float(p[0] != ys[i]) - alpha))
            above = above + 1 if lam > 1 else 0
            if above >= wait:
                lam, above, wait = 0.99, 0, wait * 2
    return ans_all, pred_all
for q, eta in (() if os.environ.get('NO_ONLINE') else ((0.1, 0.1), (0.25, 0.1), (1.0, 0.1), (1.0, 0.02))):
    tot = {"se": [], "use": [], "ht": [], "hh": []}
    for j, (key, (pk, ps, preds, spred, ys, is_held)) in enumerate(rows.items()):
        if "/" not in str(key):
            continue
        ans, pred = stream(pk, ps, preds, spred, ys, q, eta, seed=j)
        wrong = int((ans & (pred != ys)).sum()); n = int(ans.sum())
        tot["se"].append(wrong / len(ys)); tot["use"].append(int((ans & (pred == ys)).sum()) / len(ys))
        (tot["hh"] if is_held else tot["ht"]).append(0.0 if (n and M.risk_lower_bound(wrong, n, 0.1) > 0.1) else 1.0)
    print(f"online risk control per stream, labels q={q} eta={eta}: silent={m(tot['se']):.3f} useful={m(tot['use']):.3f} "
          f"held_tun={m(tot['ht']):.2f} held_ho={m(tot['hh']) if tot['hh'] else float('nan'):.2f}")
