"""FastV, VTW and DyRate: each method is a value. The decode loop (generation.py) asks it once per step.

Shared semantics (docs/pruning.md says the same):
- N visual tokens; their span is found from the <image> ids in input_ids. Pruning layer K, 1 <= K <= L-1.
  Layers < K always see every token.
- Step t is the forward pass whose output is token t; step 0 is the prefill, whose query is the last
  prompt token. The method chooses kept_t, a subset of {0..N-1}. In layers >= K the step's query attends
  only to kept visual tokens; dropped ones leave the KV cache of layers >= K and never come back, so
  kept_t ⊆ kept_{t-1} (the loop checks it). In the prefill every prompt position in layers >= K sees
  only kept_0.
- Scores: layer K-1's attention probabilities over the visual tokens, averaged over heads, of step t's
  query (score "last"), of the question's text queries at the prefill ("mean"), or of those and every
  answer query so far ("accumulated"): SCORES below. Position ids keep their original values after
  eviction.

One word per quantity, in code, trace and docs:
- kept: the kept visual indices [M], ascending; a kept mask is the same set as a bool [N] (a row of the
  trace's `kept_masks`);
- rate: a share of the N visual tokens: r_t = 1 - |kept_t| / N is the part dropped by step t (the
  paper's compression rate), recorded by the loop from kept_t, once; FastV's R is a target rate and a
  schedule is a list of them;
- cut: the share of the still-kept tokens kept_{t-1} that one step drops (DyRate's predictor chooses a
  cut per step: 0, 1/4, 1/2, 3/4 or all of what is left);
- mass: attention probability summed over tokens (a step's attention mass on the image).

A method is one small frozen dataclass whose fields are its settings, with

    choose(t, kept, scores) -> kept_t       the decision of step t
    scores(t, last, accumulated) -> [N]     what it decides on, from the two scores the loop keeps
                                            (default: `last`; a method with a `score` setting: scored)

METHODS maps names to classes; nothing outside it dispatches on a method's name. How flags become a
method (defaults read from files beside the weights) is settings.py; how a table names it, the tools'.

From the DyRate paper (arXiv 2501.14204, abstract and first page, all we have): the compression rate
grows during generation and is chosen per step by a lightweight predictor that reads the attention
distribution. Everything finer -- the features, the cuts, the keep rules below, the training labels --
is dyrate_ref's reconstruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .predictor import RatePredictor, predictor_features

DEFAULT_LAYER = 2  # K = 2, FastV's recommended setting for LLaVA-1.5


# ----------------------------------------------------------------------------------------------------
# Shared pieces: where the image is, what a step's attention says about it, how many tokens to keep.


def visual_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int]:
    """(start, N) of the one contiguous run of <image> ids in input_ids [P]."""
    where = (input_ids == image_token_id).nonzero().squeeze(1)  # [N]
    assert where.numel() > 0, "no <image> tokens in the input"
    start, n = int(where[0]), where.numel()
    assert int(where[-1]) == start + n - 1, "<image> tokens are not contiguous"
    return start, n


def query_scores(attn_probs: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """Each query's attention over the visual tokens: probabilities [1, H, T, S] of one layer whose slot s
    holds position s (a layer below K: nothing evicted) -> [T, N] fp32, averaged over heads."""
    start, n = span
    return attn_probs[0, :, :, start:start + n].float().mean(0)  # [T, N]


# What a method decides on, chosen like K (docs/pruning.md, "the score"):
#   last         the step's own query: the prompt's last token at step 0, the token fed at step t after.
#   mean         at step 0 the mean over the question's text queries (not the image, not the template
#                around it: `text`, the rows the Processor says); after, the step's own query.
#   accumulated  the mean over the question's text queries and every answer query so far (step t >= 1
#                adds the query of answer token t-1). dyrate_ref's reconstruction of "the attention
#                distribution" a rate is read from; equal to mean at step 0.
SCORES = ("last", "mean", "accumulated")


def scored(score: str, t: int, last: torch.Tensor, accumulated: torch.Tensor) -> torch.Tensor:
    """Step t's scores [N] under the rule `score`, from the two the loop keeps: the step's last query's
    and the running mean over the text and answer queries (at step 0: the text queries' mean)."""
    return accumulated if score == "accumulated" or (score == "mean" and t == 0) else last


def check_score(score: str, allowed=SCORES):
    if score not in allowed:
        raise ValueError(f"score {score!r} is not one of {', '.join(map(repr, allowed))}")


def kept_count(n: int, rate: float) -> int:
    """How many of n tokens remain when a part `rate` of them is dropped: n - round(rate·n), the dropped
    count rounded half up. The one rounding rule of every method (FastV's R, DyRate's schedule and its
    predictor's cuts). round(·, 6) first: 0.7·10 is 7.000000000000001 in floating point."""
    return n - math.floor(round(rate * n, 6) + 0.5)


def top_k_sorted(candidates: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring of `candidates` (visual indices [M]), returned in ascending index order."""
    if k >= candidates.numel():
        return candidates
    best = scores[candidates].topk(k).indices  # [k]
    return candidates[best].sort().values  # [k]


def apply_cut(kept: torch.Tensor, scores: torch.Tensor, cut: float) -> torch.Tensor:
    """Drop the share `cut` of the still-kept tokens kept [M]: keep the best kept_count(M, cut) of them
    by score (nested: a subset of kept). DyRate's predictor acts through this, and its labels are made
    with it (tools/train_predictor.py)."""
    return top_k_sorted(kept, scores, kept_count(kept.numel(), cut))


def kept_mask(kept: torch.Tensor, n: int) -> torch.Tensor:
    """Kept visual indices [M] -> the same set as a bool mask [N] (a row of the trace's kept_masks)."""
    mask = torch.zeros(n, dtype=torch.bool, device=kept.device)
    mask[kept] = True
    return mask


# ----------------------------------------------------------------------------------------------------
# The methods.


class Method:
    """What every method shares. Subclasses are frozen dataclasses whose fields are their settings; each
    has a pruning layer K, `layer`: the decode loop splits the decoder there."""
    name: ClassVar[str]
    layer: int
    score: ClassVar[str] = "last"  # the rule of a method without a score setting (VTW, none)

    def scores(self, t: int, last: torch.Tensor, accumulated: torch.Tensor) -> torch.Tensor:
        """What step t decides on: last, the step's last query's scores [N], or accumulated, the mean over
        the question's text queries and the answer's queries so far [N] (scored). -> [N]."""
        return scored(self.score, t, last, accumulated)

    def choose(self, t: int, kept: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """kept_{t-1} [M] and step t's scores [N] -> kept_t, a subset of kept (ascending)."""
        raise NotImplementedError


def check_fraction(name: str, value: float):
    """A method's share setting lies in [0, 1]; a value that cannot run is refused when it is built."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} {value} is outside [0, 1]")


@dataclass(frozen=True)
class DyRate(Method):
    """DyRate (arXiv 2501.14204): the predictor reads step t's attention and chooses the step's cut, the
    share of what is still kept to drop (predictor.py), decoding at `confidence` (closer to 1 keeps
    more); the survivors are the highest-scoring tokens of kept_{t-1}. K and the score are the
    predictor's own, since its features read that layer's attention under that rule. (Keep rules: our
    reconstruction.)"""
    name: ClassVar[str] = "dyrate"
    layer: int
    predictor: RatePredictor
    confidence: float
    score: str = ""  # "": the predictor's own (the only one its features fit)

    def __post_init__(self):
        if not isinstance(self.predictor, RatePredictor):
            raise ValueError("DyRate needs its predictor (loading.load_predictor); a fixed schedule is DyRateSchedule")
        if self.layer != self.predictor.layer:
            raise ValueError(f"layer {self.layer} differs from the predictor's K={self.predictor.layer}")
        if not self.score:  # filled in once, so that the value (and the trace) says which score it used
            object.__setattr__(self, "score", self.predictor.score)
        if self.score != self.predictor.score:
            raise ValueError(f"score {self.score!r} differs from the predictor's ({self.predictor.score!r})")
        check_fraction("confidence", self.confidence)

    def choose(self, t, kept, scores):
        cut = self.predictor.choose_cut(predictor_features(scores, kept, t), self.confidence)
        return apply_cut(kept, scores, cut)


@dataclass(frozen=True)
class DyRateSchedule(Method):
    """DyRate with a fixed schedule instead of the predictor: r_t = schedule[t] (the last value repeating),
    kept_count(N, r_t) of kept_{t-1}'s best. The control that asks whether choosing the rate per picture
    and step pays."""
    name: ClassVar[str] = "dyrate-schedule"
    layer: int
    schedule: tuple[float, ...]
    score: str = "last"

    def __post_init__(self):
        check_score(self.score)
        if not self.schedule:
            raise ValueError("a schedule needs at least one rate")
        for r in self.schedule:
            check_fraction("a schedule's rate", r)

    def choose(self, t, kept, scores):
        rate = self.schedule[min(t, len(self.schedule) - 1)]
        return top_k_sorted(kept, scores, min(kept.numel(), kept_count(scores.numel(), rate)))


@dataclass(frozen=True)
class FastV(Method):
    """FastV (Chen et al., 2024): at the prefill, keep the visual tokens layer K-1 attends to most,
    kept_count(N, R) of them, for the whole answer. score "last": the prompt's last query (FastV's
    public code); "mean": the mean over the question's text queries (FastV's paper averages over all
    tokens; the question's text alone is dyrate_ref's variant). It decides at the prefill only, where
    "accumulated" is "mean"."""
    name: ClassVar[str] = "fastv"
    layer: int = DEFAULT_LAYER
    rate: float = 0.5
    score: str = "last"

    def __post_init__(self):
        check_fraction("rate", self.rate)
        check_score(self.score, ("last", "mean"))

    def choose(self, t, kept, scores):
        if t > 0:
            return kept
        n = scores.numel()
        return top_k_sorted(torch.arange(n, device=scores.device), scores, kept_count(n, self.rate))


@dataclass(frozen=True)
class VTW(Method):
    """VTW (Lin et al., 2024): withdraw every visual token from layer K on."""
    name: ClassVar[str] = "vtw"
    layer: int

    def choose(self, t, kept, scores):
        return kept if kept.numel() == 0 else torch.empty(0, dtype=torch.long, device=scores.device)


@dataclass(frozen=True)
class NoPruning(Method):
    """Keep every visual token. The loop still splits the decoder at `layer` (not a setting) and records
    that layer's attention to the image, which the plots draw."""
    name: ClassVar[str] = "none"
    layer: ClassVar[int] = DEFAULT_LAYER

    def choose(self, t, kept, scores):
        return kept


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (NoPruning, FastV, VTW, DyRate, DyRateSchedule)}
