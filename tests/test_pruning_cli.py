"""The pruning flags of generate.py, trace compare, --plot, and the trainer / calibrator commands, run
as a user runs them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import hf_config, make_checkpoint, noise_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def py(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
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
    r = py("-m", "dyrate_ref.tools.train_predictor", "--weights", w, "--data", str(data), "--out", pred, "--epochs", "30", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    other_pred = str(root / "other.safetensors")
    r = py("-m", "dyrate_ref.tools.train_predictor", "--weights", other, "--data", str(data), "--out", other_pred,
           "--epochs", "5", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage that is not safetensors")
    return root, w, img, pred, other_pred, str(corrupt), str(data)


def gen(w, img, *extra):
    return py(os.path.join(REPO, "generate.py"), "--image", img, "--prompt", "Describe it.", "--weights", w,
              "--max-new-tokens", "8", *extra)


def test_trainer_reports_and_writes_a_loadable_predictor(env):
    root, w, img, pred, *_ = env
    r = gen(w, img, "--method", "dyrate", "--predictor", pred, "--trace", str(root / "dy.safetensors"))
    assert r.returncode == 0, r.stderr
    t = load_file(str(root / "dy.safetensors"))
    assert set(t) == {"input_ids", "pixel_values", "tokens", "logits", "kept_masks", "rates", "flops", "kv_bytes"}
    T = t["tokens"].numel()
    assert t["rates"].shape == (T,) and t["flops"].dtype == torch.float64 and t["kv_bytes"].dtype == torch.int64
    # the predictor's rate is the compression relative to N: 1 - |keep_t| / N, which only grows
    keep = t["kept_masks"]
    assert torch.allclose(t["rates"], 1 - keep.sum(1).float() / keep.shape[1])
    assert all(bool((keep[i + 1] <= keep[i]).all()) for i in range(T - 1))  # nested


def test_a_predictor_trained_on_a_score_decides_on_it(env):
    """train_predictor --score accumulated: the file says so; generate.py's DyRate takes the score from it
    (the trace says where from) and refuses another. (That the loop and the trainer compute the same
    scores: tests/test_scores.py.)"""
    root, w, img, pred, _, _, data = env
    acc = str(root / "acc.safetensors")
    r = py("-m", "dyrate_ref.tools.train_predictor", "--weights", w, "--data", data, "--out", acc, "--epochs", "30",
           "--max-new-tokens", "4", "--score", "accumulated")
    assert r.returncode == 0, r.stderr
    assert safe_open(acc, "pt").metadata()["score"] == "accumulated"
    assert safe_open(pred, "pt").metadata()["score"] == "last"
    r = gen(w, img, "--method", "dyrate", "--predictor", acc, "--trace", str(root / "acc_trace.safetensors"))
    assert r.returncode == 0, r.stderr
    meta = safe_open(str(root / "acc_trace.safetensors"), "pt").metadata()
    assert (meta["score"], meta["score_from"]) == ("accumulated", "predictor file")
    ids = load_file(str(root / "acc_trace.safetensors"))["input_ids"]  # the rows a backend averages over, recorded
    first, end = map(int, meta["text_rows"].split(","))
    from dyrate_ref.processing import Processor
    from dyrate_ref.loading import read_config
    assert Processor(w, read_config(w)).decode(ids[first:end].tolist()).strip() == "Describe it."
    r = gen(w, img, "--method", "dyrate", "--predictor", acc, "--score", "last")
    assert r.returncode == 2 and "differs from the predictor's score (accumulated)" in r.stderr


BAD = {
    "unknown-method": (["--method", "magic"], "unknown --method"),
    "ratio-high": (["--method", "fastv", "--rate", "1.5"], "outside [0, 1]"),
    "ratio-negative": (["--method", "fastv", "--rate", "-0.1"], "outside [0, 1]"),
    "layer-zero": (["--method", "fastv", "--layer", "0"], "outside 1..3"),
    "layer-too-deep": (["--method", "vtw", "--layer", "4"], "outside 1..3"),
    "schedule-not-numbers": (["--method", "dyrate-schedule", "--schedule", "0.1,lots"], "not a comma-separated list"),
    "schedule-out-of-range": (["--method", "dyrate-schedule", "--schedule", "0.1,1.2"], "rate outside [0, 1]"),
    "predictor-missing": (["--method", "dyrate", "--predictor", "/nonexistent.safetensors"], "does not exist"),
    "dyrate-without-either": (["--method", "dyrate"], "needs --predictor"),
    "rate-with-schedule": (["--method", "dyrate-schedule", "--rate", "0.5", "--schedule", "0.5"], "does not apply"),
    "schedule-with-fastv": (["--method", "fastv", "--schedule", "0.5"], "does not apply"),
    "layer-with-none": (["--layer", "2"], "does not apply"),
    "score-with-vtw": (["--method", "vtw", "--score", "mean"], "does not apply"),
    "score-unknown": (["--method", "fastv", "--score", "median"], "is not one of last, mean, accumulated"),
    "score-fastv-accumulated": (["--method", "fastv", "--score", "accumulated"], "method fastv: score 'accumulated' is not one of 'last', 'mean'"),
    "schedule-with-dyrate": (["--method", "dyrate", "--schedule", "0.5", "--predictor", "x"], "belongs to dyrate-schedule"),
    "old-rates-flag": (["--method", "dyrate-schedule", "--rates", "0.5"], "--rates is now --schedule"),
    "old-ratio-flag": (["--method", "fastv", "--ratio", "0.5"], "--ratio is now --rate"),
    "plot-not-png": (["--plot", "out.jpg"], ".png"),
    "plot-folder": (["--plot", "/nonexistent/x.png"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pruning_values(env, case):
    root, w, img, *_ = env
    extra, needle = BAD[case]
    r = gen(w, img, *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and needle in lines[0], r.stderr


@pytest.mark.parametrize("which,needle", [("other", "another model"), ("corrupt", "not a readable")])
def test_bad_predictor_files(env, which, needle):
    root, w, img, pred, other_pred, corrupt, _ = env
    r = gen(w, img, "--method", "dyrate", "--predictor", other_pred if which == "other" else corrupt)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


def test_trace_compare_same_and_different(env):
    root, w, img, *_ = env
    a, b, c = (str(root / f"{n}.safetensors") for n in "abc")
    assert gen(w, img, "--trace", a).returncode == 0
    assert gen(w, img, "--trace", b).returncode == 0
    assert gen(w, img, "--method", "fastv", "--rate", "0.75", "--trace", c).returncode == 0
    same = py("-m", "dyrate_ref.tools.trace", "compare", a, b)
    assert same.returncode == 0 and "SAME" in same.stdout
    assert safe_open(c, "pt").metadata()["rate"] == "0.75"
    diff = py("-m", "dyrate_ref.tools.trace", "compare", a, c)
    assert diff.returncode == 1 and "DIFFERENT" in diff.stdout
    assert "kept sets differ" in diff.stdout and "max |Δlogit|" in diff.stdout and "first bad step: 0" in diff.stdout
    # a backend off by a little: within a loose atol it passes, within the default it does not
    t = load_file(b)
    t["logits"] = t["logits"] + 1e-3
    from safetensors.torch import save_file
    d = str(root / "d.safetensors")
    save_file(t, d)
    assert py("-m", "dyrate_ref.tools.trace", "compare", a, d).returncode == 1
    assert py("-m", "dyrate_ref.tools.trace", "compare", a, d, "--atol", "1e-2").returncode == 0


def test_plot_is_written(env):
    root, w, img, *_ = env
    out = root / "plot.png"
    r = gen(w, img, "--method", "dyrate-schedule", "--schedule", "0,0.3,0.6,0.9", "--plot", str(out))
    assert r.returncode == 0, r.stderr
    im = Image.open(out)
    assert im.width >= 600 and im.height >= 300
    # the patch overlays: later steps are darker (more patches evicted) than step 0
    strip = im.crop((0, im.height - 100, im.width, im.height)).convert("L")
    assert strip.getextrema()[0] < 60


def test_the_run_plot_s_labels_name_k_only_where_a_method_prunes():
    """generate.py --plot: K in the title only for a method with a pruning layer; whole-step ticks on a
    short answer; the caption says darkened patches were evicted (and that none were, for none)."""
    from dyrate_ref.plots import run_labels
    from dyrate_ref.pruning import FastV, NoPruning, DyRateSchedule
    none, fastv = run_labels(NoPruning(), 2, 3), run_labels(FastV(1, 0.5), 1, 40)
    assert "K =" not in none["title"] and "read at layer 1" in none["title"] and none["xticks"] == [0, 1, 2]
    assert "no patch is evicted" in none["patches"]
    assert "K = 1" in fastv["title"] and fastv["xticks"] is None and "evicted" in fastv["patches"]
    assert "K = 2" in run_labels(DyRateSchedule(2, (0.5,)), 2, 5)["title"]


def test_calibrate_vtw_command(env):
    root, w, img, pred, other_pred, corrupt, data = env
    out = str(root / "vtw.json")
    r = py("-m", "dyrate_ref.tools.calibrate_vtw", "--weights", w, "--data", data, "--min-layer", "1", "--eta", "100",
           "--max-new-tokens", "5", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out))
    assert res["layer"] == 1 and set(res["mean_kl"]) == {"1", "2", "3"}
    bad = py("-m", "dyrate_ref.tools.calibrate_vtw", "--weights", w, "--data", data, "--min-layer", "5")
    assert bad.returncode == 2 and "outside 1..3" in bad.stderr


def test_the_run_plot_shows_the_steps_where_the_method_cut():
    """--plot's patch panels: the prefill, the steps whose kept set shrank (the first ones), the last step,
    then evenly spaced ones; the README's look example cut at steps 23, 24 and 25 of 26, all shown."""
    from dyrate_ref.plots import panel_steps
    kept = [144] * 23 + [36, 27, 20]
    assert panel_steps(kept) == [0, 23, 24, 25]
    assert panel_steps([144] * 40) == [0, 10, 20, 39]  # nothing cut: evenly spaced
    assert panel_steps([72] * 5) == [0, 1, 2, 4] and panel_steps([144]) == [0]
    assert panel_steps([144] * 10 + [100] * 10 + [50] * 10) == [0, 10, 20, 29]
