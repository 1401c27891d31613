"""The house's size limits (docs/architecture.md): small modules, short runtime functions.

No module in ``fallbackformer/`` over 500 lines; no function in ``fallbackformer/runtime/`` over 60
lines (its docstring included, its decorators not). A module or function that outgrows them is split
along what it owns.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fallbackformer"
MAX_MODULE_LINES = 500
MAX_RUNTIME_FUNCTION_LINES = 60


def module_lengths(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): len(p.read_text().splitlines()) for p in sorted(root.rglob("*.py"))}


def function_lengths(root: Path) -> dict[str, int]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    return out


def test_no_module_is_over_the_limit():
    lengths = module_lengths(PACKAGE)
    assert len(lengths) > 50  # the package was found
    over = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them along what they own): {over}"


def test_no_runtime_function_is_over_the_limit():
    lengths = function_lengths(PACKAGE / "runtime")
    assert any(name.endswith(" forward") for name in lengths)  # the runtime's functions were found
    over = {name: n for name, n in lengths.items() if n > MAX_RUNTIME_FUNCTION_LINES}
    assert not over, f"runtime functions over {MAX_RUNTIME_FUNCTION_LINES} lines: {over}"


def test_the_checks_can_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "long.py").write_text("def f():\n" + "    x = 1\n" * 70 + "\n" * 500)
    assert module_lengths(pkg)["pkg/long.py"] > MAX_MODULE_LINES
    assert function_lengths(pkg)["pkg/long.py:1 f"] == 71


MARKERS = ("<" * 7 + " ", "=" * 7 + "\n", ">" * 7 + " ")  # written split so this file never matches itself


def unresolved_merges(root: Path) -> list[str]:
    """Files under ``root`` (code, docs, configs) with a line that starts like a merge conflict marker."""
    hits = []
    tops = [root / d for d in ("fallbackformer", "tests", "docs", "configs", "scripts", ".ci")]
    paths = [p for top in tops if top.is_dir() for p in top.rglob("*")] + sorted(root.glob("*.*"))
    for path in sorted(paths):
        if path.suffix not in {".py", ".md", ".yaml", ".txt", ".toml"} or not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        if any(line.startswith(MARKERS) for line in lines):
            hits.append(str(path.relative_to(root)))
    return hits


def test_no_merge_conflict_marker_is_left_anywhere():
    root = PACKAGE.parent
    assert not unresolved_merges(root), f"unresolved merge conflicts in {unresolved_merges(root)}"


def test_the_marker_check_can_fail(tmp_path):
    (tmp_path / "a.md").write_text("text\n" + "<" * 7 + " HEAD\nx\n" + "=" * 7 + "\ny\n" + ">" * 7 + " other\n")
    assert unresolved_merges(tmp_path) == ["a.md"]
