"""Generation: prefill, decode_one_token, sample, generate -- and the no-cache recompute oracle.

The loop owns all state: the KV cache, the next position id (which after pruning is no longer the
cache length), the kept visual tokens, and the per-step record that becomes the trace. Every step is
two halves around one decision:

    lower half   decoder layers [0, K); layer K-1's attention over the visual tokens gives the scores
    decision     pruning.choose_keep(...) -> keep_t (a subset of keep_{t-1})
    upper half   evict the dropped visual tokens from layers [K, L) of the cache, run layers [K, L)

With method "none" the same path runs and keeps everything (K then only says which layer's attention
is recorded). The halves are separate functions so that a reader (and the tutorial) can stop between
them and look at the scores.
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
    K: int  # the layer from which pruning applies (L for "none": nothing above it)
    step: int = 0


@dataclass
class Record:
    """Per step t (lists of length T); stacked into the trace at the end."""
    logits: list = field(default_factory=list)  # [V] fp32 each, on the model's device
    keep: list = field(default_factory=list)  # bool [N] each
    rates: list = field(default_factory=list)  # float
    flops: list = field(default_factory=list)  # int
    kv_bytes: list = field(default_factory=list)  # int
    visual_share: list = field(default_factory=list)  # 0-d tensors: layer K-1 attention mass on visual tokens


def pruning_layer(model, prune: PruneSettings) -> int:
    L = model.config.text_config.num_hidden_layers
    return min(prune.layer, L)


# ----------------------------------------------------------------------------------------------------
# The two halves of a step.


def prefill_lower(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor, K: int):
    """Vision tower, projector, embeddings and layers [0, K) of the prompt input_ids [P].
    -> (hidden x [1, P, C], positions [P], State, layer K-1 attention probs [1, H, P, P])."""
    cfg = model.config
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    span = visual_span(input_ids, cfg.image_token_index)
    P, N = input_ids.numel(), span[1]
    feats = model.image_features(pixel_values.to(device))  # [1, N, C]
    x = model.embed(input_ids[None], feats)  # [1, P, C]
    pos = torch.arange(P, device=device)  # [P]
    state = State(KVCache(cfg.text_config.num_hidden_layers), span, torch.arange(N, device=device), P, K)
    x, probs = model.run_layers(x, pos, state.cache, range(0, K), probs_of=K - 1)
    return x, pos, state, probs


def prefill_upper(model, x, pos, state: State, keep: torch.Tensor) -> torch.Tensor:
    """Layers [K, L) of the prompt, seeing only the kept visual tokens. -> last position's logits [V]."""
    L = model.config.text_config.num_hidden_layers
    if keep.numel() < state.keep.numel():  # layers >= K never see the evicted visual tokens: drop their rows
        gone = state.span[0] + state.keep[~torch.isin(state.keep, keep)]  # [E]
        rows = torch.isin(pos, gone, invert=True).nonzero().squeeze(1)  # [P - E]
        x, pos = x[:, rows], pos[rows]  # [1, P-E, C], [P-E]
    state.keep = keep
    x, _ = model.run_layers(x, pos, state.cache, range(state.K, L))
    return model.logits(x[:, -1])[0].float()  # [V]


def decode_lower(model, token: torch.Tensor, state: State):
    """Embed one token (0-d id) at state.next_pos and run layers [0, K).
    -> (hidden x [1, 1, C], position [1], layer K-1 attention probs [1, H, 1, S])."""
    pos = torch.tensor([state.next_pos], device=token.device)  # [1]
    x = model.model.embed_tokens(token.view(1, 1))  # [1, 1, C]
    x, probs = model.run_layers(x, pos, state.cache, range(0, state.K), probs_of=state.K - 1)
    return x, pos, probs


def decode_upper(model, x, pos, state: State, keep: torch.Tensor) -> torch.Tensor:
    """Evict what keep_t drops from layers [K, L) of the cache, then run them. -> logits [V]."""
    L = model.config.text_config.num_hidden_layers
    if keep.numel() < state.keep.numel():
        gone = state.span[0] + state.keep[~torch.isin(state.keep, keep)]  # positions of evicted tokens [E]
        slots = torch.isin(state.cache.pos[state.K], gone, invert=True).nonzero().squeeze(1)  # [S_kept]
        state.cache.keep(range(state.K, L), slots)
    state.keep = keep
    x, _ = model.run_layers(x, pos, state.cache, range(state.K, L))
    return model.logits(x[:, -1])[0].float()  # [V]


# ----------------------------------------------------------------------------------------------------
# Whole steps.


@torch.no_grad()
def prefill(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
            prune: PruneSettings, max_new_tokens: int, rec: Record | None = None):
    """Run the prompt input_ids [P] with its image. -> (logits of the last position [V], State)."""
    x, pos, state, probs = prefill_lower(model, input_ids, pixel_values, pruning_layer(model, prune))
    scores = visual_scores(probs, state.span, "last")  # [N]
    pick = scores if prune.score == "last" else visual_scores(probs, state.span, "mean")
    keep, rate = choose_keep(prune, 0, state.keep, pick, max_new_tokens)
    rows_high = pos.numel() - (state.keep.numel() - keep.numel())
    logits = prefill_upper(model, x, pos, state, keep)
    if rec is not None:
        flops = vision_flops(model.config) + _step_flops(model, state, pos.numel(), rows_high)
        _record(rec, state, logits, rate, scores, flops)
    return logits, state


@torch.no_grad()
def decode_one_token(model: LlavaForConditionalGeneration, token: torch.Tensor, state: State,
                     prune: PruneSettings, max_new_tokens: int, rec: Record | None = None) -> torch.Tensor:
    """Feed one token (a 0-d id tensor) at position state.next_pos. -> logits [V]."""
    state.step += 1
    x, pos, probs = decode_lower(model, token, state)
    scores = visual_scores(probs, state.span, "last")  # [N]
    keep, rate = choose_keep(prune, state.step, state.keep, scores, max_new_tokens)
    logits = decode_upper(model, x, pos, state, keep)
    state.next_pos += 1
    if rec is not None:
        _record(rec, state, logits, rate, scores, _step_flops(model, state, 1, 1))
    return logits


def _step_flops(model, state: State, rows_low: int, rows_high: int) -> int:
    """Matmul FLOPs of the step just run: rows_low queries in layers < K, rows_high in layers >= K."""
    tc = model.config.text_config
    L, K = tc.num_hidden_layers, state.K
    low = K * decoder_layer_flops(tc, rows_low, state.cache.length(0))
    high = (L - K) * decoder_layer_flops(tc, rows_high, state.cache.length(K)) if K < L else 0
    return low + high + lm_head_flops(tc, 1)


def _record(rec: Record, state: State, logits, rate, scores, flops):
    mask = torch.zeros(state.span[1], dtype=torch.bool, device=logits.device)
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
             stop_ids=(), on_token=None, force: list[int] | None = None) -> Generation:
    """Prefill, then sample and decode until a stop id or max_new_tokens. on_token(id) is called as each
    token is chosen (the CLI prints there, so the answer streams). `force`: feed these tokens instead of
    sampling (teacher forcing, for calibration and evaluation); generation stops after them."""
    device = model.lm_head.weight.device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    if force is not None:
        max_new_tokens = len(force)
    rec = Record()
    logits, state = prefill(model, input_ids, pixel_values, prune, max_new_tokens, rec)
    tokens: list[int] = []
    while True:
        if force is not None:
            token = torch.tensor(force[len(tokens)], device=device)
        else:
            token = sample(logits, sampling, generator)  # 0-d
        tid = int(token)  # the one host sync per step
        tokens.append(tid)
        if on_token is not None:
            on_token(tid)
        if len(tokens) >= max_new_tokens or (force is None and tid in stop_ids):
            break
        logits = decode_one_token(model, token, state, prune, max_new_tokens, rec)
    return Generation(tokens, rec, state)


# ----------------------------------------------------------------------------------------------------
# The oracle: the same computation without a cache and without eviction.


@torch.no_grad()
def recompute_logits(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                     tokens: list[int], visual_keep: torch.Tensor, K: int) -> torch.Tensor:
    """Recompute every step's logits in one full-sequence forward with explicit per-layer masks built
    from visual_keep [T, N] (row t = keep_t): in layers >= K, a query belonging to step t (prompt rows
    belong to step 0, the row of generated token t-1 to step t) sees a visual token only if keep_t has
    it. No cache, no eviction: an independent check of the cached, evicting decode loop.
    -> logits [T, V], row t = the logits token t was chosen from."""
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    span = visual_span(input_ids, model.config.image_token_index)
    start, N = span
    P = input_ids.numel()  # the answer adds T = len(tokens) steps
    seq = torch.cat([input_ids, torch.tensor(tokens[:-1], dtype=torch.long, device=device)])  # [P+T-1]
    S = seq.numel()
    pos = torch.arange(S, device=device)  # [S]
    step_of_row = torch.clamp(pos - (P - 1), min=0)  # [S]: prompt rows -> 0, row P-1+t -> t
    causal = pos[None, :] <= pos[:, None]  # [S, S]
    is_visual = (pos >= start) & (pos < start + N)  # [S]
    keep_rows = visual_keep.to(device)[step_of_row]  # [S, N]: keep set seen by each query row
    sees_visual = torch.ones(S, S, dtype=torch.bool, device=device)
    sees_visual[:, start:start + N] = keep_rows  # [S, S]
    upper = causal & (sees_visual | ~is_visual[None, :])  # [S, S]
    L = model.config.text_config.num_hidden_layers
    masks = {i: (causal if i < K else upper) for i in range(L)}
    feats = model.image_features(pixel_values.to(device))
    x = model.embed(seq[None], feats)  # [1, S, C]
    x, _ = model.run_layers(x, pos, None, range(L), masks=masks)
    return model.logits(x[0, P - 1:]).float()  # [T, V]
