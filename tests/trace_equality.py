"""Traces before and after a change, tensor for tensor: the check a refactor of the loop, the model or the
methods owes (an oracle whose traces moved is no longer the same oracle).

    python tests/trace_equality.py [--base REV]      (default REV: HEAD, i.e. the uncommitted changes)

Checks REV out into a temporary git worktree, runs generate.py there and in this tree with --trace for
every method (none, FastV with the last and the mean score, VTW, DyRate with the shipped predictor, the
fixed schedule with the last and the accumulated score) on the README's two example prompts, and for every
method but DyRate (no predictor fits them) on two tiny random checkpoints (one with grouped key/value
heads and the "full" feature strategy). Every tensor must be equal (torch.equal); metadata keys that
differ are listed (the weights' and predictor's paths always do: they name the two trees). Exit 1 if any
tensor differs. About 2 minutes.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from helpers import hf_config, make_checkpoint, noise_image  # noqa: E402

EXAMPLE = "weights/dyrate-shapes/examples/scene1.png"
PROMPTS = ("Describe the image.", "What color is the star? Look first.")
METHODS = [("none", []), ("fastv-last", ["--method", "fastv", "--rate", "0.75"]),
           ("fastv-mean", ["--method", "fastv", "--rate", "0.5", "--score", "mean"]), ("vtw", ["--method", "vtw"]),
           ("dyrate", ["--method", "dyrate"]),
           ("schedule", ["--method", "dyrate-schedule", "--schedule", "0,0.5,0.9"]),
           ("schedule-acc", ["--method", "dyrate-schedule", "--schedule", "0.25,0.5", "--score", "accumulated"])]
PATHS = {"weights", "predictor"}  # metadata that names the tree a run came from


def runs(work: str) -> list[tuple[str, list[str]]]:
    out = [(f"example{i + 1}-{name}", ["--image", EXAMPLE, "--prompt", prompt] + flags)
           for i, prompt in enumerate(PROMPTS) for name, flags in METHODS]
    make_checkpoint(f"{work}/tiny1", hf_config())
    make_checkpoint(f"{work}/tiny2", hf_config(text={"num_key_value_heads": 2}, vision_feature_select_strategy="full"))
    noise_image(60, 45, seed=3).save(f"{work}/noise.png")
    for ck in ("tiny1", "tiny2"):
        for name, flags in METHODS:
            if name != "dyrate":
                flags = flags + ["--layer", "1"] if name == "vtw" else flags  # K from the flag, not the L/2 fallback
                out.append((f"{ck}-{name}", ["--weights", f"{work}/{ck}", "--image", f"{work}/noise.png",
                                             "--prompt", "hi there", "--max-new-tokens", "6"] + flags))
    return out


def main():
    p = argparse.ArgumentParser(description="traces of REV and of this tree, tensor for tensor")
    p.add_argument("--base", default="HEAD", help="the revision to compare with (default HEAD)")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="trace-equality-")
    base = os.path.join(work, "base")
    subprocess.run(["git", "worktree", "add", "--detach", "-q", base, args.base], cwd=REPO, check=True)
    bad = 0
    try:
        for name, argv in runs(work):
            traces = {}
            for tree, root in (("base", base), ("this", REPO)):
                traces[tree] = os.path.join(work, f"{tree}-{name}.safetensors")
                r = subprocess.run([sys.executable, "generate.py", *argv, "--trace", traces[tree]], cwd=root,
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"{name} failed in {tree}: {r.stderr.strip().splitlines()[-1]}")
            a, b = load_file(traces["base"]), load_file(traces["this"])
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            meta = []
            for t in (traces["base"], traces["this"]):
                with safe_open(t, "pt") as f:
                    meta.append(f.metadata())
            differ = sorted(k for k in set(meta[0]) | set(meta[1]) if meta[0].get(k) != meta[1].get(k) and k not in PATHS)
            bad += not same
            print(f"{name:24s} {'equal' if same else 'DIFFERENT'}: {len(a)} tensors, {a['tokens'].numel()} tokens, "
                  f"{int(a['kept_masks'][-1].sum())} visual tokens kept at the end; other metadata differing: "
                  f"{', '.join(differ) or 'none'}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", base], cwd=REPO, check=False)
    print(f"{'every trace equal' if not bad else f'{bad} traces differ'} ({args.base} against this tree)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
