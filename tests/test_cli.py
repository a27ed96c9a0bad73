"""generate.py (cli.py) as a user runs it: a good run streams an answer (through a pipe, as it is generated)
and writes a trace; every bad input, the pruning flags' and predictor files' included, exits 2 with one
line on stderr, no traceback, and leaves no file behind; and what a newcomer meets
(why generation stopped, default settings and where they came from, file modes, identical runs giving
identical files, the plot, the thread rule)."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dyrate_ref.generation import generate
from dyrate_ref.loading import load_model
from dyrate_ref.processing import Processor
from helpers import generate_run, hf_config, make_checkpoint, noise_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=None, umask=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    w = root / "weights"
    make_checkpoint(str(w), hf_config(text=dict(max_position_embeddings=160)))
    img = root / "img.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(img)
    return root, str(w), str(img)


def variant(root, w, name, edit):
    """A copy of the checkpoint directory with one thing broken."""
    d = root / name
    if not d.exists():
        shutil.copytree(w, d)
        edit(str(d))
    return str(d)


def test_good_run_streams_and_writes_trace(files):
    root, w, img = files
    trace = root / "run.safetensors"
    r = run("--image", img, "--prompt", "What color is it?", "--weights", w, "--max-new-tokens", "6",
            "--trace", str(trace), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    t = load_file(str(trace))
    model = load_model(w)
    proc = Processor(w, model.config)
    ids = proc.input_ids("What color is it?")
    gen = generate(model, ids, proc.pixel_values(Image.open(img)), max_new_tokens=6, stop_ids=proc.stop_ids)
    assert t["tokens"].tolist() == gen.tokens
    assert t["input_ids"].tolist() == ids.tolist()
    T, N, V = len(gen.tokens), model.config.num_image_tokens, model.config.text_config.vocab_size
    assert t["logits"].shape == (T, V) and t["logits"].dtype == torch.float32
    assert t["kept_masks"].shape == (T, N) and bool(t["kept_masks"].all())
    assert t["pixel_values"].shape == (1, 3, 32, 32)
    assert r.stdout.strip() == proc.decode(gen.tokens).strip()
    assert not [p for p in os.listdir(root) if p.endswith(".tmp")]


def test_the_answer_streams_through_a_pipe_as_it_is_generated(tmp_path):
    """The first text reaches a pipe long before the process ends, in many pieces, each valid UTF-8:
    an answer buffered until the end arrives in one piece. The answer is forced (--force-tokens) to the
    tokens of a text full of multi-byte characters, split across tokens by this byte-level vocabulary,
    so the precondition holds by construction, not by what a random model happens to say."""
    from dyrate_ref.trace import write_trace
    root, w, img = tmp_path, str(tmp_path / "w"), str(tmp_path / "img.png")
    make_checkpoint(w, hf_config(text=dict(max_position_embeddings=256)))  # room for 200 answer tokens
    noise_image(48, 40, seed=3).save(img)
    proc = Processor(w, load_model(w).config)
    text = "東京 café über ñandú 日本語 " * 12
    tokens = proc.tokenizer.encode(text, add_special_tokens=False).ids[:200]
    assert any("\ufffd" in proc.decode([i]) for i in tokens)  # characters really are split across tokens
    forced = root / "forced.st"
    write_trace(str(forced), {"input_ids": proc.input_ids("Hi"), "tokens": torch.tensor(tokens)}, {})
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "generate.py"), "--image", img, "--prompt", "Hi",
                          "--weights", w, "--force-tokens", str(forced), "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pieces = []  # (arrival time, bytes)
    while True:
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        pieces.append((time.perf_counter(), chunk))
    end = time.perf_counter()
    err = p.stderr.read().decode()
    assert p.wait() == 0, err
    assert f"{len(tokens)} tokens" in err, err
    print(f"{len(pieces)} pieces over {end - pieces[0][0]:.3f} s")
    assert len(pieces) >= 10, f"{len(pieces)} pieces: the answer did not stream"
    assert end - pieces[0][0] > 0.05  # the first piece came well before the end
    for _, chunk in pieces:
        chunk.decode("utf-8")  # strict: a piece ending inside a character would raise
    assert b"".join(c for _, c in pieces).decode("utf-8").strip() == proc.decode(tokens).strip()


def _truncate(d):
    p = os.path.join(d, "model.safetensors")
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])


def _wrong_shape(d):
    from safetensors.torch import save_file
    p = os.path.join(d, "model.safetensors")
    state = load_file(p)
    state["multi_modal_projector.linear_2.bias"] = torch.zeros(7)
    save_file(state, p)


def _only_pickle(d):
    os.remove(os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        f.write(b"not read")


def _write(name, content):
    def edit(d):
        with open(os.path.join(d, name), "w") as f:
            f.write(content)
    return edit


BAD_WEIGHTS = {
    "no-config": (lambda d: os.remove(os.path.join(d, "config.json")), "config.json"),
    "config-not-json": (_write("config.json", "{not json"), "not valid JSON"),
    "truncated": (_truncate, "truncated"),
    "wrong-shape": (_wrong_shape, "shape"),
    "only-pickle": (_only_pickle, "pickle"),
    "no-tokenizer": (lambda d: os.remove(os.path.join(d, "tokenizer.json")), "tokenizer.json"),
}


def bad_images(root):
    empty = root / "empty.png"
    empty.write_bytes(b"")
    text = root / "notes.png"
    text.write_text("this is not a picture")
    good = root / "img.png"
    cut = root / "cut.png"
    noise_image(200, 200, seed=1, sigma=60).save(root / "noise.png")
    cut.write_bytes((root / "noise.png").read_bytes()[:3000])
    bomb = root / "bomb.png"
    if not bomb.exists():  # 182 M pixels, over 2x Pillow's limit; 1-bit so it is small on disk
        Image.new("1", (13000, 14000)).save(bomb)
    warn = root / "bomb-warn.png"
    if not warn.exists():  # 100 M pixels: between 1x and 2x, where Pillow only warns
        Image.new("1", (10000, 10000)).save(warn)
    return {"missing": (str(root / "nope.png"), "does not exist"), "directory": (str(root), "directory"),
            "empty": (str(empty), "empty"), "not-an-image": (str(text), "not an image"),
            "truncated": (str(cut), "truncated"), "bomb": (str(bomb), "decompression-bomb"),
            "bomb-warning": (str(warn), "decompression-bomb"), "_good": (str(good), ""),
            # the kernel lists 0 bytes for it, yet reading it fails: unreadable, not empty
            "unreadable": ("/proc/self/mem", "cannot be read")}


def check_refused(r, needle, leftovers=()):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    assert r.stdout == ""
    for p in leftovers:
        assert not os.path.exists(p), p


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_bad_weights(files, case):
    root, w, img = files
    edit, needle = BAD_WEIGHTS[case]
    d = variant(root, w, case, edit)
    trace = root / f"trace-{case}.safetensors"
    r = run("--image", img, "--prompt", "hi", "--weights", d, "--trace", str(trace))
    check_refused(r, needle, [trace])


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "not-an-image", "truncated", "bomb", "bomb-warning",
                                  "unreadable"])
def test_bad_images(files, case):
    root, w, _ = files
    path, needle = bad_images(root)[case]
    trace = root / f"trace-img-{case}.safetensors"
    check_refused(run("--image", path, "--prompt", "hi", "--weights", w, "--trace", str(trace)), needle, [trace])


ARGS = {
    "weights-missing": (["--weights", "/nonexistent/dir"], "does not exist"),
    "two-images": (["--prompt", "<image> and <image>"], "<image>"),
    "prompt-too-long": (["--prompt", "word " * 200], "context"),
    "max-new-tokens-0": (["--max-new-tokens", "0"], "max-new-tokens"),
    "dtype": (["--dtype", "float64"], "dtype"),
    "trace-folder": (["--trace", "/nonexistent/folder/t.safetensors"], "does not exist"),
    "trace-is-dir": (["--trace", "/tmp"], "directory"),
    "device": (["--device", "tpu"], "device"),
    "unknown-flag": (["--frobnicate"], "unrecognized"),
    "not-a-number": (["--max-new-tokens", "many"], "invalid int"),
    "empty-prompt": (["--prompt", "  "], "empty"),
    "threads-0": (["--threads", "0"], "--threads"),
    "plot-not-png": (["--plot", "/tmp/x.jpg"], ".png"),
    "top-p-without-temperature": (["--top-p", "0.5"], "no effect"),
    "seed-without-temperature": (["--seed", "3"], "no effect"),
    "top-p-out-of-range": (["--top-p", "1.5", "--temperature", "1"], "top-p"),
}


@pytest.mark.parametrize("case", sorted(ARGS))
def test_bad_arguments(files, case):
    root, w, img = files
    extra, needle = ARGS[case]
    base = {"--image": img, "--prompt": "hi", "--weights": w}
    for i in range(0, len(extra) - 1, 2):
        if extra[i] in base:
            base[extra[i]] = extra[i + 1]
    args = [x for kv in base.items() for x in kv] + [x for i in range(0, len(extra), 2) if extra[i] not in base
                                                    for x in extra[i:i + 2]]
    check_refused(run(*args), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device cuda is valid here")
def test_cuda_without_cuda(files):
    root, w, img = files
    check_refused(run("--image", img, "--prompt", "hi", "--weights", w, "--device", "cuda"), "CUDA")


def test_failed_run_leaves_existing_trace_untouched(files):
    root, w, img = files
    trace = root / "keep-me.safetensors"
    trace.write_bytes(b"user's precious file")
    r = run("--image", str(root / "nope.png"), "--prompt", "hi", "--weights", w, "--trace", str(trace))
    assert r.returncode == 2
    assert trace.read_bytes() == b"user's precious file"


def test_missing_weights_flag_says_so_plainly(files, tmp_path):
    root, w, img = files
    # run from a copy of generate.py whose package has no embedded weights next to it
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "dyrate_ref"), repo / "dyrate_ref")
    shutil.copy(os.path.join(REPO, "generate.py"), repo / "generate.py")
    r = subprocess.run([sys.executable, str(repo / "generate.py"), "--image", img, "--prompt", "hi"],
                       capture_output=True, text=True, cwd=repo, timeout=120)
    check_refused(r, "--weights")


# ----------------------------------------------------------------------------------------------------
# What a newcomer meets: why generation stopped, the methods' default settings, file modes, identical runs
# giving identical files, `python -m dyrate_ref`, `trace compare`'s exit codes, the plot, the thread rule.


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """4 decoder layers, a 64-token context: 16 visual tokens + the prompt."""
    root = tmp_path_factory.mktemp("small")
    w = root / "weights"
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


def test_stop_reason_max_new_tokens_and_context(small):
    root, w, img = small
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


def test_vtw_defaults_to_the_calibrated_layer_and_says_so(small):
    root, w, img = small
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


def test_summary_names_every_methods_settings(small):
    root, w, img = small
    line = summary(run("--image", img, "--prompt", "hi", "--weights", w, "--method", "fastv", "--max-new-tokens", "2"))
    assert "method fastv K=2 R=0.5 score=last (K, R, score: default)" in line, line
    line = summary(run("--image", img, "--prompt", "hi", "--weights", w, "--method", "fastv", "--rate", "0.25",
                       "--max-new-tokens", "2"))
    assert "method fastv K=2 R=0.25 score=last (K, score: default; R: flag)" in line, line
    line = summary(run("--image", img, "--prompt", "hi", "--weights", w, "--method", "dyrate-schedule", "--schedule", "0.2,0.4",
                       "--max-new-tokens", "2"))
    assert "method dyrate-schedule K=2 schedule=0.2,0.4 score=last (K, score: default; schedule: flag)" in line, line


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(small, umask):
    root, w, img = small
    trace = root / f"mode-{umask:o}.st"
    summary(run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "2", "--trace", str(trace),
                umask=umask))
    assert stat.S_IMODE(os.stat(trace).st_mode) == 0o666 & ~umask


def test_identical_runs_write_identical_traces(small):
    root, w, img = small
    for name in ("x.st", "y.st"):
        summary(run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "3", "--trace", str(root / name)))
    assert (root / "x.st").read_bytes() == (root / "y.st").read_bytes()


def test_module_entry_point_names_itself():
    r = subprocess.run([sys.executable, "-m", "dyrate_ref", "--help"], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m dyrate_ref"), r.stdout[:80]


def compare(a, b):
    return subprocess.run([sys.executable, "-m", "dyrate_ref.tools.trace", "compare", str(a), str(b)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_trace_compare_exit_codes(small):
    root, w, img = small
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


def test_plot_without_matplotlib_says_how_to_install_it(small, tmp_path):
    root, w, img = small
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


def test_plot_draws_a_labelled_figure(small):
    root, w, img = small
    out = root / "run.png"
    summary(run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "4", "--method", "dyrate-schedule",
                "--schedule", "0.3,0.6", "--plot", str(out)))
    with Image.open(out) as im:
        assert im.size[0] > 600 and im.size[1] > 400


def test_trace_rows_are_the_logits_each_token_was_chosen_from(small):
    """Row t of the trace's logits, against transformers' own forward over the prompt and the tokens
    before t (teacher forcing): a trace shifted by one step, or from another step's query, fails."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration
    root, w, img = small
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


def test_cli_sampling_flags_take_effect(small):
    root, w, img = small
    def answer(*extra):
        r = run("--image", img, "--prompt", "hi", "--weights", w, "--max-new-tokens", "12", *extra)
        assert r.returncode == 0, r.stderr
        return r.stdout
    hot = ("--temperature", "5")
    assert answer(*hot, "--seed", "1") == answer(*hot, "--seed", "1")  # same seed, same answer
    assert answer(*hot, "--seed", "1") != answer(*hot, "--seed", "2")  # 12 draws over ~300 tokens at T=5
    greedy = answer()
    assert answer("--temperature", "1", "--top-p", "1e-9", "--seed", "5") == greedy  # the nucleus is the top token


def test_unknown_prompt_characters_are_named(small):
    root, w, img = small
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
        run(args)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        run(args + ["--threads", "2"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_thread_rule_reads_the_weights_size_only(tmp_path, monkeypatch):
    """One documented rule, no guess at the machine's load: one thread for weights under
    cli.SMALL_MODEL bytes, torch's default (left as it is) from there on, both sides of the edge. The
    run's wiring: the same checkpoint counted as small runs on one thread, counted as large leaves torch's
    threads alone."""
    from dyrate_ref import cli
    from helpers import hf_config, make_checkpoint
    d = tmp_path / "w"
    make_checkpoint(str(d), hf_config())
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(img)
    args = ["--weights", str(d), "--image", str(img), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    before = torch.get_num_threads()
    try:
        for small, want in ((size + 1, 1), (size, 2)):  # just under the edge (small), then at it (large)
            monkeypatch.setattr(cli, "SMALL_MODEL", small)
            torch.set_num_threads(2)
            cli.run(args)
            assert torch.get_num_threads() == want, small
    finally:
        torch.set_num_threads(before)


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
def test_bad_pruning_values(pruning_env, case):
    root, w, img, *_ = pruning_env
    extra, needle = BAD[case]
    r = generate_run(w, img, *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and needle in lines[0], r.stderr


@pytest.mark.parametrize("which,needle", [("other", "another model"), ("corrupt", "not a readable")])
def test_bad_predictor_files(pruning_env, which, needle):
    root, w, img, pred, other_pred, corrupt, _ = pruning_env
    r = generate_run(w, img, "--method", "dyrate", "--predictor", other_pred if which == "other" else corrupt)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
