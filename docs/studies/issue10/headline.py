import json, sys
for p in sys.argv[1:]:
    r = json.load(open(p + "/report.json")); s = r["summary"]; c = r["clean"]
    keys = ["silent_error", "silent_error_held_out", "useful", "best_single", "oracle_router", "guarantee_held_tunable", "guarantee_held_held_out"]
    try:
        sec = json.load(open(p + "/summary.json"))["seconds"]
    except Exception:
        sec = {}
    print(p, " ".join(f"{k}={s.get(k):.3f}" for k in keys), f"clean_cov={c['coverage']['system']:.3f} clean_acc_ans={c['accuracy_answered']:.4f}", {k: round(v) for k, v in sec.items()})
