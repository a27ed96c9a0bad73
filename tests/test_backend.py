"""Checking a backend against the oracle (docs/backend.md, tools/trace.py): teacher forcing, the
comparison and its limits per dtype, `trace compare` on generate.py's own traces, top-k-only traces from
a serving engine, and the worked example with transformers as the backend under test, including a
deliberately broken one."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dyrate_ref.generation import generate
from dyrate_ref.loading import load_model
from dyrate_ref.processing import Processor, open_image
from dyrate_ref.pruning import FastV, NoPruning, DyRateSchedule
from dyrate_ref.tools.trace import LIMITS, compare, report_text
from dyrate_ref.trace import read_trace, trace_tensors, write_trace
from helpers import generate_run, hf_config, make_checkpoint, noise_image, python_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
from hf_backend import run_backend, to_topk  # noqa: E402

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("backend")
    w = root / "weights"
    make_checkpoint(str(w), hf_config(text=dict(num_hidden_layers=4, num_key_value_heads=2, max_position_embeddings=256)))
    img = root / "img.png"
    noise_image(48, 40, seed=3).save(img)
    return root, str(w), str(img)


def oracle(w, img, prune=NoPruning(), dtype=torch.float32, force=None, max_new_tokens=12):
    """dyrate_ref's trace tensors for the example's prompt (free, or forced with `force`)."""
    model = load_model(w, dtype=dtype)
    proc = Processor(w, model.config)
    ids, px = proc.input_ids(PROMPT), proc.pixel_values(open_image(img))
    gen = generate(model, ids, px.to(dtype), max_new_tokens, prune, stop_ids=proc.stop_ids, force=force)
    return trace_tensors(ids, px, gen.tokens, gen.record)


SETTINGS = {"none": (NoPruning(), {}),
            "fastv": (FastV(2, 0.5), dict(method="fastv", layer=2, rate=0.5)),
            "dyrate-schedule": (DyRateSchedule(2, (0.3, 0.5, 0.7)), dict(method="dyrate-schedule", layer=2, schedule=(0.3, 0.5, 0.7)))}


def test_forced_with_its_own_tokens_equals_free_decoding(files):
    root, w, img = files
    for prune, _ in SETTINGS.values():
        free = oracle(w, img, prune)
        forced = oracle(w, img, prune, force=free["tokens"].tolist())
        for name in ("tokens", "logits", "kept_masks", "rates", "flops", "kv_bytes"):
            assert torch.equal(free[name], forced[name]), name


@pytest.mark.parametrize("method", SETTINGS)
def test_transformers_backend_is_the_same_in_float32(files, method):
    """The worked example: transformers with its own kept sets through per-layer masks, then the oracle
    forced with its tokens; every check passes at float32's limits."""
    root, w, img = files
    prune, kw = SETTINGS[method]
    backend = run_backend(w, open_image(img), PROMPT, max_new_tokens=12, **kw)
    ours = oracle(w, img, prune, force=backend["tokens"].tolist())
    r = compare(ours, backend, LIMITS["float32"])
    assert r.same, report_text(r, "float32", LIMITS["float32"])
    assert len(r.steps) == backend["tokens"].numel() and r.not_checked == []
    # A serving engine's top-k-only trace of the same run compares too, with KL reported as not checked.
    r = compare(ours, to_topk(backend, 20), LIMITS["float32"])
    assert r.same and any("KL" in x for x in r.not_checked), report_text(r, "float32", LIMITS["float32"])


@pytest.mark.parametrize("method", ["fastv", "dyrate-schedule"])
def test_an_off_by_one_image_offset_is_different_and_the_first_bad_step_is_named(files, method):
    root, w, img = files
    prune, kw = SETTINGS[method]
    backend = run_backend(w, open_image(img), PROMPT, max_new_tokens=12, image_offset=1, **kw)
    ours = oracle(w, img, prune, force=backend["tokens"].tolist())
    r = compare(ours, backend, LIMITS["float32"])
    text = report_text(r, "float32", LIMITS["float32"])
    # The broken backend reports the right kept sets but attends to the patches beside them: the kept
    # sets agree at step 0, and its logits are what gives it away.
    assert r.steps[0]["keep_iou"] == 1.0, text
    assert not r.same and r.first_bad_step == 0 and "max |Δlogit|" in r.first_bad_reason, text
    assert r.steps[0]["delta"] > 100 * LIMITS["float32"].atol, text
    assert "first bad step: 0" in text and text.endswith("DIFFERENT")


def test_a_perturbed_top_k_trace_is_different(files):
    root, w, img = files
    backend = to_topk(run_backend(w, open_image(img), PROMPT, max_new_tokens=8), 5)
    ours = oracle(w, img, force=backend["tokens"].tolist(), max_new_tokens=8)
    assert compare(ours, backend, LIMITS["float32"]).same
    backend["topk_logprobs"] = backend["topk_logprobs"].clone()
    backend["topk_logprobs"][3, 1] += 1e-3  # one log-prob at step 3
    r = compare(ours, backend, LIMITS["float32"])
    assert not r.same and r.first_bad_step == 3 and "log-prob" in r.first_bad_reason


def test_low_precision_stays_aligned_past_the_first_divergent_token(files):
    """bfloat16 (CPU; float16 matmuls are as slow here) decoding freely drifts from the float32 oracle at
    some token; the oracle forced with the bfloat16 tokens lines up the whole answer, and it passes
    bfloat16's limits. Without forcing, only the steps up to the divergence are compared."""
    root, w, img = files
    prune = SETTINGS["fastv"][0]
    low = oracle(w, img, prune, dtype=torch.bfloat16, max_new_tokens=60)
    free = oracle(w, img, prune, max_new_tokens=60)
    T = low["tokens"].numel()
    first = int((free["tokens"][:T] != low["tokens"]).nonzero()[0])  # they do diverge (checked, not assumed)
    r = compare(free, low, LIMITS["bfloat16"])
    assert not r.same and len(r.steps) == first + 1 and any("--force-tokens" in n for n in r.notes)
    forced = oracle(w, img, prune, force=low["tokens"].tolist())
    r = compare(forced, low, LIMITS["bfloat16"])
    assert r.same and len(r.steps) == T > first + 1, report_text(r, "bfloat16", LIMITS["bfloat16"])
    # float32's limits would call this different: the limits are what tell precision from bugs.
    assert not compare(forced, low, LIMITS["float32"]).same


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_limits_hold_transformers_own_gap_with_room(files, dtype):
    """The documented limits, measured again: transformers in float32 against itself in low precision,
    teacher-forced over 60 tokens, uses at most a third of each continuous limit and half of the allowed
    top-1 / top-k misses (those are counts: one near-tie flip is 1/60). The float32 oracle at its own
    limits agrees with transformers: test_transformers_backend_is_the_same_in_float32."""
    from transformers import LlavaForConditionalGeneration
    root, w, img = files
    ref = oracle(w, img, max_new_tokens=60)
    T = ref["tokens"].numel()
    seq = torch.cat([ref["input_ids"], ref["tokens"][:-1]])[None]
    P = ref["input_ids"].numel()
    out = {}
    for name in ("float32", dtype):
        hf = LlavaForConditionalGeneration.from_pretrained(w, attn_implementation="eager", dtype=getattr(torch, name)).eval()
        with torch.no_grad():
            out[name] = hf(input_ids=seq, pixel_values=ref["pixel_values"].to(getattr(torch, name))).logits[0, P - 1:].float()
    a = {"input_ids": ref["input_ids"], "tokens": ref["tokens"], "logits": out["float32"]}
    b = {"input_ids": ref["input_ids"], "tokens": ref["tokens"], "logits": out[dtype]}
    lim = LIMITS[dtype]
    r = compare(a, b, lim)
    assert len(r.steps) == T
    c = r.checks
    assert c["max_delta"]["value"] <= lim.atol / 3 and c["max_kl"]["value"] <= lim.max_kl / 3
    assert c["mean_kl"]["value"] <= lim.mean_kl / 3
    assert 1 - c["top1"]["value"] <= (1 - lim.min_top1) / 2 and 1 - c["topk_overlap"]["value"] <= (1 - lim.min_topk) / 2
    # ... and the gap is real: float32's limits would not hold it.
    assert not compare(a, b, LIMITS["float32"]).same


def test_an_openai_response_becomes_a_partial_trace(files, tmp_path):
    root, w, img = files
    ours = oracle(w, img, max_new_tokens=6)
    lp = ours["logits"].log_softmax(-1)
    content = []
    for t, tok in enumerate(ours["tokens"].tolist()):
        vals, ids = lp[t].topk(4)
        content.append({"token": f"token_id:{tok}", "logprob": float(lp[t, tok]),
                        "top_logprobs": [{"token": f"token_id:{int(i)}", "logprob": float(v)} for v, i in zip(vals, ids)]})
    response = {"choices": [{"logprobs": {"content": content}}]}
    path = tmp_path / "response.json"
    path.write_text(json.dumps(response))
    oracle_path = tmp_path / "oracle.st"
    write_trace(str(oracle_path), ours, {"method": "none"})
    out = tmp_path / "backend.st"
    run = lambda *a: subprocess.run([sys.executable, "-m", "dyrate_ref.tools.trace", *a], capture_output=True, text=True, cwd=REPO)  # noqa: E731
    r = run("from-openai", str(path), "--input-ids-from", str(oracle_path), "--out", str(out))
    assert r.returncode == 0, r.stderr
    b = read_trace(str(out))
    assert torch.equal(b["tokens"], ours["tokens"]) and b["topk_ids"].shape == (6, 4)
    r = run("compare", str(oracle_path), str(out), "--json")
    assert r.returncode == 0, r.stdout
    report = json.loads(r.stdout)
    assert report["same"] and len(report["steps"]) == 6 and any("KL" in x for x in report["not_checked"])
    # With the prompt's ids in the response (vLLM's prompt_token_ids), --input-ids-from is not needed;
    # without either, one line says what to add.
    response["prompt_token_ids"] = ours["input_ids"].tolist()
    path.write_text(json.dumps(response))
    r = run("from-openai", str(path), "--out", str(tmp_path / "p.st"))
    assert r.returncode == 0, r.stderr
    assert torch.equal(read_trace(str(tmp_path / "p.st"))["input_ids"], ours["input_ids"])
    del response["prompt_token_ids"]
    path.write_text(json.dumps(response))
    r = run("from-openai", str(path), "--out", str(tmp_path / "q.st"))
    assert r.returncode == 2 and "add --input-ids-from" in r.stderr and not (tmp_path / "q.st").exists()
    # Token text instead of ids cannot be compared exactly: refused, exit 2, one line saying what to ask for.
    content[0]["token"] = " the"
    path.write_text(json.dumps(response))
    r = run("from-openai", str(path), "--input-ids-from", str(oracle_path), "--out", str(tmp_path / "x.st"))
    assert r.returncode == 2 and "return_tokens_as_token_ids" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.st").exists()


def test_force_tokens_from_another_prompt_is_refused(files, tmp_path):
    root, w, img = files
    other = tmp_path / "other.st"
    r = subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), "--image", img, "--prompt", "Something else?",
                        "--weights", w, "--max-new-tokens", "3", "--trace", str(other)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), "--image", img, "--prompt", PROMPT,
                        "--weights", w, "--force-tokens", str(other), "--trace", str(tmp_path / "no.st")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "another prompt" in r.stderr and r.stdout == ""
    assert not (tmp_path / "no.st").exists()


def test_the_example_backend_writes_a_readable_trace_with_the_usual_mode(files, tmp_path, capsys):
    """examples/hf_backend.py writes through the same atomic writer as generate.py: the usual file mode
    (0666 less the umask, not mkstemp's 0600), and no transformers loading bar on stderr."""
    from hf_backend import run
    root, w, img = files
    out = tmp_path / "bk.safetensors"
    old = os.umask(0o022)
    try:
        assert run(["--weights", w, "--image", img, "--prompt", PROMPT, "--max-new-tokens", "2", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o644
    assert read_trace(str(out))["tokens"].numel() == 2
    assert "Loading weights" not in capsys.readouterr().err


def test_the_example_backend_refuses_bad_input_and_never_overwrites_an_input(files, tmp_path, capsys):
    """Its --out equal to its --image or a file of the weights, a missing image, K or a rate out of
    range, a method's setting without that method (it would be ignored): exit 2, one line, and the
    inputs' bytes unchanged."""
    import hashlib
    from hf_backend import main
    root, w, img = files
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    before = {p: digest(p) for p in (img, os.path.join(w, "model.safetensors"), os.path.join(w, "config.json"))}
    base = ["--weights", w, "--image", img, "--prompt", PROMPT]
    for argv, needle in ((base + ["--out", img], "would overwrite"),
                         (base + ["--out", os.path.join(w, "model.safetensors")], "would overwrite"),
                         (["--weights", w, "--image", str(tmp_path / "none.png"), "--prompt", PROMPT, "--out",
                           str(tmp_path / "o.st")], "none.png"),
                         (base + ["--method", "fastv", "--layer", "9", "--out", str(tmp_path / "o.st")], "outside 1.."),
                         (base + ["--method", "dyrate-schedule", "--schedule", "0.5,x", "--out", str(tmp_path / "o.st")], "--schedule"),
                         (base + ["--method", "fastv", "--rate", "1.5", "--out", str(tmp_path / "o.st")], "[0, 1]"),
                         (base + ["--rate", "0.3", "--out", str(tmp_path / "o.st")], "add --method fastv"),
                         (base + ["--method", "fastv", "--schedule", "0.3", "--out", str(tmp_path / "o.st")],
                          "--schedule is a setting of --method dyrate-schedule"),
                         (base + ["--out", ""], "--out is empty"),
                         (["--weights", w, "--image", str(tmp_path), "--prompt", PROMPT, "--out", str(tmp_path / "o.st")],
                          f"--image {tmp_path} is a folder"),
                         (["--weights", img, "--image", img, "--prompt", PROMPT, "--out", str(tmp_path / "o.st")],
                          f"--weights {img} is a file")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], (argv, err)
    assert {p: digest(p) for p in before} == before and not (tmp_path / "o.st").exists()


def test_compare_says_when_the_methods_differ_and_when_top_k_is_capped(files, tmp_path):
    """Two traces whose headers name different methods (or settings) get a note saying a DIFFERENT verdict
    may be the methods'; equal methods, or a backend whose header names none, get none. --top-k 100 on a
    top-4 trace says the overlap is over the top 4."""
    root, w, img = files
    ours = oracle(w, img, max_new_tokens=4)
    fastv = oracle(w, img, FastV(2, 0.5), max_new_tokens=4)
    write_trace(str(tmp_path / "none.st"), ours, {"method": "none"})
    write_trace(str(tmp_path / "none2.st"), ours, {"method": "none"})
    write_trace(str(tmp_path / "fastv.st"), fastv, {"method": "fastv", "layer": "2", "rate": "0.5"})
    write_trace(str(tmp_path / "fastv3.st"), fastv, {"method": "fastv", "layer": "2", "rate": "0.3"})
    write_trace(str(tmp_path / "plain.st"), ours, {"source": "a backend"})
    write_trace(str(tmp_path / "top4.st"), to_topk(ours, 4), {"source": "a server"})

    def notes(a, b, *extra):
        r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.trace", "compare", str(tmp_path / a), str(tmp_path / b),
                            *extra], capture_output=True, text=True, cwd=REPO)
        assert r.returncode in (0, 1), r.stderr
        return [x for x in r.stdout.splitlines() if x.startswith("note:")]
    differ = notes("none.st", "fastv.st")
    assert any("methods differ (method none vs fastv, layer (none) vs 2, rate (none) vs 0.5)" in x for x in differ), differ
    assert any("methods differ (rate 0.5 vs 0.3)" in x for x in notes("fastv.st", "fastv3.st"))
    assert not any("methods differ" in x for x in notes("none.st", "none2.st") + notes("none.st", "plain.st"))
    assert any("over the top 4" in x for x in notes("none.st", "top4.st", "--top-k", "100"))
    assert not any("top-k" in x for x in notes("none.st", "top4.st", "--top-k", "3"))


def test_the_backend_docs_worked_example_runs_as_pasted_on_the_embedded_model(tmp_path):
    """docs/backend.md's three commands, exactly as printed but for /tmp (here the test's own folder):
    the example backend and generate.py agree on the whole answer (their defaults are the same, 128 new
    tokens, so the answer ends at EOS, not mid-sentence) and compare says SAME, exit 0."""
    import re
    import shlex
    doc = open(os.path.join(REPO, "docs", "backend.md"), encoding="utf-8").read()
    block = re.search(r"<!-- embedded-example -->\n```bash\n(.*?)```", doc, re.S).group(1)
    outputs = []
    for line in block.strip().splitlines():
        args = shlex.split(line.replace("/tmp/", f"{tmp_path}/"))
        assert args[0] == "python"
        r = subprocess.run([sys.executable] + args[1:], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (line, r.stderr)
        outputs.append(r)
    assert outputs[1].stdout.strip().endswith(".")  # a whole answer, not cut at 16 tokens
    assert "fed every token of --force-tokens" in outputs[1].stderr
    assert outputs[2].stdout.strip().endswith("SAME")
    forced = int(re.search(r"\[(\d+) tokens", outputs[1].stderr).group(1))
    assert f"{forced} steps compared" in outputs[2].stdout


def test_the_example_backends_defaults_are_generate_pys():
    """hf_backend.py's --max-new-tokens and --weights default to generate.py's: 128 and the embedded model."""
    from dyrate_ref import cli
    from dyrate_ref.commands import DEFAULT_WEIGHTS
    ours = cli.build_parser()
    r = subprocess.run([sys.executable, os.path.join(REPO, "examples", "hf_backend.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    text = " ".join(r.stdout.split())
    assert "--max-new-tokens" in text and "(default 128, as generate.py)" in text
    assert "default 128" in ours._option_string_actions["--max-new-tokens"].help
    assert "(default: the embedded model)" in text and DEFAULT_WEIGHTS in ours._option_string_actions["--weights"].help


def test_a_version_1_trace_is_read_with_todays_names(tmp_path):
    """Trace version 1 called kept_masks `visual_keep`: read_trace gives it today's name (a generate.py
    trace of version 1 and a backend's trace written to it alike), and `compare` lines it up against a
    version-2 trace of the same run."""
    from safetensors.torch import load_file as load, save_file
    from dyrate_ref.trace import FORMAT
    assert FORMAT == "dyrate_ref-trace-2"
    w = str(tmp_path / "w")
    make_checkpoint(w, hf_config())
    img = tmp_path / "x.png"
    noise_image(48, 40, seed=3).save(img)
    new = tmp_path / "new.safetensors"
    r = subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), "--weights", w, "--image", str(img),
                        "--prompt", "hi", "--max-new-tokens", "4", "--method", "fastv", "--rate", "0.5",
                        "--trace", str(new)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tensors = load(str(new))
    old = {("visual_keep" if k == "kept_masks" else k): v for k, v in tensors.items()}
    for header in ({"format": "dyrate_ref-trace-1"}, {}):  # generate.py's version 1, a backend's without a header
        path = tmp_path / f"old{len(header)}.safetensors"
        save_file(old, str(path), metadata=header)
        back = read_trace(str(path))
        assert "visual_keep" not in back and torch.equal(back["kept_masks"], tensors["kept_masks"])
        assert compare(read_trace(str(new)), back, LIMITS["float32"]).same


def _trace(tokens, logits, ids=None):
    ids = torch.arange(6) if ids is None else ids
    return {"input_ids": ids, "tokens": torch.tensor(tokens), "logits": torch.tensor(logits, dtype=torch.float32)}


# ----------------------------------------------------------------------------------------------------
# trace compare


def test_compare_reports_kl_of_oracle_to_backend_not_the_reverse():
    """Asymmetric distributions: KL(P || Q) and KL(Q || P) differ by far more than rounding; the report
    and the per-step limit use KL(oracle || backend), as documented."""
    p = [2.0, 0.0, -4.0]  # the oracle's logits
    q = [2.0, -1.0, 1.0]  # the backend's: puts mass where the oracle has almost none
    lp, lq = torch.tensor(p, dtype=torch.float64).log_softmax(0), torch.tensor(q, dtype=torch.float64).log_softmax(0)
    forward = float((lp.exp() * (lp - lq)).sum())
    reverse = float((lq.exp() * (lq - lp)).sum())
    assert abs(forward - reverse) > 0.1
    r = compare(_trace([0], [p]), _trace([0], [q]), LIMITS["float32"])
    assert r.steps[0]["kl"] == pytest.approx(forward, rel=1e-9)
    assert r.checks["max_kl"]["value"] == pytest.approx(forward, rel=1e-9)
    # A limit between the two: only the documented direction decides.
    limits = LIMITS["float32"].__class__(**{**LIMITS["float32"].__dict__, "atol": 10.0, "max_kl": (forward + reverse) / 2,
                                            "mean_kl": 10.0, "min_top1": 0.0, "min_topk": 0.0})
    assert compare(_trace([0], [p]), _trace([0], [q]), limits).same == (forward < reverse)


def test_a_backend_that_stopped_early_is_different():
    logits = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    oracle = _trace([0, 1, 2], logits)
    early = _trace([0, 1], logits[:2])  # a prefix: every compared step agrees exactly
    r = compare(oracle, early, LIMITS["float32"])
    assert not r.same and not r.checks["tokens"]["ok"]
    assert not compare(early, oracle, LIMITS["float32"]).same


def test_compare_json_values_equal_an_independent_computation(tmp_path):
    g = torch.Generator().manual_seed(0)
    T, V, N = 5, 11, 6
    a_logits, b_logits = torch.randn(T, V, generator=g), torch.randn(T, V, generator=g)
    tokens = a_logits.argmax(-1)
    keep_a, keep_b = torch.rand(T, N, generator=g) > 0.4, torch.rand(T, N, generator=g) > 0.4
    rates_a, rates_b = torch.rand(T, generator=g), torch.rand(T, generator=g)
    a = {"input_ids": torch.arange(7), "tokens": tokens, "logits": a_logits, "kept_masks": keep_a, "rates": rates_a}
    b = {"input_ids": torch.arange(7), "tokens": tokens, "logits": b_logits, "kept_masks": keep_b, "rates": rates_b}
    for name, t in (("a", a), ("b", b)):
        write_trace(str(tmp_path / f"{name}.st"), t, {})
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.trace", "compare", str(tmp_path / "a.st"), str(tmp_path / "b.st"),
                        "--json", "--top-k", "3"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    for t, step in enumerate(report["steps"]):
        pa, pb = a_logits[t].double().softmax(0), b_logits[t].double().softmax(0)
        assert step["kl"] == pytest.approx(float(sum(x * math.log(x / y) for x, y in zip(pa.tolist(), pb.tolist()))),
                                           rel=1e-9, abs=1e-12)
        assert step["delta"] == pytest.approx(max(abs(x - y) for x, y in zip(a_logits[t].tolist(), b_logits[t].tolist())))
        assert step["top1"] == (int(a_logits[t].argmax()) == int(b_logits[t].argmax()))
        top_a = set(sorted(range(V), key=lambda i: -float(a_logits[t, i]))[:3])
        top_b = set(sorted(range(V), key=lambda i: -float(b_logits[t, i]))[:3])
        assert step["topk_overlap"] == pytest.approx(len(top_a & top_b) / 3)
        sa, sb = set(keep_a[t].nonzero().flatten().tolist()), set(keep_b[t].nonzero().flatten().tolist())
        assert step["keep_iou"] == pytest.approx(len(sa & sb) / len(sa | sb) if sa | sb else 1.0)
        assert (step["kept_oracle"], step["kept_backend"]) == (len(sa), len(sb))
        assert step["rate_delta"] == pytest.approx(abs(float(rates_a[t]) - float(rates_b[t])), abs=1e-7)
    assert report["checks"]["max_kl"]["value"] == pytest.approx(max(s["kl"] for s in report["steps"]))
    assert report["checks"]["mean_kl"]["value"] == pytest.approx(sum(s["kl"] for s in report["steps"]) / T)


def test_trace_compare_same_and_different(pruning_env):
    root, w, img, *_ = pruning_env
    a, b, c = (str(root / f"{n}.safetensors") for n in "abc")
    assert generate_run(w, img, "--trace", a).returncode == 0
    assert generate_run(w, img, "--trace", b).returncode == 0
    assert generate_run(w, img, "--method", "fastv", "--rate", "0.75", "--trace", c).returncode == 0
    same = python_run("-m", "dyrate_ref.tools.trace", "compare", a, b)
    assert same.returncode == 0 and "SAME" in same.stdout
    assert safe_open(c, "pt").metadata()["rate"] == "0.75"
    diff = python_run("-m", "dyrate_ref.tools.trace", "compare", a, c)
    assert diff.returncode == 1 and "DIFFERENT" in diff.stdout
    assert "kept sets differ" in diff.stdout and "max |Δlogit|" in diff.stdout and "first bad step: 0" in diff.stdout
    # a backend off by a little: within a loose atol it passes, within the default it does not
    t = load_file(b)
    t["logits"] = t["logits"] + 1e-3
    from safetensors.torch import save_file
    d = str(root / "d.safetensors")
    save_file(t, d)
    assert python_run("-m", "dyrate_ref.tools.trace", "compare", a, d).returncode == 1
    assert python_run("-m", "dyrate_ref.tools.trace", "compare", a, d, "--atol", "1e-2").returncode == 0
