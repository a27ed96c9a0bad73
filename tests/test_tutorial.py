"""tutorial.md cannot rot: every ```python block runs, in order, as one script, on the embedded model;
what each block prints is what the tutorial shows under it (the ```text block that follows it); and
running it twice in a row in a clean copy leaves the copy exactly as it was.

Printed output is compared line by line, word by word: words exactly, numbers within 2 % or 0.02
(whichever is larger: the figures are float32 results of the same code, but a torch or CPU change may
round a last digit differently), and "…" in the tutorial stands for any one word (timings).
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from dyrate_ref.loading import DEFAULT_WEIGHTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "@@ tutorial block {} @@"
NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?$")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def blocks_with_output(text: str) -> list[tuple[str, str | None]]:
    """[(python code, the expected output shown right after it or None)]."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```\n(?:\n?```text\n(.*?)^```)?", text, flags=re.S | re.M):
        out.append((m.group(1), m.group(2)))
    return out


def script(text: str) -> str:
    return "\n\n".join(f"print({MARK.format(i)!r}, flush=True)\n{code}"
                       for i, (code, _) in enumerate(blocks_with_output(text)))


def split_output(stdout: str, n: int) -> list[str]:
    pieces = re.split(r"^@@ tutorial block (\d+) @@\n", stdout, flags=re.M)
    found = {int(pieces[i]): pieces[i + 1] for i in range(1, len(pieces), 2)}
    return [found.get(i, "") for i in range(n)]


def _word_ok(got: str, want: str) -> bool:
    if want == "…":
        return True
    g, w = got.strip("(),:;[]%x"), want.strip("(),:;[]%x")
    if NUMBER.match(w) and NUMBER.match(g) and got.replace(g, "") == want.replace(w, ""):
        return abs(float(g) - float(w)) <= max(0.02, 0.02 * abs(float(w)))
    return got == want


def same_output(got: str, want: str) -> str | None:
    """None when `got` matches the tutorial's `want`, else the first differing line."""
    g_lines, w_lines = got.rstrip("\n").split("\n"), want.rstrip("\n").split("\n")
    for i, (g, w) in enumerate(zip(g_lines, w_lines)):
        gw, ww = g.split(), w.split()
        if len(gw) != len(ww) or not all(_word_ok(a, b) for a, b in zip(gw, ww)):
            return f"line {i + 1}: got {g!r}, the tutorial shows {w!r}"
    if len(g_lines) != len(w_lines):
        return f"{len(g_lines)} lines printed, the tutorial shows {len(w_lines)}"
    return None


def test_blocks_are_found_and_each_shows_its_output():
    with open(os.path.join(REPO, "tutorial.md"), encoding="utf-8") as f:
        blocks = blocks_with_output(f.read())
    assert len(blocks) >= 10
    assert len(python_blocks(open(os.path.join(REPO, "tutorial.md"), encoding="utf-8").read())) == len(blocks)
    printing = [i for i, (code, _) in enumerate(blocks) if "print(" in code]
    assert all(blocks[i][1] is not None for i in printing), [i for i in printing if blocks[i][1] is None]


def test_the_comparison_has_teeth():
    assert same_output("kept 36 -> 14 | a red circle\n", "kept 36 -> 14 | a red circle\n") is None
    assert same_output("took 0.31 s\n", "took … s\n") is None
    assert same_output("share 0.505\n", "share 0.500\n") is None  # within 2 %
    assert same_output("share 0.56\n", "share 0.50\n") is not None
    assert same_output("a blue star\n", "a red star\n") is not None
    assert same_output("one\ntwo\n", "one\n") is not None


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_WEIGHTS, "model.safetensors")),
                    reason="the embedded weights are not in this checkout")
def test_tutorial_prints_what_it_shows_and_runs_twice_in_a_clean_copy(tmp_path):
    copy = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(copy / rel), exist_ok=True)
            shutil.copy2(src, copy / rel)
    git = dict(cwd=copy, capture_output=True, text=True, check=True)
    env_git = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], **git)
    subprocess.run(["git", "add", "-A"], **git)
    subprocess.run(["git", "commit", "-q", "-m", "copy"], env=env_git, **git)
    text = (copy / "tutorial.md").read_text(encoding="utf-8")
    blocks = blocks_with_output(text)
    (tmp_path / "tutorial_script.py").write_text(script(text))
    env = {k: v for k, v in os.environ.items() if k != "TUTORIAL_OUT"}
    env["PYTHONPATH"] = str(copy)  # the copy's package, so anything it wrote would land in the copy
    env["TMPDIR"] = str(tmp_path / "tmp")  # the first run's own temporary folder lands here, not in /tmp
    os.mkdir(tmp_path / "tmp")
    for run in range(2):
        if run == 1:  # the second run writes its figures where this test can look at them
            env["TUTORIAL_OUT"] = str(tmp_path / "out")
            os.mkdir(tmp_path / "out")
        r = subprocess.run([sys.executable, str(tmp_path / "tutorial_script.py")], cwd=copy, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"run {run + 1}:\n" + r.stdout[-3000:] + r.stderr[-3000:]
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], **git).stdout
        assert status == "", f"run {run + 1} changed the checkout:\n{status}"
    made = [p for p in os.listdir(tmp_path / "tmp") if p.startswith("dyrate-tutorial-")]
    assert len(made) == 1  # the run without TUTORIAL_OUT made its own folder (under TMPDIR), as it printed
    for fig in ("attention_mass.png", "kept_patches.png"):
        assert (tmp_path / "out" / fig).stat().st_size > 1000, fig
    for i, (out, (code, want)) in enumerate(zip(split_output(r.stdout, len(blocks)), blocks)):
        if want is not None:
            problem = same_output(out, want)
            assert problem is None, f"tutorial block {i + 1} ({code.splitlines()[0]!r}): {problem}"
