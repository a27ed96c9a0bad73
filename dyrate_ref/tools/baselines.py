"""Evaluation baselines, shaped like the methods of pruning.py but not methods a user runs: the core
knows nothing of them. `evaluate --extra` builds them from the same kind of spec (BASELINES extends the
registry there).

- attention mass: keep the fewest tokens that hold mass p of the step's attention to the image;
- random keep: a random subset of a given size (from a fixed rate, or matched to another row's kept
  counts step by step): does choosing by attention matter at all?
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ..errors import UserError
from ..pruning import DEFAULT_LAYER, Method, kept_count, top_k_sorted
from ..settings import DEFAULT, checked, parse_fraction, parse_int, setting


@dataclass(frozen=True)
class AttentionMass(Method):
    """Keep the fewest tokens of keep_{t-1} that hold `mass` p of the step's attention to all N visual
    tokens; keep_{t-1} itself when even all of it holds less (what was dropped carried the rest)."""
    name: ClassVar[str] = "mass"
    layer: int = setting(DEFAULT_LAYER, parse_int, "pruning layer K", "K")
    mass: float = setting(0.9, parse_fraction, "mass p of the step's attention to the image to keep", "p",
                          aliases=("share",))

    def label(self, weights_dir=""):
        return f"attention mass K={self.layer} p={self.mass:g}"

    def family(self):
        return "attention mass"

    def choose(self, t, keep, scores):
        total = scores.sum()
        s = scores[keep].sort(descending=True).values  # [M]
        reach = (s.cumsum(0) >= self.mass * total).nonzero()
        if reach.numel() > 0:
            keep = top_k_sorted(keep, scores, int(reach[0]) + 1)
        return keep


def random_subset(keep: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k of keep (visual indices [M]) chosen at random with their own seeded generator, ascending."""
    if k >= keep.numel():
        return keep
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(keep.numel(), generator=g)[:k].to(keep.device)
    return keep[pick].sort().values


def _set_by_the_evaluation(text: str):
    raise ValueError("is set by the evaluation (matched to another row's kept counts), not by a spec; give rate")


@dataclass(frozen=True)
class RandomKeep(Method):
    """Keep a random subset of keep_{t-1}: kept_count(N, rate) tokens from the prefill on, or, with
    `counts`, counts[t] at step t (the last repeating; another row's own counts, matched per item by the
    evaluation). Seeded per item and step, so a subset of the items draws what the whole set would."""
    name: ClassVar[str] = "random"
    layer: int = setting(DEFAULT_LAYER, parse_int, "pruning layer K", "K")
    rate: float | None = setting(None, parse_fraction, "rate R: the part of the visual tokens dropped at random",
                                 "R", aliases=("ratio",))
    counts: tuple[int, ...] | None = setting(None, _set_by_the_evaluation, "kept count at each step (set by the "
                                             "evaluation from another row's counts)", "counts", per_item="counts")
    seed: int = setting(0, parse_int, "seed (the evaluation sets one per item)", "seed", per_item="seed")

    @classmethod
    def defaults(cls, given, ctx, given_as):
        if "rate" not in given:
            raise UserError(f"random keep needs rate=R (the part of the visual tokens it drops), from {given_as}")
        values = {f.name: given.get(f.name, f.default) for f in fields(cls)}
        return checked(cls, values, {f.name: given_as if f.name in given else DEFAULT for f in fields(cls)}, ctx)

    def label(self, weights_dir=""):
        return f"random keep K={self.layer} R={self.rate:g}" if self.rate is not None else super().label()

    def family(self):
        return "random (fixed count)"

    def choose(self, t, keep, scores):
        n = scores.numel()
        k = kept_count(n, self.rate) if self.counts is None else self.counts[min(t, len(self.counts) - 1)]
        return random_subset(keep, k, self.seed * 100_003 + t)


BASELINES = {cls.name: cls for cls in (AttentionMass, RandomKeep)}
