"""Offline evidence study (not shipped; validation + calibration splits only, tunable corruptions only).

Fits the final decision's two scorers (primary right? student right?) on the validation split's
corrupted copies, with the router's evidence and with extra columns, then measures on the calibration
split corrupted by each tunable corruption x severity: the frontier of mean silent error / useful /
fraction of sets whose CP lower bound on selective risk stays <= 0.1, over thresholds.
"""
import sys, json
from pathlib import Path
import torch
import fallbackformer as ff
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from fallbackformer.gates.router_calibration import collect_evidence
from fallbackformer.gates.evidence import path_features, MahalanobisScore
from fallbackformer.gates.router import Scorer
from fallbackformer.data.mixture import corrupted_copies
from fallbackformer.evaluation import metrics as M

torch.manual_seed(0)
model = ff.load(sys.argv[1])
d = model.decisions
primary, student, router = d.primary, d.fallbacks[0], d.router
with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base=None):
    cfg = compose("run")
dm = instantiate(cfg.data); dm.setup()
suite = instantiate(cfg.shift)
names, sevs = list(suite.names), list(suite.severities)
E = primary.num_exits


def input_stats(x):  # raw [N,1,8,8] in 0..16 -> [N, K]
    z = (x[:, 0] / 16.0).clamp(0, 1)
    n = z.shape[0]
    r = torch.arange(8.0)
    mass = z.sum((1, 2)) + 1e-6
    cr = (z.sum(2) * r).sum(1) / mass; cc = (z.sum(1) * r).sum(1) / mass
    vr = (z.sum(2) * (r - cr[:, None]) ** 2).sum(1) / mass; vc = (z.sum(1) * (r - cc[:, None]) ** 2).sum(1) / mass
    border = torch.ones(8, 8, dtype=torch.bool); border[1:-1, 1:-1] = False
    tv = (z[:, 1:] - z[:, :-1]).abs().sum((1, 2)) + (z[:, :, 1:] - z[:, :, :-1]).abs().sum((1, 2))
    on = z > 0.3
    rows_on = on.any(2).float(); cols_on = on.any(1).float()
    return torch.stack([z.mean((1, 2)), cr, cc, vr, vc, z[:, border].mean(1), tv / 64, on.float().mean((1, 2)),
                        rows_on.sum(1), cols_on.sum(1), (z > 0.95).float().mean((1, 2))], 1)


x_tr, y_tr = dm.splits["train"]
in_maha = MahalanobisScore.fit((x_tr / 16).flatten(1), y_tr, 10, shrinkage=1e-2)
_, pooled_tr = collect_evidence(primary, student, None, x_tr)
bank = pooled_tr[-1]  # last stage pooled features [N, D]


def knn(pooled_last, k=5):
    dd = torch.cdist(pooled_last, bank)
    return dd.topk(k, largest=False).values[:, -1:].log1p()


def tta(x, ev):  # the student on 4 one-pixel translations: agreement with primary / student, mean max-prob
    pp, ps = ev.exit_logits[-1].argmax(-1), ev.student_logits.argmax(-1)
    agree_p, agree_s, conf = [], [], []
    for sh in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        with torch.no_grad():
            lg = student(torch.roll(x, sh, dims=(2, 3)))
        agree_p.append((lg.argmax(-1) == pp).float()); agree_s.append((lg.argmax(-1) == ps).float())
        conf.append(lg.softmax(-1).max(-1).values)
    return torch.stack([sum(agree_p) / 4, sum(agree_s) / 4, sum(conf) / 4], 1)


def feats(x):
    with torch.no_grad():
        ev, pooled = collect_evidence(primary, student, router, x)
    base_p, base_s = path_features(ev, E - 1), path_features(ev, "student")
    extra = {"input": input_stats(x), "in_maha": in_maha((x / 16).flatten(1))[:, None], "knn": knn(pooled[-1]),
             "tta": tta(x, ev)}
    return ev, base_p, base_s, extra


VARIANTS = {"base": [], "input": ["input"], "in_maha": ["in_maha"], "knn": ["knn"], "tta": ["tta"],
            "all": ["input", "in_maha", "knn", "tta"]}
if len(sys.argv) > 3:
    VARIANTS = {k: VARIANTS[k] for k in sys.argv[3].split(",")}
x_val, y_val = dm.splits["val"]
xf, yf = corrupted_copies(x_val, y_val, names, sevs, seed=1, suite=suite)
ev, bp, bs, ex = feats(xf)
right_p = ev.exit_logits[-1].argmax(-1) == yf
right_s = ev.student_logits.argmax(-1) == yf
scorers = {}
for v, cols in VARIANTS.items():
    add = [ex[c] for c in cols]
    sp = Scorer(bp.shape[1] + sum(a.shape[1] for a in add), 16).fit(torch.cat([bp, *add], 1), right_p)
    ss = Scorer(bs.shape[1] + sum(a.shape[1] for a in add), 16).fit(torch.cat([bs, *add], 1), right_s)
    scorers[v] = (sp, ss, cols)

x_cal, y_cal = dm.splits["calibration"]
sets = {}
for ci, nm in enumerate(names):
    for s in sevs:
        xc = suite.corrupt(x_cal, nm, s, seed=1000 + ci * 31 + s)
        sets[f"{nm}/{s}"] = feats(xc)
sets_clean = feats(x_cal)
grid = [i / 200 for i in range(100, 200)] + [0.9975, 0.999]
res = {}
for v, (sp, ss, cols) in scorers.items():
    per = {}
    for key, (ev, bp_, bs_, ex_) in list(sets.items()) + [("clean", sets_clean)]:
        add = [ex_[c] for c in cols]
        with torch.no_grad():
            pp, ps = sp(torch.cat([bp_, *add], 1)), ss(torch.cat([bs_, *add], 1))
        use_s = ps > pp
        conf = torch.where(use_s, ps, pp)
        pred = torch.where(use_s, ev.student_logits.argmax(-1), ev.exit_logits[-1].argmax(-1))
        best = max(float((ev.exit_logits[-1].argmax(-1) == y_cal).float().mean()), float((ev.student_logits.argmax(-1) == y_cal).float().mean()))
        per[key] = (conf, pred == y_cal, best)
    rows = []
    for t in grid:
        se, us, held = [], [], []
        for key, (conf, ok, best) in per.items():
            if key == "clean":
                continue
            a = conf >= t; n = int(a.sum()); w = int((a & ~ok).sum())
            se.append(w / len(ok)); us.append(int((a & ok).sum()) / len(ok))
            held.append(0.0 if (n and M.risk_lower_bound(w, n, 0.1) > 0.1) else 1.0)
        conf, ok, _ = per["clean"]; a = conf >= t
        rows.append(dict(t=t, silent=sum(se) / len(se), useful=sum(us) / len(us), held=sum(held) / len(held),
                         clean_cov=float(a.float().mean()), clean_acc=float(ok[a].float().mean()) if a.any() else 1.0))
    bs_mean = sum(b for k, (_, _, b) in per.items() if k != "clean") / (len(per) - 1)
    ok10 = [r for r in rows if r["silent"] <= 0.10]
    best_useful = max(ok10, key=lambda r: r["useful"]) if ok10 else None
    best_held = max(rows, key=lambda r: (r["held"], r["useful"]))
    res[v] = dict(best_single=bs_mean, at_silent_0_10=best_useful, max_held=best_held,
                  held_at_0_06=min(rows, key=lambda r: abs(r["silent"] - 0.062)))
    print(v, json.dumps(res[v]))
json.dump(res, open(sys.argv[2], "w"), indent=1)
