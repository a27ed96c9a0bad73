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
distribution. Everything finer -- the features, the actions, the keep rules below, the training labels
-- is dyrate_ref's reconstruction.

Two more rules exist only as baselines for the evaluation (not CLI methods): "mass" keeps the fewest
tokens that hold a share p of the step's visual attention, and "random" keeps a random subset of a
given size (matched to another method's counts: does attention-based choice matter at all?).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .predictor import RatePredictor, predictor_features

METHODS = ("none", "fastv", "vtw", "dyrate")
BASELINES = ("mass", "random")  # evaluation baselines, chosen through PruneSettings only
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


def dyrate_cut(prev_keep: torch.Tensor, scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """DyRate step with the predictor: drop `fraction` of the still-kept tokens (rounded half up), keeping
    the highest-scoring rest of keep_{t-1}, so the kept sets are nested. (Our reconstruction.)"""
    m = prev_keep.numel()
    return top_k_sorted(prev_keep, scores, m - math.floor(fraction * m + 0.5))


def mass_keep(prev_keep: torch.Tensor, scores: torch.Tensor, share: float) -> torch.Tensor:
    """Baseline: the fewest tokens of keep_{t-1} that hold `share` of the step's attention to all N visual
    tokens; keep_{t-1} itself when even all of it holds less (what was evicted carried the rest)."""
    total = scores.sum()
    s = scores[prev_keep].sort(descending=True).values  # [M]
    reach = (s.cumsum(0) >= share * total).nonzero()
    if reach.numel() == 0:
        return prev_keep
    return top_k_sorted(prev_keep, scores, int(reach[0]) + 1)


def random_keep(prev_keep: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Baseline: k of keep_{t-1} chosen at random (its own seeded generator), ascending."""
    if k >= prev_keep.numel():
        return prev_keep
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(prev_keep.numel(), generator=g)[:k].to(prev_keep.device)
    return prev_keep[pick].sort().values


@dataclass(frozen=True)
class PruneSettings:
    """What the user asked for. `rates` is DyRate's fixed schedule (the last value repeats); without it
    DyRate asks `predictor`. `share` and `counts`/`seed` belong to the mass and random baselines."""
    method: str = "none"
    layer: int = DEFAULT_LAYER  # K
    ratio: float = DEFAULT_RATIO  # FastV's R
    score: str = "last"  # FastV's scoring queries: "last" or "mean"
    rates: tuple[float, ...] | None = None
    predictor: RatePredictor | None = None
    share: float = 0.9  # mass: share of the visual attention to keep
    counts: tuple[int, ...] | None = None  # random: kept count at each step (the last repeats)
    seed: int = 0  # random


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
            return dyrate_keep(prev_keep, scores, rate), rate
        keep = dyrate_cut(prev_keep, scores, prune.predictor.cut(predictor_features(scores, prev_keep, t)))
        return keep, 1 - keep.numel() / scores.numel()  # the rate: compression relative to N
    if prune.method == "mass":
        keep = mass_keep(prev_keep, scores, prune.share)
        return keep, 1 - keep.numel() / scores.numel()
    if prune.method == "random":
        keep = random_keep(prev_keep, prune.counts[min(t, len(prune.counts) - 1)], prune.seed * 100_003 + t)
        return keep, 1 - keep.numel() / scores.numel()
    raise ValueError(f"unknown method {prune.method!r}")


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """KL(P || Q) in nats per row, from logits [..., V]: how far a pruned next-token distribution Q is
    from the unpruned P. VTW's calibration criterion, and what `trace compare` measures between an oracle
    and a backend (there in float64: float32 rounding alone leaves a few 1e-7 of noise)."""
    lp, lq = p_logits.to(dtype).log_softmax(-1), q_logits.to(dtype).log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)
