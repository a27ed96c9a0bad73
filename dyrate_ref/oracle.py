"""The oracle beside the loop: the whole teacher-forced sequence in one forward, without a cache.

What the cached, evicting decode loop (generation.py) is tested against, and what the tools use to label,
calibrate and measure attention. An eviction is stated here as a mask (which keys each query row may
see), not done: if both ways give the same logits, the loop's cache bookkeeping is right.
"""

from __future__ import annotations

import torch

from .generation import generate
from .model import LlavaForConditionalGeneration
from .pruning import visual_span


def forward_no_cache(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                     tokens: list[int], masks: dict | None = None, key_weights: dict | None = None, probs_of=()):
    """Prompt input_ids [P] followed by the answer tokens[:-1], in one forward without a cache (gradients
    flow where the caller allows them: tools/predictor_e2e.py trains through key_weights).
    masks / key_weights: optional {layer: [S, S]} (model.LlamaAttention.forward says what each does).
    -> (logits [T, V] fp32, row t = the logits token t is chosen from; {layer: probs [1, H, S, S]} for
    each layer in probs_of)."""
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    P = input_ids.numel()
    seq = torch.cat([input_ids, torch.tensor(tokens[:-1], dtype=torch.long, device=device)])  # [S = P+T-1]
    pos = torch.arange(seq.numel(), device=device)  # [S]
    x = model.embed(seq[None], model.image_features(pixel_values.to(device)))  # [1, S, C]
    cos, sin = model.rope(pos)  # [S, D] each
    probs = {}
    for i, layer in enumerate(model.model.layers):
        mask = None if masks is None else masks.get(i)
        weight = None if key_weights is None else key_weights.get(i)
        x, p = layer(x, cos, sin, pos, None, i, mask, weight, want_probs=i in probs_of)
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


def step_of_rows(P: int, T: int, device=None) -> torch.Tensor:
    """The step each query row of a teacher-forced sequence belongs to: the P prompt rows to step 0, the
    row of answer token t-1 to step t. -> [S = P+T-1]."""
    return torch.clamp(torch.arange(P + T - 1, device=device) - (P - 1), min=0)


def eviction_masks(input_ids: torch.Tensor, image_token_id: int, kept_masks: torch.Tensor, K: int, L: int) -> dict:
    """Per-layer attention masks that say, without a cache, what the evicting loop does: in layers >= K
    a query of step t sees a visual token only if kept_t (row t of kept_masks [T, N]) has it.
    -> {layer: bool [S, S]}."""
    device = kept_masks.device
    start, N = visual_span(input_ids, image_token_id)
    P, T = input_ids.numel(), kept_masks.shape[0]
    pos = torch.arange(P + T - 1, device=device)  # [S]
    causal = pos[None, :] <= pos[:, None]  # [S, S]
    sees = torch.ones_like(causal)
    sees[:, start:start + N] = kept_masks[step_of_rows(P, T, device)]  # [S, N]: each query row's kept set
    return {i: (causal if i < K else causal & sees) for i in range(L)}


@torch.no_grad()
def recompute_logits(model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                     tokens: list[int], kept_masks: torch.Tensor, K: int) -> torch.Tensor:
    """Every step's logits from kept_masks [T, N] alone: no cache, no eviction, explicit masks. An
    independent check of the cached, evicting decode loop. -> logits [T, V]."""
    device = model.lm_head.weight.device
    masks = eviction_masks(input_ids.to(device), model.config.image_token_index, kept_masks.to(device), K,
                           model.config.text_config.num_hidden_layers)
    return forward_no_cache(model, input_ids, pixel_values, tokens, masks)[0]
