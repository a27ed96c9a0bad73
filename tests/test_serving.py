"""tools/serving.py: what pruning buys a server at LLaVA-1.5-7B's shapes (the analytic model behind the
evaluation's serving table), by hand, and its KV bytes against a measured cache."""

import pytest

from dyrate_ref.cost import kv_bytes_per_step
from dyrate_ref.generation import generate
from dyrate_ref.loading import load_model
from dyrate_ref.processing import Processor
from helpers import hf_config, make_checkpoint, noise_image


# ----------------------------------------------------------------------------------------------------
# Serving arithmetic with grouped-query attention


def test_serving_kv_bytes_with_grouped_query_attention_by_hand_and_measured(tmp_path):
    from dyrate_ref.tools.serving import serving, serving_kv_bytes
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
    assert measured == want == kv_bytes_per_step(gen.record)[-1]


def test_serving_follows_the_schedule_maps_k_by_depth_and_sizes_the_batch_by_the_peak():
    """By hand, LLaVA-1.5-7B shapes (32 layers, 32 kv heads of 128, fp16: 0.5 MiB per token over the
    layers): a rate that grows over a 4-token answer, K mapped from an 8-layer model."""
    from dyrate_ref.tools.serving import depth_matched_layer, serving_schedule
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


# ----------------------------------------------------------------------------------------------------
# The serving table: K mapped by depth, the kept schedule over the items that reach a step, the peak.

def test_depth_matched_layer_by_hand_at_two_depths():
    from dyrate_ref.tools.serving import depth_matched_layer
    assert depth_matched_layer(1, 8, 32) == 4 and depth_matched_layer(7, 8, 32) == 28  # 1/8 and 7/8 of 32
    assert depth_matched_layer(3, 7, 32) == 14  # 3/7 of 32 = 13.71: rounded, not truncated
    assert depth_matched_layer(2, 6, 32) == 11  # 10.67 -> 11
    assert depth_matched_layer(1, 64, 32) == 1 and depth_matched_layer(8, 8, 32) == 31  # kept inside 1..L-1


def test_the_serving_batch_comes_from_the_cache_peak_not_its_mean():
    from dyrate_ref.tools.serving import serving_kv_bytes, serving_schedule
    from dyrate_ref.model import TextConfig
    tc = TextConfig()
    # a schedule that prunes late: the cache is largest early, so the peak is at a step with all kept
    s = serving_schedule(tc, 4, 576, 616, [1.0, 1.0, 0.1], 8, 14e9, 80e9, 1)
    peak = max(serving_kv_bytes(tc, 4, 576, 616, t, 1.0 if t < 2 else 0.1) for t in range(8))
    mean = sum(serving_kv_bytes(tc, 4, 576, 616, t, 1.0 if t < 2 else 0.1) for t in range(8)) / 8
    assert s["kv_peak"] == peak and s["kv_mean"] == pytest.approx(mean)
    assert s["max_batch"] == int((80e9 - 14e9) // peak) < int((80e9 - 14e9) // mean)


def test_serving_arithmetic_by_hand():
    """LLaVA-1.5-7B (32 layers, 32 kv heads of 128, fp16): 0.5 MiB of KV per token in every layer."""
    from dyrate_ref.tools.serving import serving, serving_kv_bytes
    from dyrate_ref.model import TextConfig
    tc = TextConfig()  # HF's defaults are Llama-7B's shapes
    per_token = 2 * 32 * 32 * 128 * 2  # k and v, 32 layers, 32 heads x 128, 2 bytes
    assert serving_kv_bytes(tc, 2, 576, 616, 0, 1.0) == 616 * per_token
    # half the visual tokens gone from 30 of 32 layers: 288 slots fewer in each of them
    assert serving_kv_bytes(tc, 2, 576, 616, 10, 0.5) == (626 * 32 - 288 * 30) * per_token / 32 * 1
    s = serving(tc, 2, 576, 616, 20, 1.0, weight_bytes=14e9, gpu_bytes=80e9, batch=64)
    assert s["bytes_per_step"] == 14e9 + 64 * 626 * per_token
    assert s["max_batch"] == int((80e9 - 14e9) // (636 * per_token))
    assert serving(tc, 2, 576, 616, 20, 0.0, 14e9, 80e9, 64)["max_batch"] > s["max_batch"]
