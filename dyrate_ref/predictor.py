"""DyRate's rate predictor: features of step t's visual-attention distribution -> the step's cut, the
share of what is still kept to drop now.

The paper (arXiv 2501.14204) says only that a lightweight predictor reads the attention distribution and
picks the compression rate for each step. Everything in this file is dyrate_ref's reconstruction:

- Its choices are cuts, shares of what is still kept (CUTS: drop 0 %, 25 %, 50 %, 75 % or 100 % of
  keep_{t-1}), so one cut means the same at 144 kept tokens as at 10. Step 0 (the prefill) is a decision like any
  other: DyRate may cut at the prefill like FastV and then keep cutting as the answer proceeds.
- The model is a linear layer (or a small MLP) from FEATURES to one logit per cut, read as a
  distribution over "the largest safe cut" (the training label, tools/train_predictor.py).
- Decoding errs towards keeping: the chosen cut is the largest cut a with P(label >= a) >= confidence.
  confidence 0.5 is the median; closer to 1 keeps more. Over-pruning cannot be undone (kept sets only
  shrink), under-pruning only costs a little compute, hence the asymmetry.

Its file (safetensors, the layer weights and a metadata header) is read and written by loading.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn


CUTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the share of the still-kept visual tokens a step drops
FEATURES = (
    "visual_mass",  # share of the query's attention that goes to visual tokens at all
    "entropy",  # entropy of the visual distribution / log N: 1 = spread evenly, 0 = one token
    "top5_mass", "top10_mass", "top25_mass", "top50_mass",  # share of visual attention on the top p% tokens
    "q50", "q90", "q99", "qmax",  # log(1 + N * quantile of the normalised scores): 0.69 = uniform
    "kept_mass",  # share of visual attention that falls on tokens still kept
    "kept_fraction",  # |keep_{t-1}| / N
    "is_prefill",  # 1 at step 0, whose query is the prompt's last token
    "log_step",  # log(1 + t): the same in training, evaluation and the CLI, whatever max_new_tokens is
)


def predictor_features(scores: torch.Tensor, prev_keep: torch.Tensor, t: int) -> torch.Tensor:
    """scores [N] (layer K-1 attention of step t's query over all N visual tokens, head-averaged),
    prev_keep [M] -> features [F] fp32, in the order of FEATURES."""
    N = scores.numel()
    mass = scores.sum()
    p = scores / mass.clamp_min(1e-12)  # [N], sums to 1
    entropy = -(p * p.clamp_min(1e-12).log()).sum() / math.log(N) if N > 1 else p.new_zeros(())
    sorted_p = p.sort(descending=True).values  # [N]
    cum = sorted_p.cumsum(0)  # [N]
    top = [cum[max(1, math.ceil(f * N)) - 1] for f in (0.05, 0.10, 0.25, 0.50)]
    # the f-quantile is the floor((1-f)·N)-th largest, 0-based; round() first: (1 - 0.9)·20 is 1.9999999999999996
    q = [(N * sorted_p[min(N - 1, int(round((1 - f) * N, 6)))]).log1p() for f in (0.5, 0.9, 0.99)]
    qmax = (N * sorted_p[0]).log1p()
    kept_mass = p[prev_keep].sum()
    step = torch.tensor([prev_keep.numel() / N, float(t == 0), math.log1p(t)], device=scores.device)
    return torch.cat([torch.stack([mass, entropy, *top, *q, qmax, kept_mass]), step]).float()  # [F]


class RatePredictor(nn.Module):
    def __init__(self, layer: int, cuts=CUTS, hidden: int = 0, confidence: float = 0.5, meta: dict | None = None,
                 score: str = "last"):
        super().__init__()
        self.layer = layer
        self.score = score  # the rule its features were computed with (pruning.SCORES); DyRate uses the same
        self.cuts = tuple(cuts)
        self.hidden = hidden
        self.confidence = confidence
        self.meta = dict(meta or {})
        self.path = ""
        F, U = len(FEATURES), len(self.cuts)
        self.net = nn.Linear(F, U) if hidden == 0 else nn.Sequential(nn.Linear(F, hidden), nn.ReLU(), nn.Linear(hidden, U))
        # Features have different scales (masses in [0, 1], log-quantiles up to ~log N): standardised with
        # the training set's statistics, stored with the weights.
        self.register_buffer("mean", torch.zeros(F))
        self.register_buffer("std", torch.ones(F))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [..., F] -> logits over the cuts [..., U]."""
        return self.net((feats - self.mean) / self.std)

    def decide(self, logits: torch.Tensor, confidence: float | None = None) -> torch.Tensor:
        """logits [..., U] -> cut index [...]: the largest a with P(label >= a) >= confidence
        (default: the predictor's own)."""
        confidence = self.confidence if confidence is None else confidence
        p = logits.float().softmax(-1)  # [..., U]
        at_least = p.flip(-1).cumsum(-1).flip(-1)  # [..., U]: P(label >= a)
        ok = at_least >= confidence - 1e-6  # cut 0 always qualifies (P = 1)
        return (ok * torch.arange(ok.shape[-1], device=ok.device)).amax(-1)

    @torch.no_grad()
    def choose_cut(self, feats: torch.Tensor, confidence: float | None = None) -> float:
        """The step's cut: the share of the still-kept tokens to drop. The predictor stays where it was
        loaded (the CPU): its F features are copied there, the host sync the keep size needs anyway."""
        return self.cuts[int(self.decide(self.forward(feats.to(self.mean.device)), confidence))]
