"""The tools read what users have: a hub id resolved from the local Hugging Face cache (never
downloaded), a caption-only data file for the predictor, the shipped weights for the benchmark."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dyrate_ref.commands import UserError
from dyrate_ref.loading import DEFAULT_WEIGHTS, read_config, resolve_weights
from helpers import hf_config, hub_cache, make_checkpoint, noise_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "w"
    make_checkpoint(str(d), hf_config(text=dict(num_hidden_layers=4)))
    return str(d)


def test_a_hub_id_resolves_to_refs_main_in_the_local_cache(tmp_path, checkpoint, monkeypatch):
    repo = hub_cache(tmp_path / "hub", "llava-hf/llava-1.5-7b-hf", checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    got = resolve_weights("llava-hf/llava-1.5-7b-hf")
    assert got == str(repo / "snapshots" / "bbbb2222")
    assert read_config(got).text_config.num_hidden_layers == 4  # refs/main's revision, through the symlinks
    (repo / "refs" / "main").write_text("aaaa1111")
    assert read_config(resolve_weights("llava-hf/llava-1.5-7b-hf")).text_config.num_hidden_layers == 3
    # HF_HOME/hub is the next place looked, and an existing folder is never taken for a hub id
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_weights("llava-hf/llava-1.5-7b-hf").endswith("aaaa1111")
    assert resolve_weights(checkpoint) == checkpoint


def test_generate_runs_from_a_hub_id_and_a_missing_one_says_where_it_looked(tmp_path, checkpoint):
    hub_cache(tmp_path / "hub", "someone/tiny-llava", checkpoint)
    noise_image(32, 32, seed=2).save(tmp_path / "x.png")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), "--weights", "someone/tiny-llava", "--image",
                        str(tmp_path / "x.png"), "--prompt", "hi", "--max-new-tokens", "2"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    with pytest.raises(UserError) as e:
        resolve_weights("someone/absent")
    msg = str(e.value)
    assert "models--someone--absent" in msg and "nothing is downloaded" in msg
    assert os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub") in msg


def test_a_caption_only_file_trains_a_predictor(tmp_path, checkpoint):
    """train_predictor labels the model's own answers: a data file of captions (no "answer") is enough,
    as docs/your_data.md tells COCO users."""
    for i in range(3):
        noise_image(32, 32, seed=10 + i).save(tmp_path / f"{i}.png")
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps({"image": f"{i}.png", "prompt": "Describe the image.",
                                        "references": [f"a picture number {i}"]}) + "\n" for i in range(3)))
    out = tmp_path / "p.safetensors"
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.train_predictor", "--weights", checkpoint, "--data",
                        str(data), "--layer", "2", "--rounds", "1", "--epochs", "3", "--max-new-tokens", "3", "--out",
                        str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


def test_the_rollout_confidence_trains_and_the_confidence_is_stored(tmp_path, checkpoint):
    """--rollout-confidence is what the DAgger round decodes at, --confidence what the file stores: a
    predictor trained at rollout 0.55 and stored at 0.95 has the very tensors of one trained and stored
    at 0.55, and a different header confidence; trained at 0.95 its second round sees other states."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    for i in range(4):
        noise_image(32, 32, seed=30 + i).save(tmp_path / f"{i}.png")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"image": f"{i}.png", "prompt": "Describe the image.", "references": ["x"]}) + "\n"
                            for i in range(4)))

    def trained(name, *flags):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.train_predictor", "--weights", checkpoint, "--data",
                            str(data), "--layer", "2", "--rounds", "2", "--epochs", "20", "--max-new-tokens", "6",
                            "--margin", "0", "--out", str(out), *flags], capture_output=True, text=True, timeout=300,
                           cwd=REPO)
        assert r.returncode == 0, r.stderr
        with safe_open(str(out), "pt") as f:
            return load_file(str(out)), f.metadata()
    a, meta_a = trained("a.safetensors", "--confidence", "0.95", "--rollout-confidence", "0.55")
    b, meta_b = trained("b.safetensors", "--confidence", "0.55")
    c, _ = trained("c.safetensors", "--confidence", "0.95")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (meta_a["confidence"], meta_a["rollout_confidence"], meta_b["confidence"]) == ("0.95", "0.55", "0.55")
    assert not all(torch.equal(a[k], c[k]) for k in a), "the rollout confidence changed nothing here: pick other data"


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_WEIGHTS, "model.safetensors")),
                    reason="the embedded weights are not in this checkout")
def test_bench_prune_runs_on_the_shipped_weights():
    """Its prompt ids are drawn from the checkpoint's own vocabulary (they were drawn up to 31,000 on a
    400-token one, an IndexError)."""
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.bench", "--prune", "--weights", DEFAULT_WEIGHTS,
                        "--new-tokens", "2", "--repeats", "1", "--threads", "1"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "| dyrate_ref none |" in r.stdout and "| dyrate_ref fastv R=0.5 |" in r.stdout


def test_replacing_the_files_shipped_with_the_weights_is_said(tmp_path, checkpoint):
    """train_predictor and calibrate_vtw writing over the predictor or calibration beside the weights:
    allowed (that is how they are made), and said; writing them the first time says nothing."""
    import shutil
    w = tmp_path / "w"
    shutil.copytree(checkpoint, w)
    for i in range(2):
        noise_image(32, 32, seed=50 + i).save(tmp_path / f"{i}.png")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"image": f"{i}.png", "prompt": "Describe it.", "answer": "x"}) + "\n"
                            for i in range(2)))
    runs = {"dyrate_predictor.safetensors": ["dyrate_ref.tools.train_predictor", "--layer", "2", "--rounds", "1",
                                             "--epochs", "2", "--max-new-tokens", "3"],
            "vtw_calibration.json": ["dyrate_ref.tools.calibrate_vtw", "--min-layer", "1", "--max-new-tokens", "3"]}
    for name, cmd in runs.items():
        said = []
        for _ in range(2):
            r = subprocess.run([sys.executable, "-m", *cmd, "--weights", str(w), "--data", str(data), "--out",
                                str(w / name)], capture_output=True, text=True, timeout=300, cwd=REPO)
            assert r.returncode == 0, r.stderr
            said.append("replaced the" in r.stdout and "shipped with" in r.stdout)
        assert said == [False, True], (name, said)
