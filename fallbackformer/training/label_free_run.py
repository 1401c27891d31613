"""``scripts/label_free.py``: the label-free estimate of a bundle against the truth on every shift set.

    python scripts/label_free.py bundle=checkpoints/digits                  # the per-set table
    python scripts/label_free.py bundle=checkpoints/digits fit=true save_to=checkpoints/digits

With ``fit=true`` the estimator is first fitted and chosen on the bundle's calibration split
(:func:`~fallbackformer.training.label_free_fit.fit_label_free`, as the main job does), and with
``save_to`` the bundle is saved there with it (its models, gates, router, policy, profile,
evaluation and bounds as loaded; a signature does not carry over: sign again). The table (every
set of the test split's shift suite, held-out included; the budget lifted) is printed and written
to ``label_free.json`` and ``label_free.md`` in the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["run_label_free"]


def _out_dir(cfg: Any) -> Path:
    try:
        value = cfg.get("out_dir")
    except Exception:  # ${hydra:...} outside a Hydra run
        value = None
    return Path(value) if value else Path("outputs/label_free")


def _refit(cfg: Any, model: Any, splits: dict, suite: Any) -> dict[str, Any]:
    from hydra.utils import instantiate

    from fallbackformer.data.protocol import check_shift_suite
    from fallbackformer.training.label_free_fit import fit_label_free

    x_cal, y_cal = splits["calibration"]
    model.label_free, report = fit_label_free(model, x_cal, y_cal, check_shift_suite(suite), instantiate(cfg.label_free))
    print(f"fitted: {model.label_free.method} ({report['chosen_by']})")
    for m, r in report["loco"].items():
        print(f"  leave-one-corruption-out {m:<16} within {r['within']}/{r['n']}  mae {r['mae']:.4f}")
    if cfg.get("save_to"):
        from fallbackformer.export import save

        for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # the exporter logs every graph pass at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
        raw = model.bundle_manifest
        path = save(model, Path(str(cfg.save_to)), evaluation=raw.get("evaluation"), degradation=raw.get("degradation"),
                    onnx=bool(raw.get("onnx")))
        print(f"saved {path} with the label_free section (sign it again if it was signed)")
    return report


def run_label_free(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``cfg.bundle``, optionally refit its estimator, measure it on every set; ``(summary, objects)``."""
    from hydra.utils import instantiate

    import fallbackformer
    from fallbackformer.common.jsonsafe import dumps
    from fallbackformer.evaluation.governance_report import label_free_line, label_free_rows, label_free_summary
    from fallbackformer.evaluation.label_free_eval import measure_label_free
    from fallbackformer.evaluation.report_tables import md_table
    from fallbackformer.runtime.label_free import label_free_estimator

    if not cfg.get("bundle") or not Path(str(cfg.bundle)).exists():
        raise FileNotFoundError(f"bundle {cfg.get('bundle')!r} does not exist; pass bundle=PATH to a bundle folder")
    model = fallbackformer.load(str(cfg.bundle))
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    suite = instantiate(cfg.shift)
    report = _refit(cfg, model, datamodule.splits, suite) if cfg.get("fit") else {}
    if label_free_estimator(model) is None:
        print("this bundle carries no fitted estimator: the controller's default (mean confidence) is measured; "
              "fit=true fits one")
    x, y = datamodule.splits["test"]
    entries = measure_label_free(model, {"clean": (x, y), **suite.build(x, y)}, suite.held_out, int(cfg.batch_size))
    table, line = md_table(label_free_rows(entries)), label_free_line(entries)
    print(table)
    print(line)
    out = _out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"bundle": str(cfg.bundle), **label_free_summary(entries), "fit": report or None}
    (out / "label_free.json").write_text(dumps({"summary": summary, "sets": entries}, indent=2, where="label_free.json"))
    (out / "label_free.md").write_text(f"# Label-free accuracy estimate\n\n{line}\n\n{table}\n")
    return summary, {"model": model, "entries": entries}
