"""FastV, VTW and DyRate as plain functions. The decode loop (generation.py) calls them once per step.

Shared semantics (docs/pruning.md says the same):
- N visual tokens; their span is found from the <image> ids in input_ids. Pruning layer K, 1 <= K <= L-1.
  Layers < K always see every token.
- Step t is the forward pass whose output is token t; step 0 is the prefill, whose query is the last
  prompt token. The method chooses keep_t, a subset of {0..N-1}. In layers >= K the step's query attends
  only to kept visual tokens; evicted ones are removed from the KV cache of layers >= K and never come
  back, so keep_t ⊆ keep_{t-1}. In the prefill every prompt position in layers >= K sees only keep_0.
- Scores: layer K-1's attention probabilities of step t's query over the visual tokens, averaged over
  heads. Position ids keep their original values after eviction.

From the DyRate paper (arXiv 2501.14204, abstract and first page, all we have): the compression rate
grows during generation and is chosen per step by a lightweight predictor that reads the attention
distribution. Everything finer -- the features, the rate grid, the keep rule below, the training labels
-- is dyrate_ref's reconstruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .predictor import RatePredictor, predictor_features

METHODS = ("none", "fastv", "vtw", "dyrate")
DEFAULT_LAYER = 2  # K = 2, FastV's recommended setting for LLaVA-1.5
DEFAULT_RATIO = 0.5  # FastV's R = 50 %


def visual_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int]:
    """(start, N) of the one contiguous run of <image> ids in input_ids [P]."""
    where = (input_ids == image_token_id).nonzero().squeeze(1)  # [N]
    assert where.numel() > 0, "no <image> tokens in the input"
    start, n = int(where[0]), where.numel()
    assert int(where[-1]) == start + n - 1, "<image> tokens are not contiguous"
    return start, n


def visual_scores(attn_probs: torch.Tensor, span: tuple[int, int], query: str | slice = "last") -> torch.Tensor:
    """Importance of each visual token: attention probabilities [1, H, T, S] of one layer (whose keys are
    the full sequence, slot == position) -> [N] fp32, averaged over heads and over the chosen queries.

    query "last": the step's last query (FastV's public code; the only query of a decode step).
    query "mean": every prompt query after the image (what FastV's paper writes); prefill only.
    """
    start, n = span
    p = attn_probs[0, :, :, start:start + n].float()  # [H, T, N]
    if query == "last":
        rows = p[:, -1:]  # [H, 1, N]
    elif query == "mean":
        rows = p[:, start + n:]  # [H, T_after, N]: queries after the image
    else:
        rows = p[:, query]
    return rows.mean(dim=(0, 1))  # [N]


def top_k_sorted(candidates: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring of `candidates` (visual indices [M]), returned in ascending index order."""
    if k >= candidates.numel():
        return candidates
    best = scores[candidates].topk(k).indices  # [k]
    return candidates[best].sort().values  # [k]


def fastv_keep(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """FastV(K, R) at step 0: keep the top round((1-R)·N) visual tokens by score. -> indices [M]."""
    n = scores.numel()
    k = int(round((1 - ratio) * n))
    return top_k_sorted(torch.arange(n, device=scores.device), scores, k)


def vtw_keep(device=None) -> torch.Tensor:
    """VTW(K): from layer K on no visual token exists. -> empty indices [0]."""
    return torch.empty(0, dtype=torch.long, device=device)


def dyrate_keep(prev_keep: torch.Tensor, scores: torch.Tensor, rate: float) -> torch.Tensor:
    """DyRate step: |keep_t| = min(|keep_{t-1}|, ceil((1-r)·N)); the survivors are the highest-scoring
    tokens of keep_{t-1}, so the kept sets are nested. (Keep rule: our reconstruction.)"""
    n = scores.numel()
    k = min(prev_keep.numel(), math.ceil(round((1 - rate) * n, 6)))  # round(): 0.7*10 is 7.000000000000001
    return top_k_sorted(prev_keep, scores, k)


@dataclass(frozen=True)
class PruneSettings:
    """What the user asked for. `rates` is DyRate's fixed schedule (the last value repeats); without it
    DyRate asks `predictor`."""
    method: str = "none"
    layer: int = DEFAULT_LAYER  # K
    ratio: float = DEFAULT_RATIO  # FastV's R
    score: str = "last"  # FastV's scoring queries: "last" or "mean"
    rates: tuple[float, ...] | None = None
    predictor: RatePredictor | None = None


def choose_keep(prune: PruneSettings, t: int, prev_keep: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The one place the decode loop asks a method what to keep at step t. -> (keep_t [M], rate r_t)."""
    if prune.method == "none":
        return prev_keep, 0.0
    if prune.method == "fastv":
        return (fastv_keep(scores, prune.ratio) if t == 0 else prev_keep), prune.ratio
    if prune.method == "vtw":
        return vtw_keep(scores.device), 1.0
    if prune.method == "dyrate":
        if prune.rates is not None:
            rate = prune.rates[min(t, len(prune.rates) - 1)]
        else:
            rate = prune.predictor.rate(predictor_features(scores, prev_keep))
        return dyrate_keep(prev_keep, scores, rate), rate
    raise ValueError(f"unknown method {prune.method!r}")


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) in nats per row, from logits [..., V]: how far a pruned next-token distribution Q is
    from the unpruned P. VTW's calibration criterion, and the criterion of dyrate_ref's predictor labels."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)
