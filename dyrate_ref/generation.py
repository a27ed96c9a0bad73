"""Generation: prefill, decode_one_token, sample and generate around one `step`.

The loop owns all state (State): the KV cache, the step counter t, the next position id (after pruning
no longer the cache length), the pruning layer K and the kept visual tokens. A step feeds the prompt
with its image (t = 0, the prefill) or one token, and reads top to bottom in `step`: layers below K,
the method's decision checked, the dropped visual tokens leave, layers from K on, the record. Costs
(FLOPs, KV bytes) are not counted here: each step records its shape and cost.py derives them
(flops_per_step, kv_bytes_per_step). The no-cache oracle that checks this loop is oracle.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model import KVCache, LlavaConfig, LlavaForConditionalGeneration
from .pruning import Method, NoPruning, kept_mask, query_scores, visual_span


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class State:
    """Everything that changes from one step to the next, and the layer K the decoder is split at (the
    method's layer, or L on a shallower decoder: then nothing is pruned)."""
    cache: KVCache
    span: tuple[int, int]  # (start, N) of the visual tokens in the prompt
    text: tuple[int, int]  # [first, end) rows of the question's text in the prompt (the "mean" score's queries)
    K: int
    kept: torch.Tensor  # kept visual indices [M], ascending
    next_pos: int  # original position id of the next token to feed
    seen: torch.Tensor  # [N] fp32: the question's text queries' and the answer's queries' scores so far, summed
    seen_rows: int = 0  # how many queries `seen` sums
    t: int = 0  # the step counter: 0 is the prefill


@dataclass(frozen=True)
class StepShape:
    """The shape of one step, all cost.py needs: the layer K it split at, query rows and keys (cache
    length after the step's write) in the layers below K and in the layers from K on."""
    K: int
    rows_low: int
    keys_low: int
    rows_high: int
    keys_high: int


@dataclass
class Record:
    """Per step t, lists of length T that become the trace (cost.py derives FLOPs and KV bytes from the
    shapes)."""
    config: LlavaConfig
    element_size: int  # bytes per cached key/value number
    logits: list = field(default_factory=list)  # [V] fp32 each, on the model's device
    kept_masks: list = field(default_factory=list)  # bool [N] each: kept_t as a mask
    rates: list = field(default_factory=list)  # float each: r_t = 1 - |kept_t| / N, the share dropped by step t
    visual_mass: list = field(default_factory=list)  # 0-d each: layer K-1's last query's attention on the image
    shapes: list = field(default_factory=list)  # StepShape each


def check_kept(method: Method, t: int, before: torch.Tensor, after: torch.Tensor):
    """The contract the loop relies on: kept_t is a subset of kept_{t-1}, ascending, without repeats (an
    evicted token's keys are gone; a kept set that grew would be recorded but never computed)."""
    if after is before:  # nothing dropped: nothing to check (and no host sync)
        return
    ascending, subset = (after[1:] > after[:-1]).all(), torch.isin(after, before).all()  # strictly: no repeats
    if bool(ascending & subset):  # one host sync for both checks
        return
    if not bool(ascending):
        raise ValueError(f"method {method.name} at step {t}: the kept indices are not strictly ascending "
                         f"(unsorted or repeated): {after.tolist()[:20]}")
    raise ValueError(f"method {method.name} at step {t}: it keeps visual tokens it had already dropped "
                     f"({after[~torch.isin(after, before)].tolist()[:20]}); kept sets may only shrink")


def step(model: LlavaForConditionalGeneration, x: torch.Tensor, pos: torch.Tensor, state: State, method: Method,
         rec: Record) -> torch.Tensor:
    """Step t = state.t on the rows it feeds: x [1, T, C] at original positions pos [T] (the prompt at
    t = 0, one token after). -> logits [V] fp32."""
    t, K, (start, N), cache = state.t, state.K, state.span, state.cache
    layers, L = model.model.layers, len(model.model.layers)
    rows_low = pos.numel()
    cos, sin = model.rope(pos)  # [T, D] each
    for i in range(K):  # below K every token stays; layer K-1's attention is what the method reads
        x, probs = layers[i](x, cos, sin, pos, cache, i, want_probs=(i == K - 1))  # probs [1, H, T, S]
    # Layers below K never evict, so there slot s holds position s and the image span indexes the keys.
    assert cache.length(K - 1) == state.next_pos + (t > 0), "a layer below K has lost slots"
    rows = query_scores(probs, state.span)  # [T, N]: each fed query's attention over the image
    last = rows[-1]  # [N]: the step's last query (the trace's attention mass)
    queries = rows[state.text[0]:state.text[1]] if t == 0 else rows  # the question's text, then each answer token
    state.seen = state.seen + queries.sum(0)  # [N]
    state.seen_rows += queries.shape[0]
    kept = method.choose(t, state.kept, method.scores(t, last, state.seen / state.seen_rows))  # [M_t]
    check_kept(method, t, state.kept, kept)
    if kept.numel() < state.kept.numel():
        gone = start + state.kept[~torch.isin(state.kept, kept)]  # original positions [E]
        if t == 0:  # the prompt's dropped rows leave before layers >= K cache anything
            stay = torch.isin(pos, gone, invert=True)  # [T]
            x, pos, cos, sin = x[:, stay], pos[stay], cos[stay], sin[stay]  # [1, T - E, C], [T - E], [T - E, D]
        else:  # a decode step feeds no visual row: the dropped slots leave layers >= K
            cache.evict(range(K, L), gone)
    state.kept = kept
    for i in range(K, L):
        x, _ = layers[i](x, cos, sin, pos, cache, i)
    logits = model.logits(x[:, -1])[0].float()  # [V]
    rec.logits.append(logits)
    rec.kept_masks.append(kept_mask(kept, N))
    rec.rates.append(1 - kept.numel() / N)
    rec.visual_mass.append(last.sum())
    keys_high = cache.length(K) if K < L else 0  # layers >= K share one slot layout
    rec.shapes.append(StepShape(K, rows_low, cache.length(0), pos.numel(), keys_high))
    return logits


@torch.no_grad()
def prefill(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
            method: Method, rec: Record, text: tuple[int, int] | None = None):
    """Step 0: the prompt input_ids [P] with its image. text: the question's rows (Processor.text_rows);
    None: every row after the image. -> (logits of the last position [V], a fresh State)."""
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    P, L = input_ids.numel(), len(model.model.layers)
    start, N = visual_span(input_ids, model.config.image_token_index)
    text = text or (start + N, P)
    assert start + N <= text[0] < text[1] <= P, f"text rows {text} are not after the image in a {P}-token prompt"
    state = State(KVCache(L), (start, N), text, min(method.layer, L), torch.arange(N, device=device), P,
                  torch.zeros(N, device=device))
    x = model.embed(input_ids[None], model.image_features(pixel_values.to(device)))  # [1, P, C]
    return step(model, x, torch.arange(P, device=device), state, method, rec), state


@torch.no_grad()
def decode_one_token(model: LlavaForConditionalGeneration, token: torch.Tensor, state: State, method: Method,
                     rec: Record) -> torch.Tensor:
    """Step t + 1: feed one token (a 0-d id tensor) at position state.next_pos. -> logits [V]."""
    state.t += 1
    x = model.model.embed_tokens(token.view(1, 1))  # [1, 1, C]
    logits = step(model, x, torch.tensor([state.next_pos], device=token.device), state, method, rec)
    state.next_pos += 1
    return logits


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
    stop_reason: str  # "eos", "max_new_tokens" or "forced"


@torch.no_grad()
def generate(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
             max_new_tokens: int = 64, method: Method = NoPruning(), sampling: Sampling = Sampling(),
             stop_ids=(), on_token=None, force: list[int] | None = None,
             text: tuple[int, int] | None = None) -> Generation:
    """Prefill, then sample and decode until a stop id or max_new_tokens. on_token(id) is called as each
    token is chosen (the CLI prints there, so the answer streams). `force`: feed these tokens instead of
    sampling (teacher forcing, for calibration and evaluation); generation stops after them. `text`: the
    rows of the question in the prompt (Processor.text_rows), which the "mean" and "accumulated" scores
    average over; None: every row after the image."""
    device = model.lm_head.weight.device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    if force is not None:
        max_new_tokens = len(force)
    rec = Record(model.config, model.lm_head.weight.element_size())
    logits, state = prefill(model, input_ids, pixel_values, method, rec, text)
    tokens: list[int] = []
    while True:
        if force is not None:
            token = torch.tensor(force[len(tokens)], device=device)
        else:
            token = sample(logits, sampling, generator)  # 0-d
        tid = int(token)  # a host sync (so are a dropping step's isin and a predictor's cut)
        tokens.append(tid)
        if on_token is not None:
            on_token(tid)
        if force is None and tid in stop_ids:
            reason = "eos"
            break
        if len(tokens) >= max_new_tokens:
            reason = "forced" if force is not None else "max_new_tokens"
            break
        logits = decode_one_token(model, token, state, method, rec)
    return Generation(tokens, rec, state, reason)
