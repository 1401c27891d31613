"""Classical rungs fitted on the primary's answers: the tensors decide as scikit-learn does (100% on the
digits test split), gates read their logits, they save as safetensors + JSON (no pickle) and load in a
fresh process without scikit-learn, and they export to ONNX with onnxruntime's decisions equal to torch's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fallbackformer as ff
from fallbackformer.data.breast_cancer import load_breast_cancer_splits
from fallbackformer.models.classical import transform_spec_of
from fallbackformer.rungs import load_rung, save_rung
from fallbackformer.training.rung_fit import fit_linear_rung, fit_tree_rung, primary_soft_labels

DIGITS_SPEC = transform_spec_of(ff.create_model("digits_mlp_student").input_transform)


@pytest.fixture(scope="module")
def fits(digits_system):
    """Tiny fits on the session primary's answers on the digits train split (about 2 s on 2 cores)."""
    x, _ = digits_system.splits["train"]
    p = digits_system.primary
    return {
        "linear": fit_linear_rung(p, x, transform=DIGITS_SPEC),
        "tree": fit_tree_rung(p, x, kind="decision_tree", max_depth=6),
        "forest": fit_tree_rung(p, x, kind="random_forest", n_estimators=4, max_depth=5),
        "boosting": fit_tree_rung(p, x, kind="gradient_boosting", n_estimators=3, max_depth=2, transform=DIGITS_SPEC),
    }


@pytest.mark.parametrize("name", ["linear", "tree", "forest", "boosting"])
def test_decisions_equal_scikit_learns_own_predict_on_the_test_split(fits, digits_system, name):
    fit = fits[name]
    x, _ = digits_system.splits["test"]
    with torch.no_grad():
        ours = fit.module(x).argmax(1).numpy()
        theirs = fit.estimator.predict(fit.module.features(x).numpy())
        # and the probabilities are scikit-learn's (up to the float32 logits; trees: up to the floor)
        proba = torch.softmax(fit.module(x).double(), 1).numpy()
    assert len(x) > 300 and (ours == theirs).mean() == 1.0
    tol = {"linear": 1e-5, "boosting": 1e-5, "tree": 1e-2, "forest": 1e-2}[name]
    assert np.abs(proba - fit.estimator.predict_proba(fit.module.features(x).numpy())).max() < tol


def test_rungs_imitate_the_primary_and_a_gate_calibrates_on_their_logits(fits, digits_system):
    x, y = digits_system.splits["test"]
    x_cal, y_cal = digits_system.splits["calibration"]
    with torch.no_grad():
        primary = digits_system.primary(x)[-1].argmax(1)
        agreement = {n: float((f.module(x).argmax(1) == primary).float().mean()) for n, f in fits.items()}
        gate = ff.ConfidenceGate.calibrate(fits["linear"].module(x_cal), y_cal, alpha=0.05, delta=0.1)
        logits = fits["linear"].module(x)
    assert agreement["linear"] > 0.85 and agreement["boosting"] > 0.6, agreement
    accepted = gate.accept(logits)
    assert 0.3 < accepted.float().mean() <= 1.0
    assert (logits[accepted].argmax(1) == y[accepted]).float().mean() > 0.9


def test_soft_labels_are_the_primarys_final_exit_softmax(digits_system):
    x, _ = digits_system.splits["val"]
    soft = primary_soft_labels(digits_system.primary, x, temperature=2.0)
    with torch.no_grad():
        expected = torch.softmax(digits_system.primary(x)[-1].double() / 2.0, 1)
    assert torch.allclose(soft, expected) and soft.dtype == torch.float64


def test_binary_tabular_rungs_agree_with_scikit_learn_too():
    torch.manual_seed(0)
    splits = load_breast_cancer_splits(seed=0)
    (x, y), (xt, _) = splits["train"], splits["test"]
    primary = ff.create_model("tabular_mlp_exits", hidden=16, depth=2)
    primary.input_transform.fit_from_data(x)
    opt = torch.optim.Adam(primary.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        sum(torch.nn.functional.cross_entropy(lg, y) for lg in primary(x)).backward()
        opt.step()
    for fit in (fit_linear_rung(primary, x, transform={"kind": "standardize"}, labels="hard"),
                fit_tree_rung(primary, x, kind="gradient_boosting", n_estimators=3, max_depth=2)):
        with torch.no_grad():
            ours = fit.module(xt).argmax(1).numpy()
        assert (ours == fit.estimator.predict(fit.module.features(xt).numpy())).all()
        assert fit.module(xt).shape == (len(xt), 2)


def test_bad_fit_arguments_are_named(digits_system):
    x, _ = digits_system.splits["val"]
    with pytest.raises(ValueError, match="kind='svm'"):
        fit_tree_rung(digits_system.primary, x, kind="svm")
    with pytest.raises(ValueError, match="labels='maybe'"):
        fit_linear_rung(digits_system.primary, x, labels="maybe")


def _save_all(fits, x, folder: Path) -> dict[str, list]:
    expected = {}
    for name in ("linear", "tree", "forest", "boosting"):
        save_rung(fits[name].module, folder / name)
        with torch.no_grad():
            expected[name] = fits[name].module(x).tolist()
    return expected


def test_saved_as_safetensors_and_json_with_no_pickle_and_a_fresh_load_reproduces_them(fits, digits_system, tmp_path):
    x, _ = digits_system.splits["test"]
    expected = _save_all(fits, x, tmp_path)
    for name, logits in expected.items():
        folder = tmp_path / name
        assert sorted(p.name for p in folder.iterdir()) == ["rung.json", "rung.safetensors"]
        config = json.loads((folder / "rung.json").read_text())
        assert config["registry_name"] == fits[name].module.registry_name
        blob = (folder / "rung.safetensors").read_bytes()
        assert not blob.startswith(b"\x80") and not blob.startswith(b"PK")  # neither a pickle nor torch.save's zip
        header_len = int.from_bytes(blob[:8], "little")
        assert json.loads(blob[8:8 + header_len])["__metadata__"] == {"fallbackformer": "fallbackformer-rung/1"}
        loaded = load_rung(folder)
        assert loaded is not fits[name].module and not loaded.training
        with torch.no_grad():
            assert loaded(x).tolist() == logits


def test_inference_modules_never_import_scikit_learn():
    import ast

    root = Path(ff.__file__).parent
    files = [root / "models" / "classical.py", *sorted((root / "rungs").glob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("sklearn", "lightning", "hydra", "scipy") for n in names), (path, names)


@pytest.mark.slow
def test_loaded_in_a_fresh_process_without_scikit_learn(fits, digits_system, tmp_path):
    x, _ = digits_system.splits["test"]
    expected = _save_all(fits, x, tmp_path)
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import json, sys, torch
from fallbackformer.rungs import load_rung
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
torch.set_grad_enabled(False)
out = {{n: load_rung({str(tmp_path)!r} + '/' + n)(x).tolist() for n in ('linear', 'tree', 'forest', 'boosting')}}
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'sklearn', 'lightning', 'hydra', 'scipy'}})
print(json.dumps({{'out': out, 'heavy': heavy}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(ff.__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["out"] == expected


def test_load_refuses_changed_or_foreign_files(fits, tmp_path):
    folder = save_rung(fits["tree"].module, tmp_path / "tree")
    weights = folder / "rung.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ValueError, match="SHA-256 .* re-save the rung"):
        load_rung(folder)
    with pytest.raises(ValueError, match="does not exist"):
        load_rung(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not built by fallbackformer.create_model"):
        save_rung(torch.nn.Linear(2, 2), tmp_path / "plain")
    config = json.loads((folder / "rung.json").read_text())
    (folder / "rung.json").write_text(json.dumps({**config, "weights": "../elsewhere.safetensors"}))
    with pytest.raises(ValueError, match="outside its folder"):
        load_rung(folder)


@pytest.mark.parametrize("name", ["boosting", "linear"])
def test_onnx_export_decides_as_torch_in_onnxruntime(fits, digits_system, tmp_path, name):
    from fallbackformer.export.onnx_export import export_module_onnx, ort_session

    x, _ = digits_system.splits["test"]
    module = fits[name].module
    path = export_module_onnx(module, x[:4], tmp_path / f"{name}.onnx", input_names=["x"], output_names=["logits"])
    x_odd = torch.cat([x, torch.full((1, 1, 8, 8), float("nan"))])  # a batch size not traced, a non-finite row
    got = torch.from_numpy(ort_session(path, threads=1).run(None, {"x": x_odd.numpy()})[0])
    with torch.no_grad():
        ref = module(x_odd)
    assert torch.equal(got[:-1].argmax(1), ref[:-1].argmax(1))
    assert torch.allclose(got[:-1], ref[:-1], atol=1e-5)
    assert torch.isnan(got[-1]).all() and torch.isnan(ref[-1]).all()
