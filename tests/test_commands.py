"""What every command shares (commands.py), as users meet it: paths and files as they give them (relative
--weights from another working directory for every command that takes it, a relative folder that looks
like a hub id, a hub cache without refs/main, the identity a resumable results file keeps under relative
paths, what a predictor file records when every flag is left at its default), and the progress line (whole
units, into a pipe or a log, its rate and long durations)."""

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from dyrate_ref.loading import resolve_weights
from helpers import hf_config, hub_cache, make_checkpoint, noise_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """work/ckpt (a tiny checkpoint, 3 layers), work/data/d.jsonl (two items, images named relative to
    the file), and an empty sibling folder elsewhere/ to run from."""
    root = tmp_path_factory.mktemp("user")
    make_checkpoint(str(root / "work" / "ckpt"), hf_config())
    data = root / "work" / "data"
    data.mkdir()
    for i in range(2):
        noise_image(32, 32, seed=30 + i).save(data / f"{i}.png")
    (data / "d.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "prompt": "What is it?", "answer": "x",
                                                      "id": f"q{i}"}) + "\n" for i in range(2)))
    (root / "elsewhere").mkdir()
    return root


def run(cwd, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


COMMANDS = {  # every command that takes --weights, run from elsewhere/ with ../work/ckpt
    "generate.py": [os.path.join(REPO, "generate.py"), "--image", "../work/data/0.png", "--prompt", "What is it?",
                    "--max-new-tokens", "2", "--trace", "t.safetensors"],
    "evaluate": ["-m", "dyrate_ref.tools.evaluate", "--data", "../work/data/d.jsonl", "--max-new-tokens", "2",
                 "--only-extra", "--extra", "fastv:layer=1", "--results", "r.jsonl", "--bootstrap", "2"],
    "premise": ["-m", "dyrate_ref.tools.premise", "--data", "../work/data/d.jsonl", "--layer", "1", "--steps", "0",
                "--fractions", "0.5", "--max-new-tokens", "2"],
    "calibrate_vtw": ["-m", "dyrate_ref.tools.calibrate_vtw", "--data", "../work/data/d.jsonl", "--max-new-tokens", "2",
                      "--min-layer", "1", "--out", "v.json"],
    "train_predictor": ["-m", "dyrate_ref.tools.train_predictor", "--data", "../work/data/d.jsonl",
                        "--out", "p.safetensors"],  # every other flag at its default (test below)
    "bench": ["-m", "dyrate_ref.tools.bench", "loading"],
    "hf_backend": [os.path.join(REPO, "examples", "hf_backend.py"), "--image", "../work/data/0.png", "--prompt", "hi",
                   "--max-new-tokens", "2", "--out", "b.safetensors"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_takes_a_relative_weights_path_from_another_folder(work, name):
    r = run(work / "elsewhere", *COMMANDS[name], "--weights", "../work/ckpt")
    assert r.returncode == 0, r.stderr[-2000:]
    if name == "generate.py":
        with safe_open(str(work / "elsewhere" / "t.safetensors"), "pt") as f:
            assert f.metadata()["weights"] == str(work / "work" / "ckpt")  # the folder itself, not the path typed


def test_a_results_file_resumes_from_another_folder_through_another_relative_path(work):
    """The results file names its weights and data by absolute path: the same run continued from work/
    (--weights ckpt, --data data/d.jsonl) reuses every record instead of refusing or starting over."""
    first = run(work / "elsewhere", *COMMANDS["evaluate"], "--weights", "../work/ckpt")
    assert first.returncode == 0, first.stderr
    lines = (work / "elsewhere" / "r.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["weights"] == str(work / "work" / "ckpt")
    again = run(work / "work", "-m", "dyrate_ref.tools.evaluate", "--data", "data/d.jsonl", "--max-new-tokens", "2",
                "--only-extra", "--extra", "fastv:layer=1", "--results", "../elsewhere/r.jsonl", "--bootstrap", "2",
                "--weights", "ckpt")
    assert again.returncode == 0, again.stderr
    assert (work / "elsewhere" / "r.jsonl").read_text().splitlines() == lines  # nothing run again, nothing added
    keys = [(json.loads(x)["method"], json.loads(x)["id"]) for x in lines[1:]]
    assert len(keys) == len(set(keys)) and {i for _, i in keys} == {"q0", "q1"} and len({m for m, _ in keys}) >= 2


def test_a_relative_folder_that_looks_like_a_hub_id_is_the_folder(work, tmp_path, monkeypatch):
    """`weights/dyrate-shapes` has the shape of a hub id (owner/name); where such a folder exists under
    the working directory it is that folder, even when the hub cache holds a model of that name."""
    hub_cache(tmp_path / "hub", "weights/dyrate-shapes", str(work / "work" / "ckpt"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    local = tmp_path / "here" / "weights" / "dyrate-shapes"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    assert resolve_weights("weights/dyrate-shapes") == "weights/dyrate-shapes"
    monkeypatch.chdir(tmp_path)  # no such folder here: the hub cache's copy
    assert resolve_weights("weights/dyrate-shapes").startswith(str(tmp_path / "hub"))


def test_a_hub_cache_with_two_snapshots_and_no_refs_main_gives_the_newest(work, tmp_path, monkeypatch):
    """Without refs/main the newest snapshot by time is taken, not the first or last by name: here
    "zzzz" (older) and "aaaa" (newer)."""
    repo = hub_cache(tmp_path / "hub", "someone/two", str(work / "work" / "ckpt"), revisions=("zzzz", "aaaa"),
                     main="aaaa")
    (repo / "refs" / "main").unlink()
    os.utime(repo / "snapshots" / "zzzz", (1_000_000, 1_000_000))
    os.utime(repo / "snapshots" / "aaaa", (2_000_000, 2_000_000))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_weights("someone/two") == str(repo / "snapshots" / "aaaa")
    os.utime(repo / "snapshots" / "zzzz", (3_000_000, 3_000_000))
    assert resolve_weights("someone/two") == str(repo / "snapshots" / "zzzz")


def test_the_progress_line_in_mb_per_second_and_over_an_hour(capsys, monkeypatch):
    """Bytes: 120 of 500 MB after 8 s is 15.0 MB/s, and 380 MB left at that rate is 25.33 s: "ETA 25s".
    Units: 1 of 100 after 61 s leaves 99 x 61 = 6,039 s: "ETA 1h40m" (1 h 40 min 39 s, minutes not
    rounded up); after 3,725 s the elapsed time reads "1h02m"."""
    from dyrate_ref import commands as progress
    clock = [0.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    bar = progress.Progress(500e6, "loading weights", bytes_=True, after_s=0.0)
    clock[0] = 8.0
    bar.update(120e6)
    assert bar.last == "loading weights [#######                       ] 120.0/500.0 MB 8s 15.0 MB/s ETA 25s"
    slow = progress.Progress(100, "evaluating", " prompts", after_s=0.0)
    clock[0] += 61.0
    slow.update(1)
    assert slow.last.endswith("1/100 prompts 1m01s 0.02 prompts/s ETA 1h40m"), slow.last
    clock[0] += 3725.0 - 61.0
    slow.update(1)
    assert " 2/100 prompts 1h02m " in slow.last, slow.last
    capsys.readouterr()


def test_a_predictor_trained_with_every_flag_at_its_default_records_the_defaults(work):
    """train_predictor with only --weights, --data and --out (the run above): the file records the
    defaults the help states -- K 2, confidence 0.7 (and the DAgger rounds at that confidence), margin
    1.0, 2 rounds, 300 epochs at lr 0.05, seed 0, linear -- and the folder it was trained on by name."""
    path = work / "elsewhere" / "p.safetensors"
    if not path.exists():
        r = run(work / "elsewhere", *COMMANDS["train_predictor"], "--weights", "../work/ckpt")
        assert r.returncode == 0, r.stderr
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    want = {"layer": "2", "confidence": "0.7", "rollout_confidence": "0.7", "margin": "1.0", "rounds": "2",
            "epochs": "300", "lr": "0.05", "seed": "0", "hidden": "0", "objective": "imitation", "examples": "2",
            "trained_on": "ckpt", "data": "../work/data/d.jsonl"}
    assert {k: meta.get(k) for k in want} == want


@pytest.mark.parametrize("tool", ["evaluate", "premise"])
def test_the_tools_name_prompt_characters_outside_the_vocabulary(work, tool):
    """generate.py's out-of-vocabulary note, for a data file: one line on stderr saying how many prompts,
    which characters and the first such item; a file without such characters gets none."""
    data = work / "work" / "data" / f"oov_{tool}.jsonl"
    data.write_text(json.dumps({"image": "0.png", "prompt": "What is it?", "answer": "x", "id": "plain"}) + "\n"
                    + json.dumps({"image": "1.png", "prompt": "Qué es ☃?", "answer": "x", "id": "snow"}) + "\n")
    args = [a if a != "../work/data/d.jsonl" else str(data) for a in COMMANDS[tool]]
    args = [a for a in args if a not in ("--results", "r.jsonl")]
    r = run(work / "elsewhere", *args, "--weights", "../work/ckpt")
    assert r.returncode == 0, r.stderr
    notes = [x for x in r.stderr.splitlines() if "not in the model's vocabulary" in x]
    assert notes == ["note: 1 of 2 prompts have characters not in the model's vocabulary (é☃), the first item snow; "
                     "the model never saw them in training, so its answers may ignore them"], r.stderr
    clean = run(work / "elsewhere", *[a for a in COMMANDS[tool] if a not in ("--results", "r.jsonl")],
                "--weights", "../work/ckpt")
    assert clean.returncode == 0 and "vocabulary" not in clean.stderr, clean.stderr


def test_bench_threads_refuses_a_json_over_what_it_reads(work):
    """bench threads reads the checkpoint and the embedded example picture: --json over either is refused
    before any timing, with one line."""
    from dyrate_ref.loading import DEFAULT_WEIGHTS
    picture = os.path.join(DEFAULT_WEIGHTS, "examples", "scene1.png")
    for target in (picture, "../work/ckpt/config.json"):
        r = run(work / "elsewhere", "-m", "dyrate_ref.tools.bench", "threads", "--weights", "../work/ckpt", "--json", target)
        assert r.returncode == 2 and "would overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_progress_counts_whole_units(capsys):
    from dyrate_ref.commands import Progress
    bar = Progress(18, "evaluating", " prompts", after_s=0.0)
    bar.update(2)
    bar.close()
    err = capsys.readouterr().err
    assert "2/18 prompts" in err and "2.0/" not in err and "/18.0" not in err  # (the rate may hold "2.0" by chance)


def test_progress_into_a_pipe_is_one_final_line_in_mb(capsys):
    """Into a pipe or a log file the bar does not redraw itself with carriage returns: one line when the
    job ends; and a 29 MB load is counted in MB, not as 0.0/0.0 GB."""
    from dyrate_ref.commands import Progress
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
    from dyrate_ref import commands as progress
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
