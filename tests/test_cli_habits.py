"""What a newcomer meets: why generation stopped, the methods' default settings, file modes, identical
runs giving identical files, `python -m dyrate_ref`, and `trace compare`'s exit codes."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import hf_config, make_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, umask=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), *args], capture_output=True, text=True,
                          timeout=120, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("habits")
    w = root / "weights"  # 4 decoder layers, a 64-token context: 16 visual tokens + the prompt
    make_checkpoint(str(w), hf_config(text=dict(max_position_embeddings=64, num_hidden_layers=4)))
    img = root / "img.png"
    Image.new("RGB", (40, 40), (20, 120, 200)).save(img)
    return root, str(w), str(img)


def summary(r) -> str:
    assert r.returncode == 0, r.stderr
    return r.stderr.strip().splitlines()[-1]


def meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_stop_reason_max_new_tokens_and_context(files):
    root, w, img = files
    r = run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "2", "--trace", str(root / "a.st"))
    if "EOS" not in summary(r):  # a random model may stop on EOS; it does not with this seed
        assert "stopped at --max-new-tokens" in summary(r)
        assert meta(root / "a.st")["stop_reason"] == "max_new_tokens"
    # a prompt that leaves 3 tokens of context, and a flag asking for far more
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    proc = Processor(w, load_model(w).config)
    words = "hi " * 100
    n = 1
    while proc.input_ids(" ".join(words.split()[:n])).numel() < 64 - 3:
        n += 1
    prompt = " ".join(words.split()[:n])
    r = run("--image", img, "--prompt", prompt, "--weights", w, "--max-new-tokens", "100000",
            "--trace", str(root / "b.st"))
    line = summary(r)
    if "EOS" not in line:
        assert "context is full (64 tokens)" in line, line
        assert meta(root / "b.st")["stop_reason"] == "context"


def test_vtw_defaults_to_the_calibrated_layer_and_says_so(files):
    root, w, img = files
    line = summary(run("--image", img, "--prompt", "hi", "--weights", w, "--method", "vtw", "--max-new-tokens", "2"))
    assert "method vtw K=2 (K: L/2, no vtw_calibration.json)" in line, line
    calibrated = root / "calibrated"
    shutil.copytree(w, calibrated)
    (calibrated / "vtw_calibration.json").write_text(json.dumps({"layer": 3, "eta": 0.1}))
    line = summary(run("--image", img, "--prompt", "hi", "--weights", str(calibrated), "--method", "vtw",
                       "--max-new-tokens", "2"))
    assert "method vtw K=3 (K: vtw_calibration.json)" in line, line
    line = summary(run("--image", img, "--prompt", "hi", "--weights", str(calibrated), "--method", "vtw",
                       "--layer", "1", "--max-new-tokens", "2"))
    assert "method vtw K=1 (K: flag)" in line, line
    # a calibration that found no layer, or one out of range for these weights: said as it is, not "no file"
    for layer, why in ((None, "vtw_calibration.json found no layer within its eta"),
                       (9, "vtw_calibration.json holds layer 9, outside 1..3")):
        (calibrated / "vtw_calibration.json").write_text(json.dumps({"layer": layer, "eta": 0.1}))
        line = summary(run("--image", img, "--prompt", "hi", "--weights", str(calibrated), "--method", "vtw",
                           "--max-new-tokens", "2"))
        assert f"method vtw K=2 (K: L/2, {why})" in line, line


def test_summary_names_every_methods_settings(files):
    root, w, img = files
    line = summary(run("--image", img, "--prompt", "hi", "--weights", w, "--method", "fastv", "--max-new-tokens", "2"))
    assert "method fastv K=2 R=0.5 score=last (K, R, score: default)" in line, line
    line = summary(run("--image", img, "--prompt", "hi", "--weights", w, "--method", "fastv", "--rate", "0.25",
                       "--max-new-tokens", "2"))
    assert "method fastv K=2 R=0.25 score=last (K, score: default; R: flag)" in line, line
    line = summary(run("--image", img, "--prompt", "hi", "--weights", w, "--method", "dyrate-schedule", "--schedule", "0.2,0.4",
                       "--max-new-tokens", "2"))
    assert "method dyrate-schedule K=2 schedule=0.2,0.4 score=last (K, score: default; schedule: flag)" in line, line


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(files, umask):
    root, w, img = files
    trace = root / f"mode-{umask:o}.st"
    summary(run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "2", "--trace", str(trace),
                umask=umask))
    assert stat.S_IMODE(os.stat(trace).st_mode) == 0o666 & ~umask


def test_identical_runs_write_identical_traces(files):
    root, w, img = files
    for name in ("x.st", "y.st"):
        summary(run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "3", "--trace", str(root / name)))
    assert (root / "x.st").read_bytes() == (root / "y.st").read_bytes()


def test_module_entry_point_names_itself():
    r = subprocess.run([sys.executable, "-m", "dyrate_ref", "--help"], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m dyrate_ref"), r.stdout[:80]


def compare(a, b):
    return subprocess.run([sys.executable, "-m", "dyrate_ref.trace", "compare", str(a), str(b)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_trace_compare_exit_codes(files):
    root, w, img = files
    a, b = root / "c1.st", root / "c2.st"
    summary(run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "3", "--trace", str(a)))
    summary(run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "3", "--method", "fastv",
                "--rate", "0.9", "--trace", str(b)))
    import shutil
    same = root / "c1-copy.st"
    shutil.copyfile(a, same)  # a copy, not the file itself (a file compared with itself is refused)
    r = compare(a, same)
    assert r.returncode == 0 and r.stdout.strip().endswith("SAME")
    r = compare(a, b)
    assert r.returncode == 1 and r.stdout.strip().endswith("DIFFERENT")
    not_a_trace = root / "weights.st"
    save_file({"x": torch.zeros(2)}, str(not_a_trace))
    garbage = root / "garbage.st"
    garbage.write_bytes(b"\x00" * 50)
    for bad, needle in ((not_a_trace, "no 'input_ids' tensor"), (garbage, "is not a readable trace"),
                        (root / "missing.st", "does not exist")):
        r = compare(a, bad)
        assert r.returncode == 2, (bad, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_plot_without_matplotlib_says_how_to_install_it(files, tmp_path):
    root, w, img = files
    blocker = tmp_path / "block"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    out = tmp_path / "p.png"
    r = subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), "--image", img, "--prompt", "hi", "--weights",
                        w, "--plot", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stdout == "" and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install -e ".[plots]"' in lines[0], r.stderr


def test_plot_draws_a_labelled_figure(files):
    root, w, img = files
    out = root / "run.png"
    summary(run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "4", "--method", "dyrate-schedule",
                "--schedule", "0.3,0.6", "--plot", str(out)))
    with Image.open(out) as im:
        assert im.size[0] > 600 and im.size[1] > 400


def test_progress_counts_whole_units(capsys):
    from dyrate_ref.progress import Progress
    bar = Progress(18, "evaluating", " prompts", after_s=0.0)
    bar.update(2)
    bar.close()
    err = capsys.readouterr().err
    assert "2/18 prompts" in err and "2.0" not in err


def test_trace_rows_are_the_logits_each_token_was_chosen_from(files):
    """Row t of the trace's logits, against transformers' own forward over the prompt and the tokens
    before t (teacher forcing): a trace shifted by one step, or from another step's query, fails."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration
    root, w, img = files
    trace = root / "rows.st"
    summary(run("--image", img, "--prompt", "What is it?", "--weights", w, "--max-new-tokens", "6", "--trace", str(trace)))
    t = load_file(str(trace))
    hf = LlavaForConditionalGeneration.from_pretrained(w, attn_implementation="eager").eval()
    ids = torch.cat([t["input_ids"], t["tokens"][:-1]])[None]  # [1, P + T - 1]
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=t["pixel_values"]).logits[0, t["input_ids"].numel() - 1:]  # [T, V]
    assert want.shape == t["logits"].shape
    assert (want - t["logits"]).abs().max().item() <= 1e-4  # float32 rounding over a few layers
    assert torch.equal(t["logits"].argmax(1), t["tokens"])  # greedy: each token is its row's argmax


def test_a_failure_while_writing_leaves_no_partial_file_and_the_old_one_untouched(tmp_path, monkeypatch):
    import dyrate_ref.trace as trace_module
    target = tmp_path / "t.safetensors"
    target.write_bytes(b"the user's file")

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a trace")
        raise OSError("disk full")
    monkeypatch.setattr(trace_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trace_module.write_trace(str(target), {"tokens": torch.zeros(2, dtype=torch.long)}, {"prompt": "x"})
    assert target.read_bytes() == b"the user's file"
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]


def test_cli_sampling_flags_take_effect(files):
    root, w, img = files
    def answer(*extra):
        r = run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "12", *extra)
        assert r.returncode == 0, r.stderr
        return r.stdout
    hot = ("--temperature", "5")
    assert answer(*hot, "--seed", "1") == answer(*hot, "--seed", "1")  # same seed, same answer
    assert answer(*hot, "--seed", "1") != answer(*hot, "--seed", "2")  # 12 draws over ~300 tokens at T=5
    greedy = answer()
    assert answer("--temperature", "1", "--top-p", "1e-9", "--seed", "5") == greedy  # the nucleus is the top token


def test_progress_into_a_pipe_is_one_final_line_in_mb(capsys):
    """Into a pipe or a log file the bar does not redraw itself with carriage returns: one line when the
    job ends; and a 29 MB load is counted in MB, not as 0.0/0.0 GB."""
    from dyrate_ref.progress import Progress
    bar = Progress(29e6, "loading weights", bytes_=True, after_s=0.0)
    for _ in range(29):
        bar.update(1e6)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1, repr(err)
    assert "29.0/29.0 MB" in err, err
    big = Progress(3e9, "x", bytes_=True, after_s=0.0)
    big.update(1.5e9)
    big.close()
    assert "1.5/3.0 GB" in capsys.readouterr().err


def test_progress_into_a_log_writes_a_line_every_few_seconds_with_rate_and_eta(capsys, monkeypatch):
    """A 50-minute job piped into a log must not be silent until it ends: a line every every_s seconds
    (count, rate, time left), then the final one."""
    from dyrate_ref import progress
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    bar = progress.Progress(100, "evaluating", " prompts", after_s=0.0, every_s=10.0)
    for _ in range(40):  # 40 prompts, one every 1.5 s: 60 s
        clock[0] += 1.5
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.strip().split("\n")
    assert "\r" not in "".join(lines) and 6 <= len(lines) <= 7, lines  # every 10 s of 60, and the final one
    assert "7/100 prompts" in lines[0] and "0.67 prompts/s" in lines[0], lines[0]  # 7 done at 10.5 s
    assert "ETA 2m20s" in lines[0], lines[0]  # 93 left at 1.5 s each
    assert lines[-1].startswith("evaluating [############") and "40/100 prompts 1m00s" in lines[-1]


def test_unknown_prompt_characters_are_named(files):
    root, w, img = files
    r = run("--image", img, "--prompt", "Qué es ☃?", "--weights", w, "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "2 character(s) of the prompt are not in the model's vocabulary (é☃)" in r.stderr, r.stderr


def test_plot_titles_name_the_end_of_the_answer():
    """A panel at the EOS step says so, instead of showing ('')."""
    from dyrate_ref.plots import token_label

    class Proc:
        stop_ids = {2}
    assert token_label("", 2, Proc()) == "end of answer"
    assert token_label(" red", 7, Proc()) == "red"
    assert token_label(" ", 8, Proc()) == "' '"


def test_a_small_checkpoint_runs_on_one_thread_unless_told(tmp_path):
    """generate.py's default threads are the fast ones for the model at hand: one for a checkpoint under
    cli.SMALL_MODEL bytes (torch's default, one per core, is slower on a busy machine for so small a
    model); --threads N is kept as given."""
    from dyrate_ref.cli import SMALL_MODEL, run
    from helpers import hf_config, make_checkpoint
    d = tmp_path / "w"
    make_checkpoint(str(d), hf_config())
    assert sum(f.stat().st_size for f in d.glob("*.safetensors")) < SMALL_MODEL
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(img)
    args = ["--weights", str(d), "--image", str(img), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert run(args) == 0 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert run(args + ["--threads", "2"]) == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_thread_rule_reads_the_weights_size_only(tmp_path, monkeypatch):
    """One documented rule, no guess at the machine's load: one thread for weights under
    cli.SMALL_MODEL bytes, torch's default (left as it is) from there on, both sides of the edge. The
    run's wiring: the same checkpoint counted as small runs on one thread, counted as large leaves torch's
    threads alone."""
    from dyrate_ref import cli
    from helpers import hf_config, make_checkpoint
    assert cli.default_threads(11_600_000) == 1 and cli.default_threads(cli.SMALL_MODEL - 1) == 1
    assert cli.default_threads(cli.SMALL_MODEL) is None and cli.default_threads(760_000_000) is None
    d = tmp_path / "w"
    make_checkpoint(str(d), hf_config())
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(img)
    args = ["--weights", str(d), "--image", str(img), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    before = torch.get_num_threads()
    try:
        for small, want in ((10 ** 12, 1), (1, 2)):  # the same weights counted as small, then as large
            monkeypatch.setattr(cli, "SMALL_MODEL", small)
            torch.set_num_threads(2)
            assert cli.run(args) == 0 and torch.get_num_threads() == want, small
    finally:
        torch.set_num_threads(before)
