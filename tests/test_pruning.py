"""FastV, VTW and DyRate: the cached, evicting decode loop against a no-cache masked recompute; the
identities between methods; kept sets against attention computed by transformers; counted FLOPs
against FlopCounterMode; KV bytes against the cache's real tensors."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dyrate_ref.cost import flops_per_step, kv_bytes_per_step
from dyrate_ref.generation import decode_one_token, generate, prefill, sample, Sampling
from dyrate_ref.oracle import recompute_logits
from dyrate_ref.loading import load_model
from dyrate_ref.processing import Processor
from dyrate_ref.pruning import VTW, DyRateSchedule, FastV, NoPruning, kept_count, query_scores
from helpers import hf_config, make_checkpoint, noise_image

T_NEW = 10


@pytest.fixture(scope="module", params=["mha", "gqa"])
def tiny(request, tmp_path_factory):
    """5-layer text model, 16 visual tokens (default strategy) or 17 with CLS (full, on the GQA one)."""
    d = str(tmp_path_factory.mktemp(request.param))
    gqa = request.param == "gqa"
    cfg = hf_config(text=dict(num_hidden_layers=5, num_key_value_heads=2 if gqa else 4),
                    vision_feature_select_strategy="full" if gqa else "default")
    make_checkpoint(d, cfg)
    from transformers import LlavaForConditionalGeneration
    hf = LlavaForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    model = load_model(d)
    proc = Processor(d, model.config)
    img = noise_image(48, 40, seed=1, sigma=50)
    return model, proc, proc.input_ids("What is shown here?"), proc.pixel_values(img), hf


METHODS = {
    "none": NoPruning(),
    "fastv-last": FastV(2, 0.5),
    "fastv-mean": FastV(3, 0.75, score="mean"),
    "vtw": VTW(2),
    "dyrate-rising": DyRateSchedule(2, (0.0, 0.2, 0.3, 0.5, 0.7, 0.9)),
    "dyrate-k1": DyRateSchedule(1, (0.1, 0.6)),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_cached_pruned_decode_equals_masked_recompute(tiny, name):
    """Tolerance 1e-5 in fp32: eviction vs masking changes only which (zero-weight) terms are summed."""
    model, _, ids, px, _ = tiny
    prune = METHODS[name]
    gen = generate(model, ids, px, T_NEW, prune)
    keep = torch.stack(gen.record.kept_masks)  # [T, N]
    oracle = recompute_logits(model, ids, px, gen.tokens, keep, min(prune.layer, 5))
    got = torch.stack(gen.record.logits)
    assert (got - oracle).abs().max().item() <= 1e-5
    if name != "none":  # pruning really changed the computation (else the test proves little)
        plain = torch.stack(generate(model, ids, px, T_NEW, force=gen.tokens).record.logits)
        assert (plain - got).abs().max().item() > 1e-3


def _same(a, b, tol=1e-6):
    assert a.tokens == b.tokens
    assert (torch.stack(a.record.logits) - torch.stack(b.record.logits)).abs().max().item() <= tol
    assert torch.equal(torch.stack(a.record.kept_masks), torch.stack(b.record.kept_masks))


def test_identities(tiny):
    model, _, ids, px, _ = tiny
    N = model.config.num_image_tokens
    none = generate(model, ids, px, T_NEW)
    _same(generate(model, ids, px, T_NEW, FastV(2, 0.0)), none)
    _same(generate(model, ids, px, T_NEW, DyRateSchedule(2, (0.0,))), none)
    _same(generate(model, ids, px, T_NEW, VTW(3)),
          generate(model, ids, px, T_NEW, DyRateSchedule(3, (1.0,))))
    r = 0.25 if N == 16 else 1 - 13 / 17  # (1-r)N must be an integer: 12 of 16, or 13 of 17
    _same(generate(model, ids, px, T_NEW, DyRateSchedule(2, (r,))),
          generate(model, ids, px, T_NEW, FastV(2, r)))


def _hf_layer_scores(hf, ids, px, tokens, K, span):
    """Layer K-1 attention of every row over the visual tokens, head-averaged, from transformers'
    eager attention on the unpruned full sequence (layers < K are never pruned). -> [rows, N]."""
    seq = torch.cat([ids, torch.tensor(tokens[:-1], dtype=torch.long)])
    with torch.no_grad():
        out = hf(input_ids=seq[None], pixel_values=px, output_attentions=True)
    start, n = span
    return out.attentions[K - 1][0, :, :, start:start + n].float().mean(0)  # [rows, N]


def test_fastv_keeps_top_scores_by_hf_attention(tiny):
    model, _, ids, px, hf = tiny
    N = model.config.num_image_tokens
    start = int((ids == model.config.image_token_index).nonzero()[0])
    for R in (0.25, 0.5, 0.8):
        gen = generate(model, ids, px, 3, FastV(2, R))
        scores = _hf_layer_scores(hf, ids, px, gen.tokens, 2, (start, N))[ids.numel() - 1]  # last prompt query
        want = set(scores.topk(int(round((1 - R) * N))).indices.tolist())
        for row in gen.record.kept_masks:
            assert set(row.nonzero().squeeze(1).tolist()) == want


def test_fastv_mean_scores_use_queries_after_the_image(tiny):
    model, _, ids, px, hf = tiny
    N = model.config.num_image_tokens
    start = int((ids == model.config.image_token_index).nonzero()[0])
    gen = generate(model, ids, px, 2, FastV(2, 0.5, score="mean"))
    rows = _hf_layer_scores(hf, ids, px, gen.tokens, 2, (start, N))[start + N:ids.numel()]  # [P_after, N]
    want = set(rows.mean(0).topk(int(round(0.5 * N))).indices.tolist())
    assert set(gen.record.kept_masks[0].nonzero().squeeze(1).tolist()) == want


def test_dyrate_sets_are_nested_with_stated_sizes_and_survivors(tiny):
    model, _, ids, px, hf = tiny
    N = model.config.num_image_tokens
    start = int((ids == model.config.image_token_index).nonzero()[0])
    rates = (0.1, 0.1, 0.35, 0.2, 0.6, 0.6, 0.85)
    gen = generate(model, ids, px, T_NEW, DyRateSchedule(2, rates))
    scores = _hf_layer_scores(hf, ids, px, gen.tokens, 2, (start, N))  # [rows, N]
    prev = set(range(N))
    for t, row in enumerate(gen.record.kept_masks):
        r = rates[min(t, len(rates) - 1)]
        kept = set(row.nonzero().squeeze(1).tolist())
        assert len(kept) == min(len(prev), N - math.floor(r * N + 0.5 + 1e-9))  # dropped count rounded half up
        assert kept <= prev
        s = scores[ids.numel() - 1 + t]
        ranked = sorted(prev, key=lambda i: -float(s[i]))
        assert kept == set(ranked[:len(kept)])
        assert gen.record.rates[t] == 1 - len(kept) / N  # the share dropped, not the schedule's nominal r
        prev = kept
    assert len(prev) < N


def test_the_recorded_rate_is_the_share_dropped_not_the_nominal_setting():
    """DyRateSchedule(2, (0.9, 0.5)) keeps 14 of 144 at step 0 and, the sets being nested, still 14 at step
    1: the rate recorded there is 1 - 14/144 = 0.903, not the schedule's 0.5. FastV R = 0.4 on 5 tokens
    keeps 3 (the dropped count rounded half up): the rate is 0.4 exactly; on 7 it keeps 4, rate 3/7."""
    scores = torch.linspace(0, 1, 144)
    keep = DyRateSchedule(2, (0.9, 0.5)).choose(0, torch.arange(144), scores)
    assert keep.numel() == 14
    assert DyRateSchedule(2, (0.9, 0.5)).choose(1, keep, scores).numel() == 14
    assert FastV(rate=0.4).choose(0, torch.arange(5), scores[:5]).numel() == 3
    assert FastV(rate=0.4).choose(0, torch.arange(7), scores[:7]).numel() == 4


def test_generate_records_one_minus_kept_over_n_for_every_method(tiny):
    model, _, ids, px, _ = tiny
    N = model.config.num_image_tokens
    for method in (NoPruning(), FastV(2, 0.3), VTW(2), DyRateSchedule(2, (0.9, 0.5)), DyRateSchedule(2, (0.33, 0.7))):
        gen = generate(model, ids, px, 4, method)
        kept = [int(row.sum()) for row in gen.record.kept_masks]
        assert gen.record.rates == [1 - k / N for k in kept], method
    gen = generate(model, ids, px, 3, DyRateSchedule(2, (0.9, 0.5)))
    assert gen.record.rates[1] == gen.record.rates[0] > 0.5  # nested: the nominal 0.5 cannot grow the set back


def test_keep_functions_by_hand():
    scores = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3])
    assert FastV(rate=0.4).choose(0, torch.arange(5), scores).tolist() == [1, 3, 4]  # 5-2=3 best, ascending
    assert FastV(rate=0.4).choose(3, torch.tensor([1, 3]), scores).tolist() == [1, 3]  # only step 0 chooses
    assert DyRateSchedule(2, (0.8,)).choose(1, torch.tensor([1, 3, 4]), scores).tolist() == [3]  # 5-4=1
    assert DyRateSchedule(2, (0.0,)).choose(2, torch.tensor([1, 3]), scores).tolist() == [1, 3]  # never grows back
    assert VTW(2).choose(0, torch.arange(5), scores).numel() == 0
    # the one rounding rule: the dropped count rounded half up (0.5*5 = 2.5 -> 3 dropped; 0.7*10 is 7)
    assert [kept_count(5, 0.5), kept_count(10, 0.7), kept_count(144, 0.9), kept_count(4, 0.125)] == [2, 3, 14, 3]
    probs = torch.zeros(1, 2, 3, 6)
    probs[0, 0, -1, 1:4] = torch.tensor([0.2, 0.4, 0.1])
    probs[0, 1, -1, 1:4] = torch.tensor([0.0, 0.2, 0.3])
    assert torch.allclose(query_scores(probs, (1, 3))[-1], torch.tensor([0.1, 0.3, 0.2]))


@pytest.mark.parametrize("name", ["none", "fastv-last", "dyrate-rising", "vtw"])
def test_flops_match_flop_counter_and_kv_bytes_match_tensors(tiny, name):
    model, _, ids, px, _ = tiny
    prune = METHODS[name]
    cfg = model.config
    tc = cfg.text_config
    from dyrate_ref.generation import Record
    rec = Record(cfg, 4)
    counted = []
    with FlopCounterMode(display=False) as fc:
        logits, state = prefill(model, ids, px, prune, rec)
    counted.append(fc.get_total_flops())
    sizes = [state.kept.numel()]
    for _ in range(T_NEW - 1):
        token = sample(logits, Sampling(), None)
        with FlopCounterMode(display=False) as fc:
            logits = decode_one_token(model, token, state, prune, rec)
        counted.append(fc.get_total_flops())
        sizes.append(state.kept.numel())
    # Exact: cost.py's formulas count every matmul FlopCounterMode sees, vision tower included.
    assert flops_per_step(rec) == counted
    # KV bytes from first principles: layers < K hold every token, layers >= K lose the evicted ones.
    P, N, K, L = ids.numel(), cfg.num_image_tokens, state.K, tc.num_hidden_layers
    per_slot = 2 * tc.num_key_value_heads * tc.head_dim * 4  # k and v, fp32
    for t, (kv, kept) in enumerate(zip(kv_bytes_per_step(rec), sizes)):
        want = K * (P + t) * per_slot + (L - K) * (P - (N - kept) + t) * per_slot
        assert kv == want
    assert kv_bytes_per_step(rec)[-1] == sum(x.numel() * x.element_size() for x in state.cache.k + state.cache.v)
