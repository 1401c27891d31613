"""Screening harness (not shipped): the main job without label-free, sweep, drift study and ONNX,
optionally reusing a trained primary from a run's checkpoints (argv[1]: best.ckpt or 'train')."""
import sys
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
import fallbackformer.training.pipeline as P
from fallbackformer.models.transforms import fit_input_transforms

ckpts, out, overrides = sys.argv[1].split(","), sys.argv[2], sys.argv[3:]
ckpt = ckpts[0]
orig = P.train_primary
orig_student = P.distill_student

def distill_student(cfg, datamodule, primary, workdir):
    if len(ckpts) < 2:
        return orig_student(cfg, datamodule, primary, workdir)
    from hydra.utils import instantiate
    student = instantiate(cfg.student.model)
    sd = torch.load(ckpts[1], map_location="cpu", weights_only=True)["state_dict"]
    student.load_state_dict({k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")})
    return student.eval(), {"val_acc_student": float("nan")}

P.distill_student = distill_student

def train_primary(cfg, datamodule, workdir):
    if ckpt == "train":
        return orig(cfg, datamodule, workdir)
    from hydra.utils import instantiate
    primary = instantiate(cfg.primary.model)
    fit_input_transforms(primary, *datamodule.splits["train"])
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    primary.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
    return primary.eval(), {"val_acc_primary": float("nan")}

P.train_primary = train_primary
with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base=None):
    cfg = compose("run", overrides=overrides + [f"+output_dir={out}", f"bundle_dir={out}/bundle",
                  "evaluation.sweep=false", "evaluation.drift=null", "label_free=none", "onnx.export=false",
                  "degradation.on_breach=signal"])
summary, _ = P.run(cfg)
import json
rep = json.load(open(Path(out) / "report.json"))
s = rep["summary"]; c = rep["clean"]
keys = ["silent_error", "silent_error_held_out", "useful", "best_single", "oracle_router", "guarantee_held_tunable", "guarantee_held_held_out"]
print("HEADLINE", json.dumps({**{k: s.get(k) for k in keys}, "clean_cov": c["coverage"]["system"], "clean_acc_ans": c["accuracy_answered"], "seconds": summary["seconds"]}))
