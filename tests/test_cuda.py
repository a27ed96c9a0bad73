"""GPU checks (pytest -m cuda). Skipped, with the reason, on machines without CUDA.

Tolerances: in fp16/bf16 the two implementations round at different places (our grouped-query matmul
shapes, fused vs separate ops), so their gap is of the order of the format's own error. We bound it by
a multiple of transformers' own gap between its fp32 and reduced-precision runs on the same input:
max|ours - HF| <= 2 * max|HF_fp32 - HF_lowp| + 1e-3.
"""

import pytest
import torch
from PIL import Image

from dyrate_ref.generation import generate
from dyrate_ref.oracle import recompute_logits
from dyrate_ref.loading import load_model
from dyrate_ref.processing import Processor
from dyrate_ref.pruning import FastV, DyRateSchedule
from helpers import hf_config, make_checkpoint, noise_image

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cuda"))
    make_checkpoint(d, hf_config(text=dict(num_hidden_layers=4, num_key_value_heads=2, max_position_embeddings=4096)))
    return d


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_logits_vs_hf_on_gpu(ckpt, dtype):
    from transformers import LlavaForConditionalGeneration
    proc = Processor(ckpt, load_model(ckpt).config)
    ids = proc.input_ids("What is in the picture?")
    px = proc.pixel_values(noise_image(64, 48, seed=1, sigma=40))
    hf32 = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").cuda().eval()
    hf = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager", dtype=dtype).cuda().eval()
    model = load_model(ckpt, dtype=dtype, device="cuda")
    with torch.no_grad():
        ref32 = hf32(input_ids=ids[None].cuda(), pixel_values=px.cuda()).logits[0].float()
        ref = hf(input_ids=ids[None].cuda(), pixel_values=px.cuda().to(dtype)).logits[0].float()
        got = model(ids[None].cuda(), px.cuda())[0].float()
    hf_gap = (ref32 - ref).abs().max().item()
    assert (got - ref).abs().max().item() <= 2 * hf_gap + 1e-3
    ours = generate(model, ids, px, 8).tokens
    theirs = hf.generate(input_ids=ids[None].cuda(), pixel_values=px.cuda().to(dtype), max_new_tokens=8,
                         min_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids)[None].cuda())
    assert ours[:4] == theirs[0, ids.numel():].tolist()[:4]  # first greedy steps identical


def test_pruned_decode_vs_oracle_fp16(ckpt):
    model = load_model(ckpt, dtype=torch.float16, device="cuda")
    proc = Processor(ckpt, model.config)
    ids = proc.input_ids("Describe it.")
    px = proc.pixel_values(noise_image(40, 40, seed=2, sigma=40))
    for prune in (FastV(2, 0.5), DyRateSchedule(2, (0.0, 0.3, 0.6, 0.9))):
        gen = generate(model, ids, px, 10, prune)
        oracle = recompute_logits(model, ids, px, gen.tokens, torch.stack(gen.record.kept_masks), 2)
        got = torch.stack(gen.record.logits)
        assert (got - oracle).abs().max().item() <= 2e-2  # fp16: ~10 ulp at logit magnitudes of ~5


def test_no_nan_over_a_2000_token_prompt_fp16(ckpt):
    model = load_model(ckpt, dtype=torch.float16, device="cuda")
    proc = Processor(ckpt, model.config)
    ids = proc.input_ids("word " * 2000)
    assert ids.numel() > 2000
    gen = generate(model, ids, proc.pixel_values(Image.new("RGB", (32, 32))), 4, DyRateSchedule(2, (0.5,)))
    assert torch.isfinite(torch.stack(gen.record.logits)).all()
