"""Generation: prefill, decode_one_token, sample, generate -- and the no-cache forward the oracle uses.

The loop owns all state: the KV cache, the step counter t, the next position id (which after pruning
is no longer the cache length) and the kept visual tokens; the per-step record becomes the trace.
Prefill and decode steps differ only in what they feed (the prompt with its image, or one token); the
rest is one function, `forward_step`, two halves around one decision:

    lower half   decoder layers [0, K); layer K-1's attention over the visual tokens gives the scores
    decision     method.choose(t, keep, scores) -> keep_t (a subset of keep_{t-1})   (pruning.py);
                 the recorded rate r_t = 1 - |keep_t| / N, computed here and nowhere else
    drop         the dropped visual tokens leave everything layers [K, L) will see (drop_visual: at the
                 prefill their rows leave the hidden states, at a decode step their slots leave the cache)
    upper half   layers [K, L) and the LM head

With method none the same path runs and keeps everything (K then only says which layer's attention
is recorded). Costs (FLOPs, KV bytes) are not counted here: each step records its shape (StepShape)
and cost.py derives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cost import kv_bytes, step_flops, vision_flops
from .model import KVCache, LlavaConfig, LlavaForConditionalGeneration
from .pruning import Method, NoPruning, keep_mask, visual_scores, visual_span


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class State:
    """Everything that changes from one step to the next. decode_one_token advances t and next_pos (and
    nothing else does); forward_step changes the cache and keep."""
    cache: KVCache
    span: tuple[int, int]  # (start, N) of the visual tokens in the prompt
    keep: torch.Tensor  # kept visual indices [M], ascending
    next_pos: int  # original position id of the next token to feed
    t: int = 0  # the step counter: 0 is the prefill


@dataclass(frozen=True)
class StepShape:
    """The shape of one step, all cost.py needs: query rows and keys (cache length after the step's
    append) in the layers below K and in the layers from K on."""
    rows_low: int
    keys_low: int
    rows_high: int
    keys_high: int


@dataclass
class Record:
    """The run's constants (config, K, bytes per cached number) and, per step t, lists of length T that
    are stacked into the trace at the end."""
    config: LlavaConfig
    K: int  # the layer from which the method prunes (min(method.layer, L))
    element_size: int  # bytes per cached key/value number
    logits: list = field(default_factory=list)  # [V] fp32 each, on the model's device
    keep_masks: list = field(default_factory=list)  # bool [N] each: keep_t as a mask (the trace's visual_keep)
    rates: list = field(default_factory=list)  # float
    visual_mass: list = field(default_factory=list)  # 0-d tensors: layer K-1 attention mass on visual tokens
    shapes: list = field(default_factory=list)  # StepShape each

    @property
    def flops(self) -> list[int]:
        """Matmul FLOPs per step; step 0 includes the vision tower and projector."""
        tc = self.config.text_config
        out = [step_flops(tc, self.K, s) for s in self.shapes]
        if out:
            out[0] += vision_flops(self.config)
        return out

    @property
    def kv_bytes(self) -> list[int]:
        """Bytes the KV cache holds after each step."""
        return [kv_bytes(self.config.text_config, self.K, s, self.element_size) for s in self.shapes]


def pruning_layer(model, method: Method) -> int:
    """K for this model: the method's layer, or L when the model is shallower (nothing is pruned)."""
    return min(method.layer, model.config.text_config.num_hidden_layers)


# ----------------------------------------------------------------------------------------------------
# The pieces of a step.


def prefill_lower(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor, K: int):
    """Vision tower, projector, embeddings and layers [0, K) of the prompt input_ids [P]: the lower half
    of step 0 on its own, for readers (the tutorial) who want to stop there and look at the scores.
    -> (hidden x [1, P, C], positions [P], State, layer K-1 attention probs [1, H, P, P])."""
    x, pos, state = embed_prompt(model, input_ids, pixel_values)
    x, probs = lower(model, x, pos, state, K)
    return x, pos, state, probs


def embed_prompt(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor):
    """Vision tower, projector and embeddings of the prompt input_ids [P]; a fresh State.
    -> (x [1, P, C], positions [P], State)."""
    cfg = model.config
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    span = visual_span(input_ids, cfg.image_token_index)
    P, N = input_ids.numel(), span[1]
    feats = model.image_features(pixel_values.to(device))  # [1, N, C]
    x = model.embed(input_ids[None], feats)  # [1, P, C]
    pos = torch.arange(P, device=device)  # [P]
    return x, pos, State(KVCache(cfg.text_config.num_hidden_layers), span, torch.arange(N, device=device), P)


def drop_visual(model, state: State, keep: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, K: int):
    """Make keep_t the kept set: the visual tokens it drops leave everything layers [K, L) will see. Two
    roles, one per kind of step:
    - the prefill (t = 0): the visual tokens are rows of the hidden states x about to enter layer K, and
      layers >= K have cached nothing yet, so the dropped rows leave x (and are never cached there);
    - a decode step: the fed token is never visual, so x keeps its row; the dropped tokens' slots leave
      the cache of layers >= K (KVCache.evict).
    -> (x, pos) for layers [K, L)."""
    if keep.numel() == state.keep.numel():  # nothing to do (and no host sync) when nothing is dropped
        return x, pos
    gone = state.span[0] + state.keep[~torch.isin(state.keep, keep)]  # original positions [E]
    if state.t == 0:
        assert all(state.cache.length(i) == 0 for i in range(K, model.config.text_config.num_hidden_layers)), \
            "the prefill drops rows before layers >= K have cached anything"
        rows = torch.isin(pos, gone, invert=True).nonzero().squeeze(1)  # [P - E]
        x, pos = x[:, rows], pos[rows]
    else:
        state.cache.evict(range(K, model.config.text_config.num_hidden_layers), gone)
    state.keep = keep
    return x, pos


def lower(model, x, pos, state: State, K: int):
    """Layers [0, K), which always see every token. -> (x, layer K-1's attention probs [1, H, T, S])."""
    return model.run_layers(x, pos, state.cache, range(0, K), probs_of=K - 1)


def upper(model, x, pos, state: State, K: int) -> torch.Tensor:
    """Layers [K, L) and the LM head on the last row. -> logits [V] fp32."""
    x, _ = model.run_layers(x, pos, state.cache, range(K, model.config.text_config.num_hidden_layers))
    return model.logits(x[:, -1])[0].float()  # [V]


def forward_step(model, x: torch.Tensor, pos: torch.Tensor, state: State, method: Method, rec: Record) -> torch.Tensor:
    """One step t = state.t on the rows it feeds (x [1, T, C] at positions pos [T]: the prompt at t = 0,
    one token after): lower half, the method's decision, the drop, upper half. -> logits [V]."""
    K, t = rec.K, state.t
    x, probs = lower(model, x, pos, state, K)  # probs [1, H, T, S]
    # The scores read layer K-1's keys by the image span: valid because layers below K never evict, so
    # there slot s holds position s (the layer holds every position up to the fed one).
    assert state.cache.length(K - 1) == state.next_pos + (t > 0), "a layer below K has lost slots"
    last = visual_scores(probs, state.span, "last")  # [N]: the step's last query, for the trace and most methods
    keep = method.choose(t, state.keep, method.scores(probs, state.span, t, last))
    rows_low = pos.numel()
    x, pos = drop_visual(model, state, keep, x, pos, K)
    logits = upper(model, x, pos, state, K)
    N = state.span[1]
    rec.logits.append(logits)
    rec.keep_masks.append(keep_mask(state.keep, N))
    rec.rates.append(1 - state.keep.numel() / N)  # the share of the N visual tokens dropped by step t
    rec.visual_mass.append(last.sum())
    high = state.cache.length(K) if K < model.config.text_config.num_hidden_layers else 0
    rec.shapes.append(StepShape(rows_low, state.cache.length(0), pos.numel(), high))
    return logits


# ----------------------------------------------------------------------------------------------------
# Whole steps.


@torch.no_grad()
def prefill(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
            method: Method, rec: Record):
    """Step 0: the prompt input_ids [P] with its image. -> (logits of the last position [V], State)."""
    x, pos, state = embed_prompt(model, input_ids, pixel_values)
    return forward_step(model, x, pos, state, method, rec), state


@torch.no_grad()
def decode_one_token(model: LlavaForConditionalGeneration, token: torch.Tensor, state: State, method: Method,
                     rec: Record) -> torch.Tensor:
    """The next step: feed one token (a 0-d id tensor) at position state.next_pos; advances state.t
    before (this is step t + 1) and state.next_pos after. -> logits [V]."""
    state.t += 1
    pos = torch.tensor([state.next_pos], device=token.device)  # [1]
    x = model.model.embed_tokens(token.view(1, 1))  # [1, 1, C]
    logits = forward_step(model, x, pos, state, method, rec)
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


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """KL(P || Q) in nats per row, from logits [..., V] of two next-token distributions. `trace compare`
    and the premise test pass the oracle's (unpruned) logits as P; VTW's calibration passes the
    withdrawn model's as P and the full model's as Q, KL(P_withdrawn || P_full), the direction VTW's
    criterion uses. float64 for comparisons: float32 rounding alone leaves a few 1e-7 of noise."""
    lp, lq = p_logits.to(dtype).log_softmax(-1), q_logits.to(dtype).log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@dataclass
class Generation:
    tokens: list[int]
    record: Record
    state: State
    stop_reason: str  # "eos", "max_new_tokens" or "forced"


@torch.no_grad()
def generate(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
             max_new_tokens: int = 64, method: Method = NoPruning(), sampling: Sampling = Sampling(),
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
    rec = Record(model.config, pruning_layer(model, method), model.lm_head.weight.element_size())
    logits, state = prefill(model, input_ids, pixel_values, method, rec)
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
        if force is None and tid in stop_ids:
            reason = "eos"
            break
        if len(tokens) >= max_new_tokens:
            reason = "forced" if force is not None else "max_new_tokens"
            break
        logits = decode_one_token(model, token, state, method, rec)
    return Generation(tokens, rec, state, reason)


# ----------------------------------------------------------------------------------------------------
# Without a cache: the whole teacher-forced sequence in one forward. The oracle the cached, evicting
# loop is tested against, and what the tools use to label, calibrate and measure attention.


@torch.no_grad()
def forward_no_cache(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                     tokens: list[int], masks: dict | None = None, probs_of=()):
    """Prompt input_ids [P] followed by the answer tokens[:-1], in one forward without a cache.
    masks: optional {layer: bool [S, S]} (True = may attend) replacing the causal default.
    -> (logits [T, V] fp32, row t = the logits token t is chosen from; {layer: probs [1, H, S, S]} for
    each layer in probs_of)."""
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    P = input_ids.numel()
    seq = torch.cat([input_ids, torch.tensor(tokens[:-1], dtype=torch.long, device=device)])  # [S = P+T-1]
    pos = torch.arange(seq.numel(), device=device)  # [S]
    x = model.embed(seq[None], model.image_features(pixel_values.to(device)))  # [1, S, C]
    probs = {}
    for i in range(model.config.text_config.num_hidden_layers):  # one layer at a time: any layer's probs
        x, p = model.run_layers(x, pos, None, range(i, i + 1), masks=masks, probs_of=i if i in probs_of else None)
        if p is not None:
            probs[i] = p
    return model.logits(x[0, P - 1:]).float(), probs  # [T, V]


@torch.no_grad()
def reference_answer(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                     max_new_tokens: int, stop_ids=(), probs_of=()):
    """The unpruned greedy answer, then that answer teacher-forced in one forward without a cache: what
    the tools measure a pruned run against. -> (tokens, logits [T, V] fp32, {layer: probs [1, H, S, S]})."""
    tokens = generate(model, input_ids, pixel_values, max_new_tokens, stop_ids=stop_ids).tokens
    logits, probs = forward_no_cache(model, input_ids, pixel_values, tokens, probs_of=probs_of)
    return tokens, logits, probs


def eviction_masks(input_ids: torch.Tensor, image_token_id: int, visual_keep: torch.Tensor, K: int, L: int) -> dict:
    """Per-layer attention masks that say, without a cache, what the evicting loop does: in layers >= K
    a query belonging to step t (prompt rows belong to step 0, the row of generated token t-1 to step t)
    sees a visual token only if keep_t (row t of visual_keep [T, N]) has it. -> {layer: bool [S, S]}."""
    device = visual_keep.device
    start, N = visual_span(input_ids, image_token_id)
    P, T = input_ids.numel(), visual_keep.shape[0]
    pos = torch.arange(P + T - 1, device=device)  # [S]
    step_of_row = torch.clamp(pos - (P - 1), min=0)  # [S]: prompt rows -> 0, row P-1+t -> t
    causal = pos[None, :] <= pos[:, None]  # [S, S]
    sees = torch.ones_like(causal)
    sees[:, start:start + N] = visual_keep[step_of_row]  # [S, N]: the keep set of each query row's step
    return {i: (causal if i < K else causal & sees) for i in range(L)}


def recompute_logits(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                     tokens: list[int], visual_keep: torch.Tensor, K: int) -> torch.Tensor:
    """Every step's logits from visual_keep [T, N] alone: no cache, no eviction, explicit masks. An
    independent check of the cached, evicting decode loop. -> logits [T, V]."""
    device = model.lm_head.weight.device
    masks = eviction_masks(input_ids.to(device), model.config.image_token_index, visual_keep.to(device), K,
                       model.config.text_config.num_hidden_layers)
    return forward_no_cache(model, input_ids, pixel_values, tokens, masks)[0]
