"""Every command refuses bad input before any work: exit status 2, one line on stderr, no traceback, and
nothing left behind or overwritten. A table of mistakes per command, each run through the command's own
main() (the exit path a user sees), on a tiny checkpoint where weights are needed."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dyrate_ref import cli
from dyrate_ref.tools import bench, calibrate_vtw, evaluate, premise, trace, train_predictor
from dyrate_ref.demo import export as demo_export, train as demo_train
from helpers import hf_config, make_checkpoint


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    w = root / "w"
    make_checkpoint(str(w), hf_config(text=dict(num_hidden_layers=4)))
    make_checkpoint(str(root / "w2"), hf_config(text=dict(num_hidden_layers=2)))  # too shallow for K = 2
    t = root / "t.safetensors"
    save_file({"input_ids": torch.arange(5), "tokens": torch.tensor([1, 2]), "logits": torch.zeros(2, 8)}, str(t))
    (root / "r.json").write_text(json.dumps({"choices": [{"logprobs": {"content": []}}]}))
    (root / "nolog.json").write_text(json.dumps({"choices": [{"text": "x"}]}))
    (root / "text.txt").write_text("not a trace")
    (root / "dir").mkdir()
    (root / "data.jsonl").write_text("not json\n")
    from helpers import noise_image
    noise_image(32, 32, seed=1).save(root / "a.png")
    good = json.dumps({"image": "a.png", "prompt": "What is it?", "answer": "x"})
    (root / "good.jsonl").write_text(good + "\n")
    (root / "two.jsonl").write_text(good + "\n" + json.dumps({"image": "a.png", "prompt": "<image> a <image> b",
                                                              "answer": "x"}) + "\n")
    (root / "long.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "word " * 900, "answer": "x"}) + "\n")
    for name, entry in (("nolp", {"token": "token_id:5"}), ("strlp", {"token": "token_id:5", "logprob": "high"})):
        (root / f"{name}.json").write_text(json.dumps({"choices": [{"logprobs": {"content": [entry]}}]}))
    (root / "strids.json").write_text(json.dumps({"prompt_token_ids": "1 2 3", "choices": [{"logprobs": {
        "content": [{"token": "token_id:5", "logprob": -0.1}]}}]}))
    return root


def snapshot(root) -> dict:
    """Every file under root with a hash of its bytes."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def refused(main, argv, capsys, root):
    before = snapshot(root)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert snapshot(root) == before, "a refused command left or changed files"
    return err[0]


def cases(root):
    w, t, w2 = str(root / "w"), str(root / "t.safetensors"), str(root / "w2")
    img, folder = str(root / "a.png"), str(root / "dir")
    gen = ["--image", img, "--prompt", "hi", "--weights", w]
    return {
        "generate": (cli.main, [
            (gen + ["--trace", ""], "--trace is empty"),
            (gen + ["--temperature", "1", "--seed", "99999999999999999999999"], "--seed"),
            (gen + ["--threads", "100000"], "this machine's cores"),
            (["--image", img, "--prompt", "hi \udcff", "--weights", w], "not valid UTF-8"),
            (gen + ["--force-tokens", t, "--max-new-tokens", "3"], "no effect with --force-tokens"),
            (["--image", img, "--prompt", "hi", "--weights", "nobody-here/absent-model"], "local Hugging Face cache"),
            (gen + ["--trace", img], "would overwrite"),
            (gen + ["--trace", os.path.join(w, "new.safetensors")], "would overwrite"),
            (["--image", folder, "--prompt", "hi", "--weights", w], f"--image {folder} is a folder"),
            (gen + ["--force-tokens", folder], f"--force-tokens {folder} is a folder; give a trace file"),
            (gen + ["--force-tokens", "/nonexistent.st"], "--force-tokens /nonexistent.st does not exist"),
            (gen + ["--method", "dyrate", "--predictor", folder], f"{folder} is a folder; give a predictor file"),
            (["--image", img, "--prompt", "hi", "--weights", img], f"--weights {img} is a file, not a folder"),
            (["--image", img, "--prompt", "hi", "--weights", folder], f"--weights {folder} has no config.json"),
        ]),
        "premise": (premise.main, [
            (["--weights", w, "--plot", os.path.join(w, "x.png")], "would overwrite"),
            (["--weights", w, "--json", ""], "--json is empty"),
            (["--weights", w, "--data", str(root / "two.jsonl")], "line 2"),
            (["--weights", w, "--data", str(root / "long.jsonl")], "does not fit the model's context"),
            (["--weights", w, "--data", str(root / "good.jsonl"), "--json", str(root / "good.jsonl")], "would overwrite"),
            (["--weights", w, "--data", str(root / "good.jsonl"), "--plot", img], "would overwrite"),
            (["--weights", w, "--choice", "last"], "--choice"),
            (["--weights", w, "--fractions", "2"], "--fractions '2': every kept fraction must lie in [0, 1]"),
            (["--weights", w, "--steps", "-1"], "--steps '-1': every step must be >= 0"),
            (["--weights", w, "--kinds", "nothing"], "--kinds 'nothing': the scene answer kinds are"),
            (["--weights", w, "--data", str(root / "good.jsonl"), "--kinds", "look"], "a --data file's items are all used"),
            (["--weights", w, "--threads", "999"], "this machine's cores"),
            (["--weights", w, "--layer", "9"], "outside 1..3"),
            (["--weights", "nobody-here/absent-model"], "local Hugging Face cache"),
        ]),
        "evaluate": (evaluate.main, [
            (["--scenes", "0"], "positive number"),
            (["--scenes", "2", "--data", str(root / "data.jsonl")], "replaces the scenes"),
            (["--max-new-tokens", "0"], "at least 1"),
            (["--workers", "0"], "must lie in 1.."),
            (["--workers", "999"], "this machine's cores"),
            (["--scenes", "99999999999"], "at most"),
            (["--json", ""], "--json is empty"),
            (["--results", ""], "--results is empty"),
            (["--plot", ""], "--plot is empty"),
            (["--plot", img], "is a file, not a folder"),
            (["--data", ""], "--data is empty"),
            (["--data", str(root / "dir")], "is a folder"),
            (["--weights", w, "--data", str(root / "two.jsonl")], "line 2"),
            (["--weights", w, "--data", str(root / "long.jsonl")], "does not fit the model's context"),
            (["--weights", w, "--data", str(root / "good.jsonl"), "--json", str(root / "a.png")], "would overwrite"),
            (["--weights", w, "--json", os.path.join(w, "config.json")], "would overwrite"),
            (["--weights", w, "--json", os.path.join(w, "dyrate_predictor.safetensors")], "would overwrite"),
            (["--results", str(root / "dir")], "is a directory"),
            (["--json", "/nonexistent/x.json"], "does not exist"),
            (["--weights", w, "--extra", "fastv:layer=4"], "outside 1..3"),
            (["--weights", w, "--extra", "fastv:rate=2"], "outside [0, 1]"),
            (["--weights", w, "--extra", "nope:x=1"], "use NAME"),
            (["--weights", w, "--extra", "vtw:rate=0.5"], "does not apply"),
            (["--plot", "/nonexistent/figures"], "parent folder /nonexistent does not exist"),
            (["--weights", w, "--results", os.path.join(w, "model.safetensors")], "would overwrite"),
            (["--data", str(root / "data.jsonl"), "--weights", w], "line 1"),
            (["--weights", "/nonexistent"], "nonexistent"),
            (["--weights", w2], "a 2-layer decoder does not have"),
            (["--weights", w, "--extra", "fastv:layer=2:rate=0.5:score=mean"], "two rows are both 'FastV K=2 R=0.5 score=mean'"),
            (["--weights", w, "--extra", f"dyrate:predictor={folder}"], "is a folder; give a predictor file"),
        ]),
        "trace compare": (trace.main, [
            (["compare", t, t], "same file"),
            (["compare", t, str(root / "text.txt")], "BACKEND " + str(root / "text.txt") + " is not a readable trace"),
            (["compare", t, "/nonexistent.safetensors"], "BACKEND /nonexistent.safetensors does not exist"),
            (["compare", folder, t], f"ORACLE {folder} is a folder; give a trace file"),
            (["compare", t, t + "x", "--atol", "-1"], "--atol -1.0 must be"),
            (["compare", t, t + "x", "--max-kl", "nan"], "--max-kl nan must be"),
            (["compare", t, str(root / "text.txt"), "--top-k", "0"], "--top-k 0 must be at least 1"),
            (["compare", t, t, "--dtype", "float8"], "invalid choice"),
            (["compare", t], "required"),
        ]),
        "trace from-openai": (trace.main, [
            (["from-openai", "/nonexistent.json", "--input-ids-from", t, "--out", str(root / "o.st")], "does not exist"),
            (["from-openai", str(root / "text.txt"), "--input-ids-from", t, "--out", str(root / "o.st")],
             "is not JSON text"),
            (["from-openai", folder, "--input-ids-from", t, "--out", str(root / "o.st")], f"RESPONSE {folder} is a folder"),
            (["from-openai", str(root / "r.json"), "--input-ids-from", t, "--out", str(root / "dir")], "is a directory"),
            (["from-openai", str(root / "r.json"), "--input-ids-from", t, "--out", str(root / "r.json")], "would overwrite"),
            (["from-openai", str(root / "r.json"), "--input-ids-from", t, "--out", t], "would overwrite"),
            (["from-openai", str(root / "nolog.json"), "--input-ids-from", t, "--out", str(root / "o.st")], "logprobs"),
            (["from-openai", str(root / "r.json"), "--input-ids-from", t, "--out", "/nonexistent/o.st"], "does not exist"),
            (["from-openai", str(root / "r.json"), "--input-ids-from", "/nonexistent.st", "--out", str(root / "o.st")],
             "--input-ids-from /nonexistent.st does not exist"),
            (["from-openai", str(root / "nolp.json"), "--input-ids-from", t, "--out", str(root / "o.st")], "no 'logprob'"),
            (["from-openai", str(root / "strlp.json"), "--input-ids-from", t, "--out", str(root / "o.st")],
             "is not a log-probability"),
            (["from-openai", str(root / "strids.json"), "--input-ids-from", t, "--out", str(root / "o.st")],
             "prompt_token_ids is not a list"),
            (["from-openai", str(root / "r.json"), "--input-ids-from", t, "--out", ""], "--out is empty"),
        ]),
        "calibrate_vtw": (calibrate_vtw.main, [
            (["--weights", w, "--min-layer", "1", "--eta", "-1"], "--eta -1.0 must be"),
            (["--weights", w, "--min-layer", "1", "--eta", "nan"], "--eta nan must be"),
            (["--weights", w, "--min-layer", "0"], "outside 1..3"),
            (["--weights", w, "--min-layer", "4"], "outside 1..3"),
            (["--weights", w, "--min-layer", "1", "--max-new-tokens", "0"], "at least 1"),
            (["--weights", w, "--min-layer", "1", "--out", os.path.join(w, "config.json")], "would overwrite"),
            (["--weights", w, "--min-layer", "1", "--out", str(root / "dir")], "is a directory"),
            (["--weights", "/nonexistent"], "nonexistent"),
            (["--weights", w, "--min-layer", "1", "--data", str(root / "data.jsonl")], "line 1"),
            (["--weights", w, "--min-layer", "1", "--data", "scenes:0"], "at least one scene"),
            (["--weights", w, "--min-layer", "1", "--out", ""], "--out is empty"),
            (["--weights", w, "--min-layer", "1", "--data", str(root / "good.jsonl"), "--out", str(root / "good.jsonl")],
             "would overwrite"),
            (["--weights", w, "--min-layer", "1", "--data", str(root / "good.jsonl"), "--out", str(root / "a.png")],
             "would overwrite"),
        ]),
        "train_predictor": (train_predictor.main, [
            (["--weights", w, "--data", "scenes:2", "--out", str(root / "p.st"), "--margin", "-1"], "--margin"),
            (["--weights", w, "--data", "scenes:2", "--out", str(root / "p.st"), "--rounds", "0"], "--rounds"),
            (["--weights", w, "--data", "scenes:2", "--out", str(root / "p.st"), "--confidence", "1.5"], "--confidence 1.5 must lie in [0, 1]"),
            (["--weights", w, "--data", "scenes:2", "--out", str(root / "p.st"), "--layer", "0"], "outside 1..3"),
            (["--weights", w, "--data", "scenes:2", "--out", str(root / "p.st"), "--layer", "4"], "outside 1..3"),
            (["--weights", w, "--data", "scenes:2", "--out", os.path.join(w, "model.safetensors")], "would overwrite"),
            (["--weights", w, "--data", "scenes:2", "--out", "/nonexistent/p.st"], "does not exist"),
            (["--weights", w, "--data", "scenes:2", "--out", str(root / "p.st"), "--lr", "0"], "--lr"),
            (["--weights", w, "--data", "scenes:2", "--out", str(root / "p.st"), "--epochs", "0"], "--epochs"),
            (["--weights", w, "--data", "scenes:0", "--out", str(root / "p.st")], "at least one scene"),
            (["--weights", w, "--data", "scenes:2", "--out", ""], "--out is empty"),
            (["--weights", w, "--data", "scenes:2", "--out", str(root / "p.txt")], "name it FILE.safetensors"),
            (["--weights", w, "--data", str(root / "good.jsonl"), "--out", str(root / "good.jsonl")], "would overwrite"),
            (["--weights", w, "--data", str(root / "good.jsonl"), "--out", str(root / "a.png")], "would overwrite"),
            (["--weights", w, "--data", "scenes:2", "--heldout", str(root / "good.jsonl"), "--out",
              str(root / "good.jsonl")], "the --heldout file"),
            (["--weights", w, "--data", "scenes:2", "--heldout", "scenes:0", "--out", str(root / "p.st")],
             "--heldout 'scenes:0'"),
            (["--weights", w, "--data", "scenes:2", "--heldout", folder, "--out", str(root / "p.st")],
             f"--heldout {folder} is a folder"),
            (["--weights", img, "--data", "scenes:2", "--out", str(root / "p.st")], f"--weights {img} is a file"),
        ]),
        "demo.train": (demo_train.main, [
            (["--out", t], "already exists"),
            (["--out", ""], "empty"),
            (["--out", w], "already exists"),
            (["--out", str(root / "m"), "--recipe", "v3"], "invalid choice"),
            (["--out", str(root / "m"), "--eval-every", "-1"], "--eval-every"),
            (["--out", str(root / "m"), "--init", w, "--tower", w], "exclude each other"),
            (["--out", str(root / "m"), "--tower", "/nonexistent"], "nonexistent"),
            (["--out", str(root / "m"), "--minutes", "0"], "positive"),
            (["--out", w, "--tower", w], "already exists"),
            (["--out", "/nonexistent/m"], "does not exist"),
            (["--out", str(root / "m"), "--init", img], f"--init {img} is a file, not a folder"),
            (["--out", str(root / "m"), "--init", folder], f"--init {folder} has no config.json"),
            (["--out", str(root / "m"), "--tower", folder], f"--tower {folder} has no config.json"),
        ] + ([(["--out", str(root / "m"), "--device", "cuda"], "no CUDA device")] if not torch.cuda.is_available() else [])),
        "demo.export": (demo_export.main, [
            (["--out", str(root / "dir")], "already exists"),
            (["--out", t], "already exists"),
            (["--out", "/nonexistent/x"], "does not exist"),
            (["--out", str(root / "e"), "--scenes", "0"], "positive"),
            (["--out", ""], "--out is empty"),
            (["--out", str(root / "e"), "--scenes", "-3"], "positive"),
            (["--out", str(root / "e"), "--scenes", "abc"], "invalid int"),
            (["--out", str(root / "e"), "--foo"], "unrecognized"),
            ([], "required"),
        ]),
        "bench": (bench.main, [
            (["nope"], "invalid choice"),
            (["--shape", "huge"], "invalid choice"),
            (["--repeats", "0"], "at least 1"),
            (["--new-tokens", "0"], "at least 1"),
            (["--dtype", "float8"], "unknown dtype"),
            (["--threads", "0"], "must lie in 1.."),
            (["--weights", "/nonexistent"], "nonexistent"),
            (["--bandwidth", "-1"], "positive"),
            (["--threads", "100000"], "this machine's cores"),
            (["loading", "--prune"], "no effect"),
            (["overhead", "--prune"], "no effect"),
            (["--shape", "7b"], "a GPU's job"),
            (["--weights", w2, "--prune", "--repeats", "1", "--new-tokens", "2"], "a 2-layer decoder does not have"),
        ] + ([(["--device", "cuda"], "no CUDA device")] if not torch.cuda.is_available() else [])),
    }


COMMANDS = ["generate", "premise", "evaluate", "trace compare", "trace from-openai", "calibrate_vtw", "train_predictor", "demo.train",
            "demo.export", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_refuses_a_table_of_bad_inputs(env, command, capsys):
    main, table = cases(env)[command]
    assert len(table) >= 8
    for argv, needle in table:
        line = refused(main, argv, capsys, env)
        assert needle in line, (argv, line)
