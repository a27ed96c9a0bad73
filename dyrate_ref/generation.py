"""Generation: prefill, decode_one_token, sample, generate.

The loop owns all state: the KV cache, the next position id (which after pruning is no longer the
cache length), the kept visual tokens, and the per-step record that becomes the trace. Each step runs
decoder layers [0, K), reads layer K-1's attention over the visual tokens, asks the pruning method what
to keep (pruning.choose_keep), evicts the rest from layers [K, L) of the cache, and runs layers [K, L).
With method "none" the same path runs and keeps everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cost import decoder_layer_flops, lm_head_flops, vision_flops
from .model import KVCache, LlavaForConditionalGeneration
from .pruning import PruneSettings, choose_keep, visual_scores, visual_span


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class State:
    """Everything that changes from one step to the next."""
    cache: KVCache
    span: tuple[int, int]  # (start, N) of the visual tokens in the prompt
    keep: torch.Tensor  # kept visual indices [M], ascending
    next_pos: int  # original position id of the next token to feed
    step: int = 0


@dataclass
class Record:
    """Per step t (lists of length T); stacked into the trace at the end."""
    logits: list = field(default_factory=list)  # [V] fp32 each, on the model's device
    keep: list = field(default_factory=list)  # bool [N] each
    rates: list = field(default_factory=list)  # float
    flops: list = field(default_factory=list)  # int
    kv_bytes: list = field(default_factory=list)  # int
    visual_share: list = field(default_factory=list)  # layer K-1 attention mass on visual tokens, float tensor


def _step_flops(model, state: State, rows_low: int, rows_high: int, K: int) -> int:
    """Matmul FLOPs of the step just run: rows_low queries in layers < K, rows_high in layers >= K."""
    tc = model.config.text_config
    L = tc.num_hidden_layers
    low = K * decoder_layer_flops(tc, rows_low, state.cache.length(0))
    high = (L - K) * decoder_layer_flops(tc, rows_high, state.cache.length(K)) if K < L else 0
    return low + high + lm_head_flops(tc, 1)


def _evict(cache: KVCache, layers: range, span: tuple[int, int], old_keep, new_keep):
    """Remove the visual tokens in old_keep but not in new_keep from `layers` of the cache."""
    if new_keep.numel() == old_keep.numel():
        return
    start = span[0]
    gone = start + old_keep[~torch.isin(old_keep, new_keep)]  # positions of evicted tokens [E]
    slots = torch.isin(cache.pos[layers[0]], gone, invert=True).nonzero().squeeze(1)  # [S_kept]
    cache.keep(layers, slots)


@torch.no_grad()
def prefill(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
            prune: PruneSettings, max_new_tokens: int, rec: Record | None = None):
    """Run the prompt input_ids [P] with its image. -> (logits of the last position [V], State)."""
    cfg = model.config
    L = cfg.text_config.num_hidden_layers
    K = min(prune.layer, L)  # with method "none" K only says which layer's attention to record
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    span = visual_span(input_ids, cfg.image_token_index)
    P, N = input_ids.numel(), span[1]

    feats = model.image_features(pixel_values.to(device))  # [1, N, C]
    x = model.embed(input_ids[None], feats)  # [1, P, C]
    pos = torch.arange(P, device=device)  # [P]
    state = State(KVCache(L), span, torch.arange(N, device=device), next_pos=P)

    x, probs = model.run_layers(x, pos, state.cache, range(0, K), probs_of=K - 1)  # probs [1, H, P, P]
    scores = visual_scores(probs, span, "last")  # [N]
    pick = scores if prune.score == "last" else visual_scores(probs, span, "mean")
    keep, rate = choose_keep(prune, 0, state.keep, pick, max_new_tokens)
    if keep.numel() < N:  # layers >= K never see the evicted visual tokens: drop their rows
        gone = span[0] + state.keep[~torch.isin(state.keep, keep)]  # [E]
        rows = torch.isin(pos, gone, invert=True).nonzero().squeeze(1)  # [P - E]
        x, pos = x[:, rows], pos[rows]  # [1, P-E, C], [P-E]
    state.keep = keep
    x, _ = model.run_layers(x, pos, state.cache, range(K, L))
    logits = model.logits(x[:, -1])[0].float()  # [V]
    if rec is not None:
        _record(rec, model, state, logits, rate, scores,
                vision_flops(cfg) + _step_flops(model, state, P, pos.numel(), K))
    return logits, state


@torch.no_grad()
def decode_one_token(model: LlavaForConditionalGeneration, token: torch.Tensor, state: State,
                     prune: PruneSettings, max_new_tokens: int, rec: Record | None = None) -> torch.Tensor:
    """Feed one token (a 0-d id tensor) at position state.next_pos. -> logits [V]."""
    L = model.config.text_config.num_hidden_layers
    K = min(prune.layer, L)
    state.step += 1
    pos = torch.tensor([state.next_pos], device=token.device)  # [1]
    x = model.model.embed_tokens(token.view(1, 1))  # [1, 1, C]
    x, probs = model.run_layers(x, pos, state.cache, range(0, K), probs_of=K - 1)  # probs [1, H, 1, S]
    scores = visual_scores(probs, state.span, "last")  # [N]
    keep, rate = choose_keep(prune, state.step, state.keep, scores, max_new_tokens)
    _evict(state.cache, range(K, L), state.span, state.keep, keep)
    state.keep = keep
    x, _ = model.run_layers(x, pos, state.cache, range(K, L))
    state.next_pos += 1
    logits = model.logits(x[:, -1])[0].float()  # [V]
    if rec is not None:
        _record(rec, model, state, logits, rate, scores, _step_flops(model, state, 1, 1, K))
    return logits


def _record(rec: Record, model, state: State, logits, rate, scores, flops):
    N = state.span[1]
    mask = torch.zeros(N, dtype=torch.bool, device=logits.device)
    mask[state.keep] = True
    rec.logits.append(logits)
    rec.keep.append(mask)
    rec.rates.append(float(rate))
    rec.flops.append(int(flops))
    rec.kv_bytes.append(state.cache.nbytes())
    rec.visual_share.append(scores.sum())


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits [V] -> one token id (0-d tensor). Greedy at temperature 0, else nucleus sampling."""
    if sampling.temperature <= 0:
        return logits.argmax()
    probs = (logits.float() / sampling.temperature).softmax(-1)  # [V]
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)  # [V]
        outside = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p  # mass before this token already enough
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return torch.multinomial(probs / probs.sum(), 1, generator=generator)[0]


@dataclass
class Generation:
    tokens: list[int]
    record: Record
    state: State


@torch.no_grad()
def generate(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
             max_new_tokens: int = 64, prune: PruneSettings = PruneSettings(), sampling: Sampling = Sampling(),
             stop_ids=(), on_token=None) -> Generation:
    """Prefill, then sample and decode until a stop id or max_new_tokens. on_token(id) is called as each
    token is chosen (the CLI prints there, so the answer streams)."""
    device = model.lm_head.weight.device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    rec = Record()
    logits, state = prefill(model, input_ids, pixel_values, prune, max_new_tokens, rec)
    tokens: list[int] = []
    while True:
        token = sample(logits, sampling, generator)  # 0-d
        tid = int(token)  # the one host sync per step
        tokens.append(tid)
        if on_token is not None:
            on_token(tid)
        if tid in stop_ids or len(tokens) >= max_new_tokens:
            break
        logits = decode_one_token(model, token, state, prune, max_new_tokens, rec)
    return Generation(tokens, rec, state)
