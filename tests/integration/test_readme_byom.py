"""README's "Bring your own model": its ```python blocks, run top to bottom as one script, work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Bring your own model"


def byom_script() -> str:
    """The ```python blocks of the README section, joined in order."""
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md lost its {SECTION!r} section"
    body = text.split(SECTION, 1)[1]
    body = re.split(r"\n## ", body, maxsplit=1)[0]  # up to the next section
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) >= 5, f"expected the example in several ```python blocks, found {len(blocks)}"
    return "\n".join(blocks)


def test_the_section_uses_the_public_calls():
    script = byom_script()
    for call in ("ff.MultiExitNet(", "ff.register_model(", "ff.distill(", "ff.calibrate(", "ff.FallbackModel(",
                 "ff.save(", "ff.load("):
        assert call in script, f"the README example no longer shows {call}"


@pytest.mark.integration
def test_readme_bring_your_own_model_runs(tmp_path):
    """Exactly the README's blocks, in a fresh process; the repository root on the path, a scratch cwd."""
    (tmp_path / "byom.py").write_text(byom_script())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "byom.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "system accuracy" in proc.stdout
    assert (tmp_path / "outputs" / "my_bundle" / "manifest.json").exists()
