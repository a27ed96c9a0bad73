"""tutorial.md cannot rot: every ```python block runs, in order, as one script, on the embedded model.

Figures the tutorial writes go to a temporary folder here (TUTORIAL_OUT), not over docs/.
"""

import os
import re
import subprocess
import sys

import pytest

from dyrate_ref.loading import DEFAULT_WEIGHTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_blocks_are_found():
    with open(os.path.join(REPO, "tutorial.md"), encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 10


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_WEIGHTS, "model.safetensors")),
                    reason="the embedded weights are not in this checkout")
def test_tutorial_runs(tmp_path):
    with open(os.path.join(REPO, "tutorial.md"), encoding="utf-8") as f:
        script = "\n\n".join(python_blocks(f.read()))
    path = tmp_path / "tutorial_script.py"
    path.write_text(script)
    env = {**os.environ, "TUTORIAL_OUT": str(tmp_path)}
    r = subprocess.run([sys.executable, str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for fig in ("attention_share.png", "kept_patches.png"):
        assert (tmp_path / fig).stat().st_size > 1000, fig
