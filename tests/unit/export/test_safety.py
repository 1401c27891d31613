"""Nothing unpickles, and loading a bundle pulls in neither lightning nor hydra."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import fallbackformer
from fallbackformer.export.bundle import save

PACKAGE = Path(fallbackformer.__file__).parent
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _violations(tree: ast.AST, filename: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLING_MODULES:
                    found.append(f"{filename}:{node.lineno} imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLING_MODULES:
                found.append(f"{filename}:{node.lineno} imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
                safe = any(
                    kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                    for kw in node.keywords
                )
                if not safe:
                    found.append(f"{filename}:{node.lineno} calls torch.load without weights_only=True")
            if name in ("load", "loads", "Unpickler") and isinstance(func, ast.Attribute) and getattr(
                func.value, "id", ""
            ) in PICKLING_MODULES:
                found.append(f"{filename}:{node.lineno} calls {func.value.id}.{name}")
    return found


def test_scanner_catches_what_it_should():
    bad = "import pickle\nfrom dill import loads\nimport torch\nx = torch.load('a')\ny = torch.load('b', weights_only=False)\n"
    good = "import torch\nx = torch.load('a', weights_only=True)\n"
    assert len(_violations(ast.parse(bad), "bad.py")) == 4
    assert _violations(ast.parse(good), "good.py") == []


def test_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    found = []
    for path in files:
        found += _violations(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), str(path.relative_to(PACKAGE.parent)))
    assert not found, "unpickling in the package:\n" + "\n".join(found)


def test_load_in_a_fresh_process_imports_neither_lightning_nor_hydra(model, tmp_path):
    bundle = save(model, tmp_path / "bundle")
    code = f"""
import json, sys, torch
import fallbackformer as ff
model = ff.load({str(bundle)!r})
out = model(torch.rand(4, 1, 8, 8) * 16)
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'lightning', 'pytorch_lightning', 'lightning_fabric', 'hydra', 'omegaconf'}})
print(json.dumps({{"heavy": heavy, "served": out.served_by}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"ff.load imported {result['heavy']}"
    assert len(result["served"]) == 4
