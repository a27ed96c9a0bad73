"""generate.py as a user runs it: a good run streams an answer and writes a trace; every bad input
exits 2 with one line on stderr, no traceback, and leaves no file behind."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dyrate_ref.generation import generate
from dyrate_ref.loading import load_model
from dyrate_ref.processing import Processor
from helpers import hf_config, make_checkpoint, noise_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


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
