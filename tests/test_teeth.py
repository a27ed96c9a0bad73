"""Tests with teeth, round 2: the behaviours a backend builder and a researcher rely on, each pinned so
that a realistic bug fails it (tests/mutants.py plants one per test and checks it is caught).

- `trace compare`: the KL's direction, a backend that stopped early, every --json value against an
  independent computation;
- bfloat16 on the CPU against transformers' bfloat16;
- preprocessing branches the photo tests do not reach, against CLIPImageProcessor;
- FastV's `mean` score values against transformers' attention;
- the predictor's features by hand on an example that tells a quantile's ends apart, and the shipped
  predictor's decisions recomputed from its file by hand;
- serving arithmetic with grouped-query attention, and KV bytes against a measured cache;
- the prompt template's literal text.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dyrate_ref.generation import generate
from dyrate_ref.loading import DEFAULT_WEIGHTS, load_model
from dyrate_ref.processing import ImageSettings, Processor, pixel_values
from dyrate_ref.pruning import visual_span
from dyrate_ref.trace import LIMITS, compare, write_trace
from helpers import hf_config, make_checkpoint, noise_image


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
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.trace", "compare", str(tmp_path / "a.st"), str(tmp_path / "b.st"),
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


# ----------------------------------------------------------------------------------------------------
# Low precision on the CPU


def test_bfloat16_logits_equal_transformers_bfloat16_on_the_cpu():
    """The demo model in bfloat16, ours against transformers' eager bfloat16, on the CPU where CI runs.
    Measured gap today: 0.0 (the same operations in the same order). Tolerance 0.02 logits: well under
    the ~0.1 that one reordered operation inside a norm (a mutant) moves them by, and far above the 0.0
    measured."""
    from transformers import LlavaForConditionalGeneration as HF
    from helpers import hf_processor
    model = load_model(DEFAULT_WEIGHTS, dtype=torch.bfloat16)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    img = Image.open(f"{DEFAULT_WEIGHTS}/examples/scene2.png")
    ids, px = proc.input_ids("Describe the image."), proc.pixel_values(img)
    hf = HF.from_pretrained(DEFAULT_WEIGHTS, attn_implementation="eager", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours = model(ids[None], px.to(torch.bfloat16))[0].float()  # [P, V]
        theirs = hf(input_ids=ids[None], pixel_values=px.to(torch.bfloat16)).logits[0].float()
    # the inputs are transformers' own: its processor makes the same ids and pixels from the same picture
    hf_inputs = hf_processor(DEFAULT_WEIGHTS, model.config)(images=img, text=proc.prompt_text("Describe the image."),
                                                            return_tensors="pt")
    assert hf_inputs["input_ids"][0].tolist() == ids.tolist()
    assert torch.allclose(hf_inputs["pixel_values"], px, atol=1e-6)
    gap = (ours - theirs).abs().max().item()
    assert gap <= 0.02, gap


# ----------------------------------------------------------------------------------------------------
# Preprocessing branches


def hf_pixels(img, settings):
    from transformers import CLIPImageProcessorPil
    return CLIPImageProcessorPil(**settings)(images=img, return_tensors="pt")["pixel_values"]


BASE = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": 3,
        "rescale_factor": 1 / 255, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


@pytest.mark.parametrize("settings, size", [
    ({**BASE, "do_resize": False}, (45, 37)),  # no resize: the crop alone
    ({**BASE, "do_resize": False}, (20, 13)),  # no resize, smaller than the crop: padded as HF pads
    ({**BASE, "do_center_crop": False, "size": {"shortest_edge": 31}}, (47, 33)),  # odd sizes, no crop
    (BASE, (17, 9)),  # smaller than the crop before the resize
    ({**BASE, "crop_size": {"height": 31, "width": 27}}, (63, 41)),  # odd, non-square crop
], ids=["no-resize", "no-resize-small", "no-crop-odd", "upscaled", "odd-crop"])
def test_preprocessing_branches_equal_transformers(settings, size):
    img = noise_image(*size, seed=sum(size))
    ours = pixel_values(img, ImageSettings.from_dict(settings))
    theirs = hf_pixels(img, settings)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------
# FastV's mean score: tests/test_scores.py


# ----------------------------------------------------------------------------------------------------
# The predictor


@pytest.mark.parametrize("N, tops, quantiles", [
    (20, (1, 2, 5, 10), (10, 2, 0)),  # (1 - 0.9)·20 is 1.9999999999999996 in floating point: still index 2
    (22, (2, 3, 6, 11), (11, 2, 0)),  # 0.05·22 = 1.1: the top 5 % share counts ceil(1.1) = 2 tokens
])
def test_predictor_features_by_hand(N, tops, quantiles):
    """N distinct scores 1..N: every feature by hand, on sizes that tell a quantile's ends apart and
    where p·N is not a whole number. The top-p share counts ceil(p·N) tokens; the f-quantile of the
    normalised scores is the floor((1-f)·N)-th largest (0-based)."""
    from dyrate_ref.predictor import FEATURES, predictor_features
    total = N * (N + 1) / 2
    scores = torch.tensor([float(i + 1) for i in range(N)]) / (2 * total)  # visual mass 0.5
    keep = torch.tensor([0, 5, N - 1])
    f = dict(zip(FEATURES, predictor_features(scores, keep, 7).tolist()))
    p = [(i + 1) / total for i in range(N)]
    desc = sorted(p, reverse=True)
    assert f["visual_mass"] == pytest.approx(0.5)
    assert f["entropy"] == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(N), rel=1e-5)
    for name, k in zip(("top5_mass", "top10_mass", "top25_mass", "top50_mass"), tops):
        assert f[name] == pytest.approx(sum(desc[:k]), rel=1e-5), name
    for name, i in zip(("q50", "q90", "q99"), quantiles):
        assert f[name] == pytest.approx(math.log1p(N * desc[i]), rel=1e-5), name
    assert f["qmax"] == pytest.approx(math.log1p(N * desc[0]), rel=1e-5)
    assert f["kept_mass"] == pytest.approx(p[0] + p[5] + p[N - 1], rel=1e-5)
    assert f["kept_fraction"] == pytest.approx(3 / N)
    assert f["is_prefill"] == 0.0 and f["log_step"] == pytest.approx(math.log(8))


@pytest.mark.parametrize("kind", ["describe", "look"])
def test_shipped_predictor_decisions_recomputed_by_hand(kind):
    """On scene 3, every step's cut of the shipped predictor, recomputed from its file with plain
    arithmetic (standardise, the linear layer, P(label >= a) >= confidence), equals what generate did:
    on the model's own description, and on a constructed look-then-reason trajectory (the scene's true
    description, then "So the star is green.", teacher-forced). The scores are the predictor's own rule's
    (its file's `score`), over the question's rows. What the shipped predictor does with them, as
    docs/evaluation.md says: it cuts at the prefill, where the FLOPs are."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file
    from dyrate_ref.predictor import CUTS, predictor_features
    from dyrate_ref.pruning import DyRate, kept_count, query_scores, step_scores
    from dyrate_ref.settings import Context, make_method
    from dyrate_ref.oracle import forward_no_cache
    model = load_model(DEFAULT_WEIGHTS)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    method, _ = make_method(DyRate, {}, Context(DEFAULT_WEIGHTS, 8, model.config))
    path = method.predictor.path
    w = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    c, K = float(meta["confidence"]), int(meta["layer"])
    img = Image.open(f"{DEFAULT_WEIGHTS}/examples/scene3.png")
    if kind == "describe":
        ids, px = proc.input_ids("Describe the image."), proc.pixel_values(img)
        gen = generate(model, ids, px, 40, method, stop_ids=proc.stop_ids, text=proc.text_rows(ids))
    else:
        examples = json.load(open(f"{DEFAULT_WEIGHTS}/examples/examples.json"))
        truth = next(e["description"] for e in examples if e["file"] == "scene3.png")
        assert "a green star" in truth  # so the answer below is the true one
        answer = proc.answer_ids(truth + " So the star is green.")
        ids, px = proc.input_ids("What color is the star? Look first."), proc.pixel_values(img)
        gen = generate(model, ids, px, len(answer), method, force=answer, text=proc.text_rows(ids))
    kept = [int(k.sum()) for k in gen.record.kept_masks]
    # Layers < K are never pruned: the no-cache forward gives every step's scores.
    _, probs = forward_no_cache(model, ids, px, gen.tokens, probs_of=(K - 1,))
    P, span = ids.numel(), visual_span(ids, model.config.image_token_index)
    prev = torch.arange(span[1])
    every = step_scores(query_scores(probs[K - 1], span), proc.text_rows(ids), P, len(gen.tokens), meta.get("score", "last"))
    for t in range(len(gen.tokens)):
        scores = every[t]  # [N]
        x = (predictor_features(scores, prev, t) - w["mean"]) / w["std"]
        logits = w["net.weight"] @ x + w["net.bias"]
        p = logits.softmax(0).tolist()
        a = max(i for i in range(len(CUTS)) if sum(p[i:]) >= c - 1e-6)
        m = kept_count(prev.numel(), CUTS[a])
        assert kept[t] == m, (t, kept, a)
        order = sorted(prev.tolist(), key=lambda i: -float(scores[i]))
        prev = torch.tensor(sorted(order[:m]), dtype=torch.long)
    assert kept[0] < span[1], kept


# ----------------------------------------------------------------------------------------------------
# Serving arithmetic with grouped-query attention


def test_serving_kv_bytes_with_grouped_query_attention_by_hand_and_measured(tmp_path):
    from dyrate_ref.cost import serving, serving_kv_bytes
    from dyrate_ref.model import TextConfig
    from dyrate_ref.pruning import FastV
    tc = TextConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    per_token_layer = 2 * 8 * 128 * 2  # k and v, 8 kv heads (not 32) x 128, fp16
    assert serving_kv_bytes(tc, 2, 576, 616, 0, 1.0) == 616 * 32 * per_token_layer
    assert serving_kv_bytes(tc, 2, 576, 616, 10, 0.5) == (626 * 32 - 288 * 30) * per_token_layer
    s = serving(tc, 2, 576, 616, 20, 1.0, weight_bytes=14e9, gpu_bytes=80e9, batch=64)
    assert s["bytes_per_step"] == 14e9 + 64 * 626 * 32 * per_token_layer
    # The same formula against a measured cache: a tiny GQA model's KV bytes after a FastV run.
    d = str(tmp_path / "w")
    make_checkpoint(d, hf_config(text=dict(num_hidden_layers=4, num_key_value_heads=1)))
    model = load_model(d)
    proc = Processor(d, model.config)
    ids, px = proc.input_ids("What is it?"), proc.pixel_values(noise_image(40, 40, seed=9))
    gen = generate(model, ids, px, 3, FastV(2, 0.5), force=[5, 6, 7])
    measured = sum(t.numel() * t.element_size() for t in gen.state.cache.k + gen.state.cache.v)
    small = model.config.text_config
    N = model.config.num_image_tokens
    kept = N - round(0.5 * N)
    # the cache after the last step holds the prompt and the tokens fed so far (T - 1 of them)
    want = serving_kv_bytes(small, 2, N, ids.numel(), len(gen.tokens) - 1, kept / N, element_size=4)
    assert measured == want == gen.record.kv_bytes[-1]


# ----------------------------------------------------------------------------------------------------
# The prompt template


def test_the_prompt_template_is_llava_15s_literal_text():
    from dyrate_ref.processing import PROMPT_TEMPLATE
    assert PROMPT_TEMPLATE == "USER: <image>\n{prompt} ASSISTANT:"  # llava-hf's LLaVA-1.5 model card
    proc = Processor(DEFAULT_WEIGHTS, load_model(DEFAULT_WEIGHTS).config)
    assert proc.prompt_text("What is it?") == "USER: <image>\nWhat is it? ASSISTANT:"
    assert proc.prompt_text("<image> here") == "USER: <image> here ASSISTANT:"  # a placed <image> is kept where it is
    ids = proc.input_ids("What is it?")
    N = proc.config.num_image_tokens
    want = proc.tokenizer.encode("USER: <image>\nWhat is it? ASSISTANT:").ids
    at = want.index(proc.image_token_id)
    assert ids.tolist() == want[:at] + [proc.image_token_id] * N + want[at + 1:]


def test_the_template_equals_a_shipped_chat_template(tmp_path):
    """Where a checkpoint ships a chat template (llava-hf's LLaVA-1.5 files do), transformers renders a
    one-image user turn to our literal text."""
    from transformers import AutoProcessor
    d = tmp_path / "w"
    make_checkpoint(str(d), hf_config(text=dict(num_hidden_layers=2)))
    # The chat template llava-hf's LLaVA-1.5 checkpoints ship (written by transformers' LLaVA conversion:
    # role in capitals and ': ', the images as '<image>\n', then each text and a space, then 'ASSISTANT:').
    template = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
                "{% else %}{{ message['role'].upper() + ': '}}{% endif %}"
                "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
                "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
                "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    proc = AutoProcessor.from_pretrained(str(d))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                                    add_generation_prompt=True)
    ours = Processor(str(d), load_model(str(d)).config).prompt_text("What is it?")
    assert text == ours


def test_serving_follows_the_schedule_maps_k_by_depth_and_sizes_the_batch_by_the_peak():
    """By hand, LLaVA-1.5-7B shapes (32 layers, 32 kv heads of 128, fp16: 0.5 MiB per token over the
    layers): a rate that grows over a 4-token answer, K mapped from an 8-layer model."""
    from dyrate_ref.cost import depth_matched_layer, serving_schedule
    from dyrate_ref.model import TextConfig
    assert [depth_matched_layer(k, 8, 32) for k in (1, 2, 4, 7)] == [4, 8, 16, 28]
    assert depth_matched_layer(1, 40, 32) == 1 and depth_matched_layer(39, 40, 32) == 31  # within 1..L-1
    tc = TextConfig()
    layer_token = 2 * 32 * 128 * 2  # k and v of one token in one layer, fp16
    K, N, P, T = 8, 576, 616, 4
    kept = [1.0, 0.5, 0.25]  # the last repeats: step 3 keeps a quarter too
    slots = [K * (P + t) + (32 - K) * (P - N * (1 - kept[min(t, 2)]) + t) for t in range(T)]
    per_step = [x * layer_token for x in slots]
    s = serving_schedule(tc, K, N, P, kept, T, weight_bytes=14e9, gpu_bytes=80e9, batch=64)
    assert s["kv_mean"] == pytest.approx(sum(per_step) / T)
    assert s["kv_peak"] == pytest.approx(per_step[0])  # the prefill, before the cuts, is the peak here
    assert s["bytes_per_step"] == pytest.approx(14e9 + 64 * sum(per_step) / T)
    assert s["max_batch"] == int((80e9 - 14e9) // per_step[0])
    # a mean-sized batch would be larger, and wrong: at step 0 every sequence holds the peak
    assert int((80e9 - 14e9) // s["kv_mean"]) > s["max_batch"]
