"""What a reader meets: the README's figures for following one `generate.py --method dyrate` run, measured
here with sys.setprofile (every package function the run calls, in a subprocess so that nothing of the
suite's own imports counts), and the line counts of the reader's core."""

import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs generate.py under a profiler; prints {"files", "before", "depth", "deepest"} as JSON.
PROFILE = r'''
import json, os, sys
ROOT = os.path.join(os.path.abspath("dyrate_ref"), "")
files, before, seen, depth, deepest = set(), set(), [False], [0], []
def package(code):
    return os.path.abspath(code.co_filename).startswith(ROOT) and not code.co_name.startswith("<")
def prof(frame, event, arg):
    code = frame.f_code
    if event != "call" or not package(code):
        return
    if not (code.co_argcount or code.co_kwonlyargcount or code.co_flags & 0x4) and code.co_name[:1].isupper():
        return  # a class body runs once at import: not a call a reader follows
    files.add(os.path.relpath(code.co_filename, ROOT))
    if not seen[0]:
        before.add(f"{os.path.relpath(code.co_filename, ROOT)}:{code.co_qualname}")
        seen[0] = code.co_qualname == "DyRate.choose"
    stack, f = [], frame
    while f:
        if package(f.f_code):
            stack.append(f.f_code.co_qualname)
        f = f.f_back
    if len(stack) > depth[0]:
        depth[0], deepest[:] = len(stack), stack[::-1]
sys.argv = ["generate.py", "--image", "weights/dyrate-shapes/examples/scene1.png", "--prompt",
            "What color is the star? Look first.", "--method", "dyrate"]
import runpy
sys.setprofile(prof)
runpy.run_path("generate.py", run_name="__main__")  # the script itself, as a user runs it
sys.setprofile(None)
print(json.dumps({"files": sorted(files), "before": len(before), "depth": depth[0], "deepest": deepest}))
'''


def profile() -> dict:
    r = subprocess.run([sys.executable, "-c", PROFILE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def readme() -> str:
    return open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def test_the_readmes_reading_figures_are_measured():
    """The README quotes the profile of one run; the profile itself must see the run reach DyRate's
    decision through the files a reader expects (else the figures would count nothing)."""
    got = profile()
    assert {"cli.py", "generation.py", "pruning.py", "predictor.py", "model.py"} <= set(got["files"]), got
    assert got["deepest"][0] == "run", got["deepest"]  # the stack starts where generate.py calls cli.run
    m = re.search(r"calls functions in (\d+) package files, (\d+) package functions before DyRate's first\s+"
                  r"decision, at most (\d+) package frames deep", readme())
    assert m, "the README's reading figures changed form: update this test with them"
    assert tuple(map(int, m.groups())) == (len(got["files"]), got["before"], got["depth"]), got
