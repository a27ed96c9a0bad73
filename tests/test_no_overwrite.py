"""Nothing a user gives is overwritten: an output path that is one of the run's inputs (the image, a file of
the weights folder, the forced trace) or another output of the same run is refused with exit 2 and one
line, before any work, and every input's bytes are unchanged. Run as the user runs it: a subprocess."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from dyrate_ref.trace import write_trace
from helpers import hf_config, make_checkpoint, noise_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    w = root / "w"
    make_checkpoint(str(w), hf_config(text=dict(num_hidden_layers=2)))
    img = root / "victim.png"
    noise_image(40, 40, seed=1).save(img)
    return root, w, img


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def gen(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def refused(r, needle):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""  # refused before any work: no answer was generated


def test_trace_over_the_image_is_refused(files):
    root, w, img = files
    before = digest(img)
    refused(gen("--image", img, "--prompt", "hi", "--weights", w, "--trace", img), "would overwrite the --image")
    assert digest(img) == before


def test_trace_into_the_weights_folder_is_refused(files):
    root, w, img = files
    target = w / "model.safetensors"
    before = digest(target)
    refused(gen("--image", img, "--prompt", "hi", "--weights", w, "--trace", target), "--weights folder")
    assert digest(target) == before


def test_trace_over_the_forced_trace_is_refused(files):
    """The worst case: the oracle's trace written over the backend's, then `compare bk bk` says SAME."""
    root, w, img = files
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    proc = Processor(str(w), load_model(str(w)).config)
    bk = root / "bk.safetensors"
    write_trace(str(bk), {"input_ids": proc.input_ids("hi"), "tokens": torch.tensor([5, 6, 7])}, {})
    before = digest(bk)
    refused(gen("--image", img, "--prompt", "hi", "--weights", w, "--force-tokens", bk, "--trace", bk),
            "--force-tokens trace")
    assert digest(bk) == before
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.trace", "compare", str(bk), str(bk)], capture_output=True,
                       text=True, timeout=60)
    refused(r, "same file")


def test_two_outputs_of_one_run_may_not_be_the_same_file(files):
    root, w, img = files
    out = root / "same.png"
    r = gen("--image", img, "--prompt", "hi", "--weights", w, "--trace", out, "--plot", out)
    refused(r, "are the same file")
    assert not out.exists()


def test_a_link_to_an_input_is_the_input(files):
    root, w, img = files
    link = root / "link.png"
    if not link.exists():
        os.symlink(img, link)
    before = digest(img)
    refused(gen("--image", img, "--prompt", "hi", "--weights", w, "--trace", link), "would overwrite")
    assert digest(img) == before


def test_trace_over_the_predictor_is_refused(files):
    root, w, img = files
    pred = root / "pred.safetensors"
    pred.write_bytes(b"a predictor file")
    refused(gen("--image", img, "--prompt", "hi", "--weights", w, "--method", "dyrate", "--predictor", pred,
                "--trace", pred), "the --predictor file")
    assert pred.read_bytes() == b"a predictor file"


def tree_digest(folder) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): digest(os.path.join(d, f))
            for d, _, names in os.walk(folder) for f in names}


@pytest.mark.parametrize("where", ["the shipped model", "a model of the user's"])
def test_training_into_an_existing_model_folder_is_refused_and_touches_nothing(files, where, tmp_path):
    """demo.train's --out must be a new folder: the shipped weights/dyrate-shapes (the example its help
    once gave) and a user's checkpoint alike are refused before anything is written; every file's bytes and
    the file list stay as they were, and no hidden work folder is left beside it."""
    from dyrate_ref.loading import DEFAULT_WEIGHTS
    folder = DEFAULT_WEIGHTS if where == "the shipped model" else files[1]
    # beside the user's model (a folder of the test's own), nothing new either; beside the shipped one the
    # test cannot tell (other runs may share weights/), so only the folder itself is compared there
    listing = (lambda: sorted(os.listdir(os.path.dirname(folder)))) if where != "the shipped model" else list
    before, beside = tree_digest(folder), listing()
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.demo.train", "--out", folder, "--minutes", "0.01"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "already exists" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert tree_digest(folder) == before and listing() == beside


def test_minutes_bound_the_whole_training_run_stage_1_included(monkeypatch, tmp_path):
    """--minutes reaches stage 1: train() hands pretrain_vision the run's own deadline, and stage 1 stops
    there (a deadline already past: no step at all; no deadline: every step)."""
    import time
    from dyrate_ref.demo import recipes, tower, train
    from dyrate_ref.model import LlavaForConditionalGeneration
    seen = {}

    def spy(model, steps, batch, lr, seed, bf16, show_progress=True, log=None, device="cpu", deadline=None):
        seen["deadline"] = deadline
        raise KeyboardInterrupt  # stop the run here: only the hand-over is under test
    monkeypatch.setattr(train, "pretrain_vision", spy)
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        train.train(str(tmp_path / "m"), recipes.V5, minutes=2.0, show_progress=False)
    assert t0 + 120 <= seen["deadline"] <= time.time() + 120
    model = LlavaForConditionalGeneration(train.build_model(str(tmp_path / "cfg"), recipes.V5)[1])
    assert tower.pretrain_vision(model, 2, 2, 1e-3, 0, False, show_progress=False, deadline=time.time() - 1) == []
    assert len(tower.pretrain_vision(model, 2, 2, 1e-3, 0, False, show_progress=False)) == 2
