import os
import sys

# One thread per process, for this process and every subprocess it starts (they inherit the
# environment): the models here are too small for threads to help, and on a busy 2-core machine torch's
# default (one thread per core, in every process) made the suite ~9x slower (docs/tests.md). Set before
# torch is imported; torch.set_num_threads covers the case where it already was.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # the repo, for generate.py runs

import json  # noqa: E402

import pytest  # noqa: E402

from helpers import hf_config, make_checkpoint, noise_image, python_run  # noqa: E402


@pytest.fixture(scope="session")
def pruning_env(tmp_path_factory):
    """A 4-layer and a 3-layer tiny checkpoint, a picture, three data lines, a predictor trained for each
    checkpoint and a corrupt predictor file: what the pruning commands' tests run on."""
    root = tmp_path_factory.mktemp("pcli")
    w = str(root / "w")
    make_checkpoint(w, hf_config(text=dict(num_hidden_layers=4)))
    other = str(root / "other")
    make_checkpoint(other, hf_config(text=dict(num_hidden_layers=3)))
    img = str(root / "img.png")
    noise_image(40, 40, seed=1, sigma=60).save(img)
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps({"image": "img.png", "prompt": "Describe it.", "answer": a})
                              for a in ["A red square.", "Two circles and a star.", "Yes."]))
    pred = str(root / "pred.safetensors")
    r = python_run("-m", "dyrate_ref.tools.train_predictor", "--weights", w, "--data", str(data), "--out", pred,
                   "--epochs", "30", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    other_pred = str(root / "other.safetensors")
    r = python_run("-m", "dyrate_ref.tools.train_predictor", "--weights", other, "--data", str(data), "--out", other_pred,
                   "--epochs", "5", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage that is not safetensors")
    return root, w, img, pred, other_pred, str(corrupt), str(data)


@pytest.fixture(scope="session")
def four_layer_checkpoint(tmp_path_factory):
    """A tiny random checkpoint with a 4-layer decoder (tests/helpers.hf_config's, deeper)."""
    d = tmp_path_factory.mktemp("ckpt") / "w"
    make_checkpoint(str(d), hf_config(text=dict(num_hidden_layers=4)))
    return str(d)
